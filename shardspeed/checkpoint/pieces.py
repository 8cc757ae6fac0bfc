"""Re-slicing saved pieces into whatever layout the loading run has. Pure tensor code.

A saved piece is (flat start, length, values, {state key: slice}, {state key: scalar}) of one
parameter, in the coordinates of the tensor its writer held. A wanted piece is a range of a
parameter in the loading run's layout. Every saved/wanted pair that overlaps contributes the
overlap; together the saved pieces cover every element exactly once (written by the ranks of one
run), so every wanted element is filled.

[Note: slices in checkpoints] Under tensor parallelism the tensor a rank holds is its slice of
the parameter (tensor_parallel/meta.py, Note: the slice mark). The manifest records each sliced
parameter's full shape, cut dimension, stride and the tensor-parallel size, and each rank file its
writer's tensor-parallel rank, so every saved element has a place in the full tensor. Loading maps
both sides through it: an element of the loading rank's slice at (T', r') has a full index, which
names the saved slice of T holding it and the element in that slice. The same cut on both sides
(or no slicing on either) needs no index arithmetic: flat ranges compare directly.

[Note: the geometry of a cut] Cut along ``dim`` with ``stride`` s into T slices, a full tensor of
shape (..., D, ...) is viewed as (A, s, T, per, B), with A the product of the dimensions before
``dim``, B of those after and per = D / (s T): rank r holds [:, :, r], i.e. (A, s, per, B), which
is what ``take_slice`` cuts (the r-th 1/T of each of the s blocks, blocks in order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from shardspeed.checkpoint.files import CheckpointError
from shardspeed.tensor_parallel.meta import SliceSpec

CHUNK = 1 << 22  # elements whose full indices are computed at once: bounds the int64 temporaries


def split_state(state: dict[str, Any], master: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's per-tensor state: per-element tensors (same size as ``master``) and the rest."""
    per_element, scalars = {}, {}
    for k, v in state.items():
        if torch.is_tensor(v) and v.shape == master.shape:
            per_element[k] = v
        else:
            scalars[k] = v
    return per_element, scalars


@dataclass(frozen=True)
class SliceLayout:
    """Slice ``rank`` of ``world`` of a tensor of full shape ``shape``, cut along ``dim`` into
    ``stride`` blocks (Note: the geometry of a cut)."""

    shape: tuple[int, ...]
    dim: int
    stride: int
    world: int
    rank: int

    def _sizes(self) -> tuple[int, int]:
        """(elements of one outer row of the slice, elements of one of its blocks): s*per*B, per*B."""
        block = self.shape[self.dim] // (self.stride * self.world) * math.prod(self.shape[self.dim + 1:])
        return self.stride * block, block

    def to_full(self, local: torch.Tensor) -> torch.Tensor:
        """Flat indices into this slice -> flat indices into the full tensor."""
        row, block = self._sizes()
        outer, rest = local // row, local % row
        b, rest = rest // block, rest % block
        return (outer * self.stride + b) * (self.world * block) + self.rank * block + rest

    def from_full(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices into the full tensor -> (rank whose slice holds each, flat index in it)."""
        row, block = self._sizes()
        outer, rest = full // (row * self.world), full % (row * self.world)
        b, rest = rest // (self.world * block), rest % (self.world * block)
        rank, rest = rest // block, rest % block
        return rank, outer * row + b * block + rest

    def same_cut(self, other: SliceLayout | None) -> bool:
        return other is not None and (self.shape, self.dim, self.stride, self.world) == (
            other.shape, other.dim, other.stride, other.world)


def layout_for(name: str, full_shape: tuple[int, ...], spec: SliceSpec | None, world: int, rank: int,
               held: tuple[int, ...] | None = None) -> SliceLayout | None:
    """How rank ``rank`` of a ``world``-way tensor-parallel group holds parameter ``name``: a slice
    layout, or None when it holds the whole tensor. ``held``: the shape that rank has, checked
    against the cut. Every refusal names the parameter and the sizes."""
    full_shape = tuple(int(d) for d in full_shape)
    if spec is None or world == 1:
        if held is not None and tuple(held) != full_shape:
            raise CheckpointError(f"parameter '{name}' has shape {full_shape} in the checkpoint, but this model "
                                  f"holds it whole as {tuple(held)}")
        return None
    if not 0 <= spec.dim < len(full_shape):
        raise CheckpointError(f"parameter '{name}' of shape {full_shape} is marked as cut along dim {spec.dim}, "
                              "which it does not have")
    size = full_shape[spec.dim]
    if size % (world * spec.stride):
        blocks = f" ({spec.stride} blocks each cut {world} ways)" if spec.stride > 1 else ""
        mine = f"; this model holds {tuple(held)} per rank" if held is not None else ""
        raise CheckpointError(f"parameter '{name}' of full shape {full_shape} cannot be cut into {world} "
                              f"tensor-parallel slices along dim {spec.dim}{blocks}: {size} is not divisible by "
                              f"{world * spec.stride}{mine}")
    if held is not None:
        want = list(full_shape)
        want[spec.dim] = size // world
        if tuple(held) != tuple(want):
            got = list(held)
            got[spec.dim] *= world
            raise CheckpointError(f"parameter '{name}' has full shape {full_shape} in the checkpoint, but this model "
                                  f"at tensor-parallel size {world} holds {tuple(held)} per rank: a full shape of "
                                  f"{tuple(got)}")
    return SliceLayout(full_shape, spec.dim, spec.stride, world, rank)


Index = slice | torch.Tensor


def transfers(dest: tuple[int, int], dest_layout: SliceLayout | None, saved: list[tuple[int, int, int]],
              cut: SliceLayout | None) -> Iterator[tuple[int, Index, Index]]:
    """Which saved elements land where in a wanted range: (k, index into the wanted range, index
    into saved piece k). ``dest`` is (flat start, length) in the loading rank's tensor; ``saved``
    lists (flat start, length, writer's tensor-parallel rank) in the writers' tensors, all cut as
    ``cut`` (None: whole tensors; its rank is not used). Slices where both sides share coordinates,
    index tensors otherwise (Note: slices in checkpoints)."""
    d0, dn = dest
    if (dest_layout is None and cut is None) or (dest_layout is not None and dest_layout.same_cut(cut)):
        for k, (s0, sn, rank) in enumerate(saved):
            if dest_layout is not None and rank != dest_layout.rank:
                continue  # another slice of the same cut: no element in common
            lo, hi = max(d0, s0), min(d0 + dn, s0 + sn)
            if lo < hi:
                yield k, slice(lo - d0, hi - d0), slice(lo - s0, hi - s0)
        return
    for at in range(0, dn, CHUNK):
        local = torch.arange(d0 + at, d0 + min(dn, at + CHUNK), dtype=torch.int64)
        full = dest_layout.to_full(local) if dest_layout is not None else local
        owner, idx = cut.from_full(full) if cut is not None else (None, full)
        for k, (s0, sn, rank) in enumerate(saved):
            hit = (idx >= s0) & (idx < s0 + sn)
            if owner is not None:
                hit &= owner == rank
            where = hit.nonzero().squeeze(1)
            if where.numel():
                yield k, where + at, idx[where] - s0


def copy_into(dest: torch.Tensor, src: torch.Tensor, d: Index, s: Index) -> int:
    """``dest[d] = src[s]`` on flat tensors (``src`` read from a file on the host, ``dest`` on any
    device, in any dtype); returns the elements written."""
    dest[d] = src[s].to(device=dest.device, dtype=dest.dtype)
    return (d.stop - d.start) if isinstance(d, slice) else d.numel()
