"""The pipeline GPT's tensor-parallel layers (T > 1): the embedding cut by vocabulary rows, tied to a
head that gives this rank's vocabulary slice of the logits, and the vocabulary-parallel loss. The
blocks are ``examples.megatron_gpt``'s ``ParallelBlock``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.megatron_gpt.model import ParallelBlock
from shardspeed.tensor_parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    vocab_parallel_cross_entropy,
)

__all__ = ["ParallelBlock", "ParallelTokenEmbedding", "parallel_lm_head", "parallel_next_token_loss"]


def _gpt2_init(w: torch.Tensor) -> None:
    nn.init.normal_(w, std=0.02)


class ParallelTokenEmbedding(VocabParallelEmbedding):
    """This rank's rows of the token table (full table drawn, GPT-2's init, slice kept)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__(vocab, hidden, init_method=_gpt2_init)


def parallel_lm_head(embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tied head at T > 1: this rank's vocabulary slice of the logits."""
    return F.linear(copy_to_tensor_parallel_region(x), embedding.weight)


def parallel_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on vocabulary-parallel logits (no rank holds them all)."""
    return vocab_parallel_cross_entropy(logits.float(), labels, reduction="mean")
