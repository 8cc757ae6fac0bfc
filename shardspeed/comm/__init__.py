"""THE ONLY importer of torch.distributed: process groups, collectives with observer hooks, the
comm log, and data-parallel / model-parallel topology."""

from shardspeed.comm.backend import (
    ProcessGroup,
    barrier,
    comm_timeout,
    destroy,
    get_global_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    monitored_barrier,
    new_group,
    world_group,
)
from shardspeed.comm.collectives import (
    Handle,
    add_observer,
    all_gather,
    all_gather_object,
    all_reduce,
    broadcast,
    broadcast_object,
    reduce_scatter,
    remove_observer,
)
from shardspeed.comm.env import DistEnv, free_port, read_dist_env
from shardspeed.comm.health import CollectiveError
from shardspeed.comm.stats import CommStats, enable_comm_log, log_summary
from shardspeed.comm.topology import Topology, topology_from_mpu

__all__ = [
    "CollectiveError", "CommStats", "DistEnv", "Handle", "ProcessGroup", "Topology", "add_observer", "all_gather",
    "all_gather_object", "all_reduce", "barrier", "broadcast", "broadcast_object", "comm_timeout",
    "destroy", "enable_comm_log", "free_port", "get_global_rank", "get_rank", "get_world_size",
    "init_distributed", "is_initialized", "log_summary", "monitored_barrier", "new_group", "read_dist_env",
    "reduce_scatter",
    "remove_observer", "topology_from_mpu", "world_group",
]
