"""The model-parallel unit (``mpu``): the process groups of a pipe × data × tensor grid, built once.

``shardspeed.initialize_model_parallel(tensor_parallel_size=T, pipeline_parallel_size=P)`` lays the
world out as ``PipeModelDataParallelTopology(P, T, world // (T * P))`` and returns a
``ModelParallelUnit`` that answers in both vocabularies a model may be written in:

======================  ==========================================  ===============================
ranks                   DeepSpeed (``PipelineParallelGrid``)         Megatron (``parallel_state``)
======================  ==========================================  ===============================
tensor slices           ``get_slice_parallel_*``                     ``get_tensor_model_parallel_*``
pipeline stages         ``get_pipe_parallel_*``                      ``get_pipeline_model_parallel_*``
data replicas           ``get_data_parallel_*``                      ``get_data_parallel_*``
tensor × pipe           ``get_model_parallel_*``                     ``get_model_parallel_*``
======================  ==========================================  ===============================

(``*`` is ``rank``, ``world_size`` or ``group``.) ``shardspeed.initialize(mpu=...)`` reads it through
``topology_from_mpu``, like any user-written mpu.

[Note: groups are built once, in one order]
``new_group`` is a collective over the whole world: every rank must create every group, including
the ones it is not in, in the same order, or the job hangs (or, worse, pairs up the wrong groups).
So all groups are made here, in one fixed sequence (tensor, data, pipe, then tensor × pipe; within
an axis in ``get_axis_comm_lists`` order), at one call that every rank makes; nothing later creates
a group on demand. A second call with the same sizes returns the unit already built; with other
sizes it is refused until ``destroy_model_parallel()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardspeed.comm.backend import (
    ProcessGroup,
    destroy_group,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    new_group,
)
from shardspeed.comm.process_topology import PipeModelDataParallelTopology, ProcessTopology

# the axis names of PipeModelDataParallelTopology, by role
TENSOR, DATA, PIPE = "model", "data", "pipe"


@dataclass(frozen=True)
class _Group:
    """One of this rank's groups: the process group and its members' global ranks, ascending."""

    group: ProcessGroup
    ranks: tuple[int, ...]

    def rank_of(self, global_rank: int) -> int:
        return self.ranks.index(global_rank)


class ModelParallelUnit:
    """This rank's tensor, pipe, data and model-parallel (tensor × pipe) groups over a
    ``PipeModelDataParallelTopology``. Made by ``initialize_model_parallel``; see the module doc."""

    def __init__(self, topology: ProcessTopology, groups: dict[str, _Group], global_rank: int):
        self._topo = topology
        self._groups = groups
        self.global_rank = global_rank
        self._coord = topology.get_coord(global_rank)

    def _size(self, kind: str) -> int:
        return len(self._groups[kind].ranks)

    def _rank(self, kind: str) -> int:
        return self._groups[kind].rank_of(self.global_rank)

    def group_ranks(self, kind: str) -> list[int]:
        """Global ranks (ascending) of this rank's ``kind`` group: "tensor", "data", "pipe" or "model"."""
        return list(self._groups[kind].ranks)

    # -- the grid ----------------------------------------------------------------------------------
    def topology(self) -> ProcessTopology:
        return self._topo

    def get_global_rank(self) -> int:
        return self.global_rank

    # -- tensor slicing (DeepSpeed: slice; Megatron: tensor model parallel) -------------------------
    def get_slice_parallel_rank(self) -> int:
        return self._rank("tensor")

    def get_slice_parallel_world_size(self) -> int:
        return self._size("tensor")

    def get_slice_parallel_group(self) -> ProcessGroup:
        return self._groups["tensor"].group

    get_tensor_model_parallel_rank = get_slice_parallel_rank
    get_tensor_model_parallel_world_size = get_slice_parallel_world_size
    get_tensor_model_parallel_group = get_slice_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 in this rank's group (the one that broadcasts data)."""
        return self._groups["tensor"].ranks[0]

    # -- pipeline stages ------------------------------------------------------------------------------
    def get_pipe_parallel_rank(self) -> int:
        return self._rank("pipe")

    def get_pipe_parallel_world_size(self) -> int:
        return self._size("pipe")

    def get_pipe_parallel_group(self) -> ProcessGroup:
        return self._groups["pipe"].group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_stage_id = get_pipe_parallel_rank

    def is_pipeline_first_stage(self) -> bool:
        return self.get_pipe_parallel_rank() == 0

    def is_pipeline_last_stage(self) -> bool:
        return self.get_pipe_parallel_rank() == self.get_pipe_parallel_world_size() - 1

    def get_pipeline_model_parallel_first_rank(self) -> int:
        return self._groups["pipe"].ranks[0]

    def get_pipeline_model_parallel_last_rank(self) -> int:
        return self._groups["pipe"].ranks[-1]

    def get_pipeline_model_parallel_next_rank(self) -> int:
        """Global rank of the next stage (wrapping around, as Megatron's)."""
        ranks = self._groups["pipe"].ranks
        return ranks[(self.get_pipe_parallel_rank() + 1) % len(ranks)]

    def get_pipeline_model_parallel_prev_rank(self) -> int:
        ranks = self._groups["pipe"].ranks
        return ranks[(self.get_pipe_parallel_rank() - 1) % len(ranks)]

    def stage_to_global(self, stage_id: int, **coord: int) -> int:
        """Global rank of pipeline stage ``stage_id`` at this rank's other coordinates (or ``coord``)."""
        where = {**self._coord._asdict(), **coord, PIPE: stage_id}
        return self._topo.get_rank(**where)

    # -- data replicas ---------------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return self._rank("data")

    def get_data_parallel_world_size(self) -> int:
        return self._size("data")

    def get_data_parallel_group(self) -> ProcessGroup:
        return self._groups["data"].group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.group_ranks("data")

    def get_data_parallel_src_rank(self) -> int:
        return self._groups["data"].ranks[0]

    get_data_parallel_id = get_data_parallel_rank

    # -- model parallel: tensor × pipe, every rank that holds part of one replica ------------------------
    def get_model_parallel_rank(self) -> int:
        return self._rank("model")

    def get_model_parallel_world_size(self) -> int:
        return self._size("model")

    def get_model_parallel_group(self) -> ProcessGroup:
        return self._groups["model"].group

    def __repr__(self) -> str:
        t, p, d = (self._topo.get_dim(a) for a in (TENSOR, PIPE, DATA))
        return (f"ModelParallelUnit(tensor={t}, pipe={p}, data={d}; rank {self.global_rank} at "
                f"{self._coord})")


