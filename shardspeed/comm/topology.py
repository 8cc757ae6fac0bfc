"""Which ranks share data (the data-parallel group) and which share a model (model-parallel).

Without an ``mpu`` every rank is a data-parallel replica. With one (Megatron-style, the seed's
"Model Parallel Unit"), its groups are used as given.

[Note: three model-parallel words]
- model-parallel (``mp``): every rank holding a part of the same model replica, tensor × pipe
  (DeepSpeed's ``get_model_parallel_group``). Norms and overflow checks finish over it.
- tensor-parallel (``tp``, DeepSpeed's "slice", Megatron's "tensor model parallel"): ranks holding
  slices of the same layers. A replicated parameter is counted once in a norm: by tp rank 0.
- pipe-parallel (``pp``): ranks holding different layers.
An mpu that names only the model-parallel group (older Megatron) has no pipe: its model-parallel
group is the tensor-parallel group.
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
    tp_group: ProcessGroup | None = None
    tp_rank: int = 0
    tp_world_size: int = 1
    pp_group: ProcessGroup | None = None
    pp_rank: int = 0
    pp_world_size: int = 1


def _group_of(mpu: Any, *names: str) -> ProcessGroup | None:
    for name in names:
        fn = getattr(mpu, name, None)
        if callable(fn):
            return fn()
    return None


def _members(group: ProcessGroup | None) -> tuple[ProcessGroup | None, int, int]:
    if group is None:
        return None, 0, 1
    return group, get_rank(group), get_world_size(group)


def topology_from_mpu(mpu: Any | None) -> Topology:
    if mpu is None:
        return Topology(world_group(), get_rank(), get_world_size(), None, 0, 1)
    missing = [f"{m}()" for m in ("get_data_parallel_group", "get_model_parallel_group")
               if not callable(getattr(mpu, m, None))]
    if missing:
        raise TypeError(f"mpu {type(mpu).__name__} has no {' and no '.join(missing)}: a model parallel unit "
                        "(initialize(mpu=...), checkpointing.configure(mpu_)) needs get_data_parallel_group() and "
                        "get_model_parallel_group(), DeepSpeed's and Megatron's interface; "
                        "shardspeed.initialize_model_parallel() builds one")
    dp = mpu.get_data_parallel_group()
    mp, mp_rank, mp_world = _members(mpu.get_model_parallel_group())
    tp = _group_of(mpu, "get_tensor_model_parallel_group", "get_slice_parallel_group")
    pp = _group_of(mpu, "get_pipeline_model_parallel_group", "get_pipe_parallel_group")
    if tp is None and pp is None:
        tp = mp
    tp, tp_rank, tp_world = _members(tp)
    pp, pp_rank, pp_world = _members(pp)
    return Topology(dp, get_rank(dp), get_world_size(dp), mp, mp_rank, mp_world,
                    tp, tp_rank, tp_world, pp, pp_rank, pp_world)
