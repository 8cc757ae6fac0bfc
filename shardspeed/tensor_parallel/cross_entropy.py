"""Cross-entropy over logits whose vocabulary is split across the tensor-parallel ranks (the output of
a ``ColumnParallelLinear(gather_output=False)`` head, or of a head tied to a ``VocabParallelEmbedding``),
without ever gathering the full logits.

[Note: the stable sum over slices]
loss = log Σ_v exp(z_v − m) − (z_target − m), with m the maximum over the whole vocabulary. Each rank
holds a slice of v, so: (1) all-reduce(max) of the local maxima gives m; (2) each rank sums
exp(z − m) over its slice and picks z_target − m if it holds the target (0 otherwise); one
all-reduce(sum) of the pair [picked, sum-exp] completes both. Subtracting the global m keeps every
exp ≤ 1 (no overflow), and only two small tensors per token cross the wire. The gradient is
softmax − one_hot(target), computed on each rank's slice from the saved softmax: backward needs
no communication. The arithmetic is in fp32 whatever the logits' dtype; the loss is returned in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from shardspeed.comm import all_reduce
from shardspeed.tensor_parallel.groups import TensorParallelGroup, resolve
from shardspeed.tensor_parallel.mappings import Group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, tp: TensorParallelGroup,
                ignore_index: int) -> torch.Tensor:
        z = logits.float()
        local_vocab = z.shape[-1]
        start = tp.rank * local_vocab
        m = z.max(dim=-1).values
        if tp.world_size > 1:
            all_reduce(m, op="max", group=tp.group)
        shifted = z - m.unsqueeze(-1)
        ignored = target == ignore_index
        elsewhere = (target < start) | (target >= start + local_vocab) | ignored
        local_target = (target - start).masked_fill(elsewhere, 0)
        picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(elsewhere, 0.0)
        exp = shifted.exp_()  # in place: ``shifted`` is our own tensor and not needed any more
        both = torch.stack([picked, exp.sum(dim=-1)])
        if tp.world_size > 1:
            all_reduce(both, group=tp.group)
        picked, sum_exp = both.unbind(0)
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, elsewhere, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        softmax, local_target, elsewhere, ignored = ctx.saved_tensors
        grad = softmax.clone()  # the saved one stays valid for a second backward (retain_graph)
        one_hot = (~elsewhere).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot)
        grad.masked_fill_(ignored.unsqueeze(-1), 0.0)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                                 reduction: str = "none", group: Group = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (``[..., vocab / T]``, this rank's slice of the vocabulary, in
    rank order) against ``target`` (``[...]``, indices into the full vocabulary).

    Args:
        ignore_index: targets with this value contribute 0 loss and no gradient.
        reduction: "none" (per-token losses, shape of ``target``, as Megatron's), "mean" (over the
            tokens not ignored, as ``F.cross_entropy``), or "sum".
        group: the tensor-parallel group; default: the current model-parallel unit's.

    Returns:
        the loss in fp32, equal to ``F.cross_entropy`` on the gathered logits.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} must be target's shape "
                         f"{tuple(target.shape)} plus a last (vocabulary) dimension")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    loss = _VocabParallelCrossEntropy.apply(logits, target, resolve(group), ignore_index)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    return loss
