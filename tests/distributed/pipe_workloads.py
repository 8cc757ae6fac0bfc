"""A tiny tied-embedding language model as pipeline layers, and its single-process reference.

Three blocks on two stages (uniform: the embedding and two blocks, then a block and the head) give
the stages different ZeRO layouts, so the tied table's shards differ between the stages holding it
(the case pipe_tied.py assembles over the data-parallel group). Between stages travels a structure,
not a tensor: ``(hidden, mask)`` with a bool mask the blocks apply, so the parity runs also carry a
non-float tensor through every boundary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, HIDDEN, SEQ = 64, 8, 4


class Embed(nn.Embedding):
    """ids -> (hidden, mask): the mask marks which positions the blocks update."""

    def forward(self, ids):
        return super().forward(ids), (ids % 3) != 0


class Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, inp):
        h, mask = inp
        return h + mask.unsqueeze(-1) * self.fc2(torch.tanh(self.fc1(self.ln(h)))), mask


def head(emb: nn.Module, inp):
    """The output projection, tied to the embedding's table."""
    return inp[0] @ emb.weight.t()


class Head(nn.Module):
    """The reference's head: uses the embedding's table without registering it a second time."""

    def __init__(self, emb: nn.Module):
        super().__init__()
        object.__setattr__(self, "emb", emb)

    def forward(self, inp):
        return head(self.emb, inp)


def loss_fn(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1))


def layers(blocks: int = 3):
    from shardspeed.pipe import LayerSpec, TiedLayerSpec

    return ([TiedLayerSpec("emb", Embed, VOCAB, HIDDEN)] + [LayerSpec(Block, HIDDEN) for _ in range(blocks)]
            + [TiedLayerSpec("emb", Embed, VOCAB, HIDDEN, forward_fn=head)])


def reference_model(seed: int = 0, blocks: int = 3) -> nn.Sequential:
    """The same layers as ``layers()`` in one ``nn.Sequential`` (state_dict names = layer indices)."""
    torch.manual_seed(seed)
    emb = Embed(VOCAB, HIDDEN)
    return nn.Sequential(emb, *[Block(HIDDEN) for _ in range(blocks)], Head(emb))


def micro_batches(step: int, dp_rank: int, dp: int, micro: int, gas: int):
    """Data-parallel rank ``dp_rank``'s ``gas`` micro-batches ``(ids, labels)`` of global step ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    n = micro * gas * dp
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [(ids[s:s + micro], labels[s:s + micro]) for s in ((k * dp + dp_rank) * micro for k in range(gas))]


def reference(steps: int, dp: int, micro: int, gas: int, lr: float, wd: float, clip: float, seed: int = 0):
    """Plain single-process training on the whole global batch: (losses, norms, parameters) per step."""
    model = reference_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    losses, norms, states = [], [], []
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        batches = [b for d in range(dp) for b in micro_batches(step, d, dp, micro, gas)]
        for ids, labels in batches:
            loss = loss_fn(model(ids), labels) / len(batches)
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        losses.append(total)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return losses, norms, states