_current: ModelParallelUnit | None = None


def initialize_model_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> ModelParallelUnit:
    """Lay the world out as pipe × data × tensor and build every process group (once).

    Args:
        tensor_parallel_size: ranks that slice each layer (T); neighbours in rank order.
        pipeline_parallel_size: pipeline stages (P).

    The data-parallel size is ``world_size // (T * P)``. Every rank must call this, with the same
    arguments. Starts the default process group (``init_distributed()``) if none exists yet.

    Returns:
        the ``ModelParallelUnit``, also returned later by ``get_model_parallel_unit()``.
    """
    global _current
    t, p = _positive("tensor_parallel_size", tensor_parallel_size), _positive("pipeline_parallel_size",
                                                                             pipeline_parallel_size)
    if not is_initialized():
        init_distributed()
    world = get_world_size()
    if world % (t * p):
        what = (f"tensor_parallel_size {t}" if p == 1 else
                f"tensor_parallel_size {t} × pipeline_parallel_size {p} = {t * p}")
        raise ValueError(f"{what} does not divide the world size {world}: the ranks cannot be split into "
                         f"equal model replicas; use a {'T' if p == 1 else 'T × P'} that divides {world}")
    if _current is not None:
        built = (_current.get_tensor_model_parallel_world_size(), _current.get_pipe_parallel_world_size())
        if built == (t, p):
            return _current
        raise RuntimeError(f"model parallelism is already initialised with tensor_parallel_size {built[0]}, "
                           f"pipeline_parallel_size {built[1]}; call shardspeed.comm.destroy_model_parallel() "
                           f"before initialising it with {t}, {p}")
    topo = PipeModelDataParallelTopology(num_pp=p, num_mp=t, num_dp=world // (t * p))
    _current = ModelParallelUnit(topo, _build_groups(topo), get_rank())
    return _current


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _build_groups(topo: ProcessTopology) -> dict[str, _Group]:
    """Create every group of the grid, in the fixed order of the module note; keep this rank's."""
    me = get_rank()
    lists: list[tuple[str, list[int]]] = []
    for kind, axis in (("tensor", TENSOR), ("data", DATA), ("pipe", PIPE)):
        lists += [(kind, ranks) for ranks in topo.get_axis_comm_lists(axis)]
    lists += [("model", topo.get_axis_list(DATA, d)) for d in range(topo.get_dim(DATA))]
    mine: dict[str, _Group] = {}
    for kind, ranks in lists:
        group = new_group(sorted(ranks))
        if me in ranks:
            mine[kind] = _Group(group, tuple(sorted(ranks)))
    return mine


def get_model_parallel_unit() -> ModelParallelUnit | None:
    """The unit built by ``initialize_model_parallel``, or None when model parallelism is not set up."""
    return _current


def model_parallel_is_initialized() -> bool:
    return _current is not None


def destroy_model_parallel() -> None:
    """Forget the current unit and release its process groups (every rank must call it)."""
    global _current
    unit, _current = _current, None
    if unit is None or not is_initialized():
        return
    for g in unit._groups.values():
        destroy_group(g.group)


def forget_model_parallel() -> None:
    """Drop the unit without touching its groups: for when the default group is torn down anyway."""
    global _current
    _current = None
