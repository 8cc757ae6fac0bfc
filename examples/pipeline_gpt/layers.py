"""The pipeline GPT's layers, as a plan of (class, arguments, tie) entries that any pipeline library
turns into its own layer specifications: shardspeed's and DeepSpeed's ``LayerSpec``/``TiedLayerSpec``
take the same arguments, and ``build_layers`` builds them as plain modules for
``torch.distributed.pipelining`` or an ``nn.Sequential``.

The model is ``examples.gpt_model.GPT``'s, cut into a list:

    0  token embedding          (tie "embed": its table is also the output head)
    1  + positional embedding
    2 .. L+1  transformer blocks
    L+2  final LayerNorm
    L+3  output head            (the embedding again, with ``lm_head`` as its forward)

with the loss ``next_token_loss(logits, labels)``. With ``tp > 1`` the embedding is cut by vocabulary
rows, the blocks are ``examples.megatron_gpt``'s tensor-parallel blocks, the head gives this rank's
vocabulary slice of the logits and the loss is the vocabulary-parallel cross-entropy. ``tied=False``
gives the head a weight of its own (``Head``), for libraries that cannot tie across stages.

This file needs only torch (and ``examples.gpt_model``) for ``tp == 1``, so the same layers can be
built in DeepSpeed's virtual environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt_model import Block, GPTConfig

__all__ = ["AddPosition", "Block", "Head", "Layer", "TokenEmbedding", "build_layers", "gpt_layer_plan", "lm_head",
           "next_token_loss", "to_specs"]


class TokenEmbedding(nn.Embedding):
    """Token ids -> vectors, GPT-2's init (normal, std 0.02)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class AddPosition(nn.Module):
    """Adds the learned position vectors (positions 0..T-1 of the input)."""

    def __init__(self, seq: int, hidden: int):
        super().__init__()
        self.pos = TokenEmbedding(seq, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos(torch.arange(x.shape[1], device=x.device))


class Head(nn.Module):
    """The untied output head: ``x @ weight.T`` with a [vocab, hidden] weight of its own."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def lm_head(embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tied head: the embedding table used as the output projection (``forward_fn`` of the
    head's ``TiedLayerSpec``)."""
    return F.linear(x, embedding.weight)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (``labels`` are the inputs shifted by one)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


@dataclass
class Layer:
    """One entry of the plan: ``cls(*args, **kwargs)``; ``tie`` names a tie key (then ``forward_fn``
    may replace the module's forward at this occurrence)."""

    cls: Callable[..., nn.Module]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tie: str | None = None
    forward_fn: Callable[[nn.Module, Any], Any] | None = None


def gpt_layer_plan(c: GPTConfig, tp: int = 1, tied: bool = True) -> tuple[list[Layer], Callable[..., torch.Tensor]]:
    """(layers, loss_fn) of the GPT ``c`` cut into embedding, position, blocks, final norm and head."""
    if tp > 1:
        from examples.pipeline_gpt.parallel_layers import (
            ParallelBlock,
            ParallelTokenEmbedding,
            parallel_lm_head,
            parallel_next_token_loss,
        )

        if not tied:
            raise ValueError("gpt_layer_plan: the tensor-parallel GPT ties its head to the embedding (tied=True)")
        if c.vocab % tp:
            raise ValueError(f"gpt_layer_plan: vocab {c.vocab} is not a multiple of the tensor-parallel size {tp}; "
                             f"pad it so each rank holds whole rows")
        embed, block, head_fn, loss = ParallelTokenEmbedding, ParallelBlock, parallel_lm_head, parallel_next_token_loss
    else:
        embed, block, head_fn, loss = TokenEmbedding, Block, lm_head, next_token_loss
    layers = [Layer(embed, (c.vocab, c.hidden), tie="embed" if tied else None), Layer(AddPosition, (c.seq, c.hidden))]
    layers += [Layer(block, (c,)) for _ in range(c.layers)]
    layers.append(Layer(nn.LayerNorm, (c.hidden,)))
    layers.append(Layer(embed, (c.vocab, c.hidden), tie="embed", forward_fn=head_fn) if tied
                  else Layer(Head, (c.vocab, c.hidden)))
    return layers, loss


def to_specs(plan: list[Layer], layer_spec: type, tied_layer_spec: type) -> list[Any]:
    """The plan as a library's specs: ``layer_spec(cls, *args, **kwargs)`` and ``tied_layer_spec(key,
    cls, *args, forward_fn=..., **kwargs)`` (shardspeed.pipe's or deepspeed.pipe's classes)."""
    out = []
    for layer in plan:
        if layer.tie is None:
            out.append(layer_spec(layer.cls, *layer.args, **layer.kwargs))
        else:
            out.append(tied_layer_spec(layer.tie, layer.cls, *layer.args, forward_fn=layer.forward_fn,
                                       **layer.kwargs))
    return out


class Apply(nn.Module):
    """``fn(module, x)`` as a module (a tied occurrence with a ``forward_fn``)."""

    def __init__(self, fn: Callable[[nn.Module, Any], Any], module: nn.Module):
        super().__init__()
        self.fn, self.inner = fn, module

    def forward(self, x: Any) -> Any:
        return self.fn(self.inner, x)


def build_layers(plan: list[Layer], indices: range | None = None, base_seed: int | None = 1234) -> list[nn.Module]:
    """Plain modules for ``plan[i]``, i in ``indices`` (default all), each built under the seed
    ``base_seed + i`` (a tie under its first index in the whole plan), as ``PipelineModule(...,
    seed_layers=True)`` does in shardspeed and DeepSpeed; occurrences of one tie share one module."""
    indices = range(len(plan)) if indices is None else indices
    first: dict[str, int] = {}
    for i, layer in enumerate(plan):
        if layer.tie is not None:
            first.setdefault(layer.tie, i)
    tied: dict[str, nn.Module] = {}
    out = []
    with torch.random.fork_rng(devices=[]) if base_seed is not None else contextlib.nullcontext():
        for i in indices:
            layer = plan[i]
            if layer.tie is not None:
                if layer.tie not in tied:
                    if base_seed is not None:
                        torch.manual_seed(base_seed + first[layer.tie])
                    tied[layer.tie] = layer.cls(*layer.args, **layer.kwargs)
                module = tied[layer.tie]
                out.append(module if layer.forward_fn is None else Apply(layer.forward_fn, module))
            else:
                if base_seed is not None:
                    torch.manual_seed(base_seed + i)
                out.append(layer.cls(*layer.args, **layer.kwargs))
    return out
