"""Which parameters are slices of a larger tensor, and how to put them back together.

A tensor-parallel layer marks each parameter it slices; everything else (norms, ZeRO, checkpoints,
the planner, ``zero_to_fp32``) reads the mark and never asks which layer made the parameter.

[Note: the slice mark]
The attribute names are Megatron's, so a model written for Megatron reads the same:
- ``tensor_model_parallel`` (bool): this rank holds one of T slices along ``partition_dim``.
- ``partition_dim`` (int): the dimension that was cut.
- ``partition_stride`` (int): 1 for a plain cut (rank r holds rows [r*n/T, (r+1)*n/T)); s > 1 when
  the full dimension is s blocks each cut T ways (a fused qkv of three blocks: stride 3), so rank r
  holds the r-th 1/T of every block.
An unmarked parameter is replicated on every tensor-parallel rank: it is counted once in norms and
saved once. Pure functions of the mark; no process groups here.

[Note: sequence-parallel parameters]
``sequence_parallel`` (bool) marks a replicated parameter used in a sequence-parallel region
(a LayerNorm's weight, a row-parallel bias added after the reduce-scatter): each rank sees only its
chunk of the sequence, so its gradient there is a partial sum. The layer that uses it reduces it
itself: it passes the parameter through ``copy_to_tensor_parallel_region`` in forward, so autograd
delivers the sum over the tensor-parallel group to ``.grad``, at every micro-batch, before any
hook of the engine or ZeRO sees it. Nobody else reduces it again; for norms, ZeRO and checkpoints
it is an ordinary replicated parameter. The mark only says where it was used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SliceSpec:
    dim: int
    stride: int = 1


def mark_sliced(param: torch.Tensor, dim: int, stride: int = 1) -> None:
    """Mark ``param`` as this rank's slice of a tensor cut along ``dim`` (with ``stride`` blocks)."""
    if stride < 1:
        raise ValueError(f"partition_stride must be >= 1, got {stride}")
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    param.partition_stride = stride  # type: ignore[attr-defined]


def slice_spec(param: torch.Tensor) -> SliceSpec | None:
    """The slice mark of ``param``, or None when it is replicated across the tensor-parallel group."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return SliceSpec(int(param.partition_dim), int(getattr(param, "partition_stride", 1)))


def mark_sequence_parallel(param: torch.Tensor) -> None:
    """Mark a replicated parameter whose layer all-reduces its gradient over the tensor-parallel
    group (see the note on sequence-parallel parameters)."""
    param.sequence_parallel = True  # type: ignore[attr-defined]


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "sequence_parallel", False))


def copy_slice_mark(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Carry the mark to a tensor that stands for the same parameter (a master copy, a flat view)."""
    spec = slice_spec(src)
    if spec is not None:
        mark_sliced(dst, spec.dim, spec.stride)


def slice_ranges(full_size: int, world: int, rank: int, stride: int = 1) -> list[tuple[int, int]]:
    """The [start, end) ranges of the full dimension that ``rank`` of ``world`` holds, in order."""
    if full_size % (world * stride):
        raise ValueError(f"a dimension of {full_size} cannot be cut into {world} slices of {stride} "
                         f"block(s): {full_size} is not divisible by {world * stride}")
    block = full_size // stride
    per = block // world
    return [(b * block + rank * per, b * block + (rank + 1) * per) for b in range(stride)]


def take_slice(full: torch.Tensor, spec: SliceSpec, world: int, rank: int) -> torch.Tensor:
    """This rank's slice of a full tensor (a copy, contiguous)."""
    parts = [full.narrow(spec.dim, a, b - a) for a, b in slice_ranges(full.shape[spec.dim], world, rank, spec.stride)]
    return torch.cat(parts, dim=spec.dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


def join_slices(slices: list[torch.Tensor], spec: SliceSpec) -> torch.Tensor:
    """The full tensor from every rank's slice, in rank order (the inverse of ``take_slice``)."""
    if spec.stride == 1:
        return torch.cat(slices, dim=spec.dim)
    blocks = [s.chunk(spec.stride, dim=spec.dim) for s in slices]
    return torch.cat([blocks[r][b] for b in range(spec.stride) for r in range(len(slices))], dim=spec.dim)
