"""The region mappings: where activations enter and leave a tensor-parallel region, each an autograd
function whose backward is the adjoint of its forward.

[Note: the four mappings and their adjoints]
In a tensor-parallel region every rank computes on its slice; outside it every rank holds the same
(replicated) tensor. Crossing the boundary is one of four maps (Megatron-LM's paper calls the
first two f and g):

===========================  =====================================  ===============================
function                     forward                                backward
===========================  =====================================  ===============================
copy_to_…_region             identity (replicated → every rank)     all-reduce the gradient
reduce_from_…_region         all-reduce the partial sums            identity
scatter_to_…_region          keep this rank's slice of the last dim all-gather the last dim
gather_from_…_region         all-gather the last dim                keep this rank's slice
===========================  =====================================  ===============================

Sequence parallelism (Korthikanti et al., 2022) cuts the replicated regions (LayerNorm, dropout)
along the sequence instead, so the all-reduce of a row-parallel layer becomes a reduce-scatter
into sequence chunks and the copy before a column-parallel layer an all-gather of them:

=======================================  =======================  =====================================
function                                 forward                  backward
=======================================  =======================  =====================================
scatter_to_sequence_parallel_region      keep this rank's chunk   all-gather the chunks
gather_from_sequence_parallel_region     all-gather the chunks    reduce-scatter (the consumer was
                                                                  tensor-parallel: partial gradients)
                                                                  or keep this rank's chunk
reduce_scatter_to_sequence_parallel_…    reduce-scatter           all-gather
=======================================  =======================  =====================================

Collectives never write into a tensor autograd handed us (an input, or a gradient that may be a
view shared with another consumer): each works on a fresh buffer. With one rank every map is the
identity and issues nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from shardspeed.comm import ProcessGroup, all_gather, all_reduce, reduce_scatter
from shardspeed.tensor_parallel.groups import TensorParallelGroup, resolve

Group = ProcessGroup | TensorParallelGroup | None


# -- the collectives along one dimension ------------------------------------------------------------
def _reduce(x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    all_reduce(out, group=tp.group)
    return out


def _split(x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    if x.shape[dim] % tp.world_size:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} into {tp.world_size} "
                         f"equal tensor-parallel pieces (shape {tuple(x.shape)})")
    return x.chunk(tp.world_size, dim=dim)[tp.rank].contiguous()


def _gather(x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    x = x.contiguous()
    flat = torch.empty(tp.world_size * x.numel(), dtype=x.dtype, device=x.device)
    all_gather(flat, x.view(-1), group=tp.group)
    return torch.cat(flat.view(tp.world_size, *x.shape).unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
    if tp.world_size == 1:
        return x
    if x.shape[dim] % tp.world_size:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {tp.world_size} "
                         f"tensor-parallel ranks (shape {tuple(x.shape)}): the sequence length must be a "
                         f"multiple of the tensor-parallel size")
    pieces = torch.stack(x.chunk(tp.world_size, dim=dim))  # rank r's piece is row r, contiguous
    out = torch.empty(pieces.shape[1:], dtype=x.dtype, device=x.device)
    reduce_scatter(out.view(-1), pieces.view(-1), group=tp.group)
    return out


# -- the autograd functions -------------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)  # a new autograd node, same data

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _reduce(grad, ctx.tp), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallelGroup) -> torch.Tensor:
        return _reduce(x, tp) if tp.world_size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return _split(x, dim, tp) if tp.world_size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _gather(grad, ctx.dim, ctx.tp), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return _gather(x, dim, tp) if tp.world_size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _split(grad, ctx.dim, ctx.tp), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TensorParallelGroup, partial_grad: bool) -> torch.Tensor:
        ctx.dim, ctx.tp, ctx.partial_grad = dim, tp, partial_grad
        return _gather(x, dim, tp) if tp.world_size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.partial_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.tp), None, None, None
        return _split(grad, ctx.dim, ctx.tp), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, tp: TensorParallelGroup) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return _reduce_scatter(x, dim, tp) if tp.world_size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _gather(grad, ctx.dim, ctx.tp), None, None


# -- the public maps ----------------------------------------------------------------------------------
def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over the tensor-parallel ``group`` in backward.
    ``group`` None: the current model-parallel unit's tensor-parallel group (none: identity)."""
    return _CopyToRegion.apply(x, resolve(group))


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """All-reduce (sum) of the ranks' partial results forward; identity backward."""
    return _ReduceFromRegion.apply(x, resolve(group))


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """This rank's 1/T of the last dimension forward; all-gather of the gradient backward."""
    return _ScatterToRegion.apply(x, -1, resolve(group))


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along the last dimension, in rank order; backward keeps
    this rank's slice of the gradient."""
    return _GatherFromRegion.apply(x, -1, resolve(group))


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group = None, sequence_dim: int = 0) -> torch.Tensor:
    """This rank's chunk of the sequence (dimension ``sequence_dim``) forward; all-gather backward."""
    return _ScatterToRegion.apply(x, sequence_dim, resolve(group))


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group = None, sequence_dim: int = 0,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather of the sequence chunks forward. Backward reduce-scatters the gradient when the
    output fed a tensor-parallel computation (each rank's gradient is a partial sum), otherwise it
    keeps this rank's chunk (``tensor_parallel_output_grad=False``: the gradient is replicated)."""
    return _GatherFromSequence.apply(x, sequence_dim, resolve(group), tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group = None,
                                               sequence_dim: int = 0) -> torch.Tensor:
    """Sum of the ranks' partial results, each rank keeping its sequence chunk; all-gather backward."""
    return _ReduceScatterToSequence.apply(x, sequence_dim, resolve(group))
