"""THE ONLY importer of torch.distributed: process groups, collectives with observer hooks, the
comm log, the pipe × data × tensor topology and the model-parallel unit (mpu) that owns its groups."""

from shardspeed.comm.backend import (
    ProcessGroup,
    barrier,
    comm_timeout,
    destroy,
    destroy_group,
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
    all_gather_sizes,
    all_gather_slices,
    all_reduce,
    all_reduce_rows,
    broadcast,
    broadcast_object,
    reduce_scatter,
    remove_observer,
)
from shardspeed.comm.env import DistEnv, free_port, read_dist_env
from shardspeed.comm.health import CollectiveError
from shardspeed.comm.model_parallel import (
    ModelParallelUnit,
    destroy_model_parallel,
    get_model_parallel_unit,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from shardspeed.comm.process_topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology
from shardspeed.comm.stats import CommStats, enable_comm_log, log_summary
from shardspeed.comm.topology import Topology, topology_from_mpu

__all__ = [
    "CollectiveError", "CommStats", "DistEnv", "Handle", "ModelParallelUnit", "PipeDataParallelTopology",
    "PipeModelDataParallelTopology", "ProcessGroup", "ProcessTopology", "Topology", "add_observer", "all_gather",
    "all_gather_object", "all_gather_slices", "all_gather_sizes",
    "all_reduce", "all_reduce_rows", "barrier", "broadcast", "broadcast_object", "comm_timeout",
    "destroy", "destroy_group", "destroy_model_parallel", "enable_comm_log", "free_port", "get_global_rank",
    "get_model_parallel_unit", "get_rank", "get_world_size", "init_distributed", "initialize_model_parallel",
    "is_initialized", "log_summary", "model_parallel_is_initialized", "monitored_barrier", "new_group",
    "read_dist_env", "reduce_scatter", "remove_observer", "topology_from_mpu", "world_group",
]
