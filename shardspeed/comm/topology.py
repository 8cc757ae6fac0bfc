"""Which ranks share data (the data-parallel group) and which share a model (model-parallel).

Without an ``mpu`` every rank is a data-parallel replica. With one (Megatron-style, the seed's
"Model Parallel Unit"), its groups are used as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardspeed.comm.backend import ProcessGroup, get_rank, get_world_size, world_group


@dataclass(frozen=True)
class Topology:
    dp_group: ProcessGroup
    dp_rank: int
    dp_world_size: int
    mp_group: ProcessGroup | None
    mp_rank: int
    mp_world_size: int


def topology_from_mpu(mpu: Any | None) -> Topology:
    if mpu is None:
        return Topology(world_group(), get_rank(), get_world_size(), None, 0, 1)
    for needed in ("get_data_parallel_group", "get_model_parallel_group"):
        if not hasattr(mpu, needed):
            raise TypeError(f"mpu must provide {needed}() (Megatron's model parallel unit interface)")
    dp = mpu.get_data_parallel_group()
    mp = mpu.get_model_parallel_group()
    return Topology(dp, get_rank(dp), get_world_size(dp), mp, get_rank(mp), get_world_size(mp))
