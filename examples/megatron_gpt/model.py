"""A GPT built from shardspeed's tensor-parallel layers, Megatron's way: in each block the fused qkv
projection and the first MLP layer are cut by output features (columns), the attention output and
the second MLP layer by input features (rows), so a block costs two all-reduces forward and two
backward; the vocabulary-parallel embedding is tied to the output head and the loss is computed
on vocabulary-parallel logits (no rank ever holds the full logits).

Parameter names are those of ``examples.gpt_model.GPT`` with tied embeddings, and initial values do
not depend on the tensor-parallel size T: every layer draws its full weight from the same seed and
keeps its slice. (They are not the plain GPT's draws from the same seed: the layers draw in their own
order.) ``load_plain`` gives the unsliced single-process model holding a T = 1 build's values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt_model import GPT, GPTConfig
from shardspeed import checkpointing
from shardspeed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    current_tensor_parallel_group,
    vocab_parallel_cross_entropy,
)
from shardspeed.zero import register_external_parameter


def _gpt2_init(w: torch.Tensor) -> None:
    nn.init.normal_(w, std=0.02)


class ParallelBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        t = current_tensor_parallel_group().world_size
        if c.heads % t:
            raise ValueError(f"heads {c.heads} is not divisible by the tensor-parallel size {t}: each rank must "
                             f"hold whole attention heads")
        self.heads = c.heads // t  # this rank's heads
        self.ln1 = nn.LayerNorm(c.hidden)
        # q, k and v are three blocks of the output: stride 3 gives every rank whole heads of each
        self.qkv = ColumnParallelLinear(c.hidden, 3 * c.hidden, bias=False, gather_output=False, stride=3,
                                        init_method=_gpt2_init)
        self.proj = RowParallelLinear(c.hidden, c.hidden, input_is_parallel=True, init_method=_gpt2_init)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc = ColumnParallelLinear(c.hidden, 4 * c.hidden, gather_output=False, init_method=_gpt2_init)
        self.out = RowParallelLinear(4 * c.hidden, c.hidden, input_is_parallel=True, init_method=_gpt2_init)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, -1)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class ParallelGPT(nn.Module):
    """``forward(tokens, targets=None)``: the mean next-token loss when targets are given, else the
    logits (gathered to the full vocabulary)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.tok = VocabParallelEmbedding(c.vocab, c.hidden, init_method=_gpt2_init)
        self.pos = nn.Embedding(c.seq, c.hidden)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(ParallelBlock(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.hidden)
        # the head is tok.weight used in this module's own forward, outside ``tok``: ZeRO stage 3 must
        # gather it for this forward too (else it reads the released, empty shard once the table is
        # above the persistence threshold)
        register_external_parameter(self, self.tok.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            x = checkpointing.checkpoint(blk, x) if self.c.recompute and self.training else blk(x)
        # the head is the embedding, tied: this rank's vocabulary slice of the logits
        logits = F.linear(copy_to_tensor_parallel_region(self.ln(x)), self.tok.weight)
        if targets is None:
            from shardspeed.tensor_parallel import gather_from_tensor_parallel_region

            return gather_from_tensor_parallel_region(logits)
        return vocab_parallel_cross_entropy(logits.float(), targets, reduction="mean")


def load_plain(state: dict[str, torch.Tensor], c: GPTConfig) -> GPT:
    """The unsliced single-process GPT (``examples.gpt_model``, tied embeddings) holding ``state``, the
    state dict of a ParallelGPT built at T = 1 (or any full state dict of one)."""
    c = GPTConfig(**{**c.__dict__, "tie_embeddings": True})
    plain = GPT(c)
    plain.load_state_dict({**state, "head.weight": state["tok.weight"]})
    return plain
