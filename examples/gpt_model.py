"""A small GPT-2-style decoder used by the demo, the benchmarks and the parity tests.

The qkv projection has no bias: under softmax attention the key bias gets a mathematically zero
gradient, i.e. pure rounding noise, which Adam turns into full-size updates and which would make
two correct implementations disagree (see CONVENTIONS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shardspeed import checkpointing


@dataclass
class GPTConfig:
    vocab: int = 8192
    seq: int = 128
    layers: int = 6
    hidden: int = 512
    heads: int = 8
    dropout: float = 0.0
    tie_embeddings: bool = False
    recompute: bool = False  # activation checkpointing per block (shardspeed.checkpointing)


class Linear(nn.Linear):
    """GPT-2's init (normal 0.02, zero bias) done in the module's own constructor, so it also runs
    when the model is built partitioned under ``shardspeed.zero.Init``."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads
        self.ln1 = nn.LayerNorm(c.hidden)
        self.qkv = Linear(c.hidden, 3 * c.hidden, bias=False)
        self.proj = Linear(c.hidden, c.hidden)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc = Linear(c.hidden, 4 * c.hidden)
        self.out = Linear(4 * c.hidden, c.hidden)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """``forward(tokens, targets=None)``: logits, or the mean next-token loss when targets are given."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.tok = Embedding(c.vocab, c.hidden)
        self.pos = Embedding(c.seq, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.hidden)
        self.head = Linear(c.hidden, c.vocab, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for blk in self.blocks:
            x = checkpointing.checkpoint(blk, x) if self.c.recompute and self.training else blk(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def synthetic_batch(step: int, batch: int, seq: int, vocab: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic tokens with learnable structure: x[t+1] = 31*x[t]+7 mod V with probability 0.9."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.empty(batch, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    noise = torch.rand(batch, seq, generator=g) > 0.9
    rnd = torch.randint(0, vocab, (batch, seq), generator=g)
    for t in range(seq):
        nxt = (31 * x[:, t] + 7) % vocab
        x[:, t + 1] = torch.where(noise[:, t], rnd[:, t], nxt)
    return x[:, :-1], x[:, 1:]
