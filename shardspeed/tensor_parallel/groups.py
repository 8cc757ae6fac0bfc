"""Which ranks a tensor-parallel layer slices across.

[Note: a layer keeps its group, not the other way round]
A layer is cut for one tensor-parallel group when it is built (its parameters are that group's
slices), so it keeps that group rather than asking a global at every forward. The group is held in
a ``TensorParallelGroup``: ``copy.deepcopy`` of a model (EMA copies, reference models) shares it
(torch's process groups cannot be copied, and a copy lives on the same ranks anyway), and pickling
a whole module stores nothing of it: it is looked up again, from the current model-parallel unit,
when the module is loaded. Without a group (no ``initialize_model_parallel``) the layer is not
sliced (T = 1) and no collective is issued, even when a data-parallel world exists.
"""

from __future__ import annotations

from typing import Any

from shardspeed.comm import ProcessGroup, get_model_parallel_unit, get_rank, get_world_size


class TensorParallelGroup:
    """A tensor-parallel process group with this rank's index in it and its size."""

    def __init__(self, group: ProcessGroup | None):
        self.group = group
        self.rank = get_rank(group) if group is not None else 0
        self.world_size = get_world_size(group) if group is not None else 1

    def __deepcopy__(self, memo: dict) -> TensorParallelGroup:
        return self

    def __reduce__(self) -> tuple[Any, tuple]:
        return (current_tensor_parallel_group, ())

    def __repr__(self) -> str:
        return f"TensorParallelGroup(rank={self.rank}, world_size={self.world_size})"


def current_tensor_parallel_group() -> TensorParallelGroup:
    """The current model-parallel unit's tensor-parallel group, or no slicing (T = 1) without one."""
    unit = get_model_parallel_unit()
    return TensorParallelGroup(unit.get_tensor_model_parallel_group() if unit is not None else None)


def resolve(group: ProcessGroup | TensorParallelGroup | None) -> TensorParallelGroup:
    """``group`` as a TensorParallelGroup; None means the current unit's tensor-parallel group."""
    if isinstance(group, TensorParallelGroup):
        return group
    return current_tensor_parallel_group() if group is None else TensorParallelGroup(group)


def divide(numerator: int, world: int, what: str) -> int:
    """``numerator / world`` when exact; otherwise a user error naming both numbers."""
    if numerator % world:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {world}: each of the "
                         f"{world} ranks must hold an equal slice")
    return numerator // world
