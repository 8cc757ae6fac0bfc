"""Where each rank sits in a grid of named parallel axes (pipe × data × tensor): pure arithmetic,
no process groups, so every question about the layout is answered (and tested) without processes.

[Note: the layout]
A topology is a list of named axes with a size each. Ranks fill the grid in row-major order: the
last axis varies fastest, so with axes (pipe, data, model) and sizes (P, D, T) the rank at
coordinate (p, d, t) is ``(p * D + d) * T + t``. This is DeepSpeed's layout, and with the tensor
axis last it is also Megatron's group order: the T ranks of one tensor-parallel group are
neighbours (the same node, the fastest links, for the most frequent collectives), the data-parallel
replicas come next, and pipeline stages, which only exchange activations, are farthest apart.
DeepSpeed calls the tensor axis ``model``; we keep its names so ``get_rank_repr`` and checkpoint
names read the same.
"""

from __future__ import annotations

import itertools
import math
from collections import namedtuple
from collections.abc import Iterable, Sequence
from typing import Any


class ProcessTopology:
    """A grid of ranks over named ``axes`` with sizes ``dims``, row-major (last axis fastest).

    >>> topo = ProcessTopology(axes=["x", "y"], dims=[2, 3])
    >>> topo.get_rank(x=0, y=1)
    1
    >>> topo.get_coord(4)
    ProcessCoord(x=1, y=1)
    """

    def __init__(self, axes: Sequence[str], dims: Sequence[int]):
        axes, dims = list(axes), [int(d) for d in dims]
        if len(axes) != len(dims):
            raise ValueError(f"ProcessTopology needs one size per axis: axes {axes} but dims {dims}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"ProcessTopology axes must be distinct, got {axes}")
        bad = [a for a in axes if not isinstance(a, str) or not a.isidentifier() or a.startswith("_")]
        if bad:
            raise ValueError(f"ProcessTopology axis names must be identifiers (they name coordinate fields), got {bad}")
        if any(d < 1 for d in dims):
            raise ValueError(f"ProcessTopology sizes must be >= 1, got dims {dims} for axes {axes}")
        self.axes = axes
        self.dims = dims
        self.ProcessCoord = namedtuple("ProcessCoord", axes)  # type: ignore[misc]
        # stride of each axis in the rank number: the product of the sizes of the axes after it
        self._strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]

    # -- single ranks ---------------------------------------------------------------------------------
    def world_size(self) -> int:
        return math.prod(self.dims)

    def get_axis_names(self) -> list[str]:
        return list(self.axes)

    def get_dim(self, axis: str) -> int:
        """Number of ranks along ``axis``; 0 for an axis this topology does not have (as DeepSpeed),
        so code written for three axes also runs on a two-axis topology."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_rank(self, **coord: int) -> int:
        """The rank at a full coordinate, one keyword per axis: ``get_rank(pipe=0, data=1, model=0)``."""
        missing = [a for a in self.axes if a not in coord]
        unknown = [a for a in coord if a not in self.axes]
        if missing or unknown:
            raise ValueError(f"get_rank() needs exactly one coordinate per axis {self.axes}; "
                             + (f"missing {missing}" if missing else f"unknown {unknown}")
                             + " (filter_match() selects the ranks of a partial coordinate)")
        self._check_range(coord)
        return sum(coord[a] * s for a, s in zip(self.axes, self._strides, strict=True))

    def get_coord(self, rank: int) -> Any:
        """The coordinate of ``rank`` as a namedtuple ``ProcessCoord`` whose fields are the axes."""
        if not 0 <= rank < self.world_size():
            raise ValueError(f"rank {rank} is not in this topology of {self.world_size()} ranks "
                             f"(axes {self.axes}, dims {self.dims})")
        return self.ProcessCoord(*((rank // s) % d for s, d in zip(self._strides, self.dims, strict=True)))

    def get_rank_repr(self, rank: int, omit_axes: Iterable[str] = ("data", "pipe"), inner_sep: str = "_",
                      outer_sep: str = "-") -> str:
        """``rank``'s coordinate as text, e.g. ``model_01`` (axes in ``omit_axes`` left out): the
        piece of a checkpoint file name that tells which slice it holds."""
        omit = frozenset(omit_axes)
        coord = self.get_coord(rank)
        return outer_sep.join(f"{a}{inner_sep}{getattr(coord, a):02d}" for a in self.axes if a not in omit)

    # -- sets of ranks --------------------------------------------------------------------------------
    def filter_match(self, **criteria: int) -> list[int]:
        """The ranks (ascending) whose coordinate matches every ``axis=index`` given."""
        unknown = [a for a in criteria if a not in self.axes]
        if unknown:
            raise ValueError(f"filter_match(): unknown axis {unknown}; this topology has axes {self.axes}")
        return [r for r in range(self.world_size())
                if all(getattr(self.get_coord(r), a) == i for a, i in criteria.items())]

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """The ranks (ascending) whose coordinate along ``axis`` is ``idx``; [] for an unknown axis."""
        if axis not in self.axes:
            return []
        return self.filter_match(**{axis: idx})

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """One list per group along ``axis``: the ranks that differ only in their ``axis`` coordinate,
        ordered by it. Lists come in row-major order of the other axes' coordinates, the order in
        which every rank must create the groups. [] for an axis this topology does not have."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for values in itertools.product(*(range(self.get_dim(a)) for a in others)):
            fixed = dict(zip(others, values, strict=True))
            lists.append([self.get_rank(**fixed, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    # -- helpers --------------------------------------------------------------------------------------
    def _check_range(self, coord: dict[str, int]) -> None:
        for a, i in coord.items():
            d = self.get_dim(a)
            if not 0 <= i < d:
                raise ValueError(f"coordinate {a}={i} is outside axis {a!r} of size {d}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessTopology) and (self.axes, self.dims) == (other.axes, other.dims)

    def __hash__(self) -> int:
        return hash((tuple(self.axes), tuple(self.dims)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axes={self.axes}, dims={self.dims})"


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline × data parallelism: axes (pipe, data); the data-parallel replicas of one stage are
    neighbours, so gradient reductions, the larger traffic, use the nearer links."""

    def __init__(self, num_pp: int, num_dp: int):
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline × data × tensor slicing: axes (pipe, data, model), tensor innermost (see the note at
    the top of this file). The argument order (pipe, model, data) is DeepSpeed's."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int):
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])
