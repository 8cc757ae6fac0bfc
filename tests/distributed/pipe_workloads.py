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

    def __init__(self, emb: nn.Module, fn=head):
        super().__init__()
        object.__setattr__(self, "emb", emb)
        self.fn = fn

    def forward(self, inp):
        return self.fn(self.emb, inp)


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


def reference(steps: int, dp: int, micro: int, gas: int, lr: float, wd: float, clip: float, seed: int = 0,
              model: nn.Module | None = None):
    """Plain single-process training on the whole global batch: (losses, norms, parameters) per step.
    ``model``: start from it instead of ``reference_model(seed)``."""
    model = reference_model(seed) if model is None else model
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


# -- the same model with tensor-parallel layers (3D: pipe x tensor x data) ----------------------------
# Built after shardspeed.initialize_model_parallel(tensor_parallel_size=T, ...), each layer keeps its
# slice; without a unit (the reference's process) they are the unsliced layers. Initial values come
# from seed_layers (one seed per layer index), and the tensor-parallel layers draw the full tensor
# before slicing, so every T starts from the same model.


def _tp_classes():
    from shardspeed.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class TPEmbed(VocabParallelEmbedding):
        """ids -> (hidden, mask), the table's rows (vocabulary) sliced."""

        def forward(self, ids):
            return super().forward(ids), (ids % 3) != 0

    class TPBlock(Block):
        """Block with fc1 cut by columns and fc2 by rows (Megatron's MLP); same parameter names."""

        def __init__(self, hidden: int):
            nn.Module.__init__(self)
            self.ln = nn.LayerNorm(hidden)
            self.fc1 = ColumnParallelLinear(hidden, 2 * hidden, gather_output=False)
            self.fc2 = RowParallelLinear(2 * hidden, hidden, input_is_parallel=True)

    return TPEmbed, TPBlock


def tp_head(emb: nn.Module, inp):
    """The tied head on the vocabulary-sliced table: this rank's slice of the logits (the input's
    gradient is summed over the tensor-parallel ranks by the copy)."""
    from shardspeed.tensor_parallel import copy_to_tensor_parallel_region

    return F.linear(copy_to_tensor_parallel_region(inp[0], emb.tp), emb.weight)


def tp_loss_fn(logits, labels):
    from shardspeed.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), labels, reduction="mean")


def tp_layers(blocks: int = 3):
    from shardspeed.pipe import LayerSpec, TiedLayerSpec

    embed, block = _tp_classes()
    return ([TiedLayerSpec("emb", embed, VOCAB, HIDDEN)] + [LayerSpec(block, HIDDEN) for _ in range(blocks)]
            + [TiedLayerSpec("emb", embed, VOCAB, HIDDEN, forward_fn=tp_head)])


def tp_reference_model(blocks: int = 3) -> nn.Sequential:
    """``tp_layers()`` unsliced (call with no model-parallel unit), seeded as ``seed_layers=True``
    seeds them, as one ``nn.Sequential``."""
    from shardspeed.pipe import PipelineModule

    built = PipelineModule(tp_layers(blocks), num_stages=1, stage_id=0, seed_layers=True)
    emb = built.tied_modules["emb"]
    return nn.Sequential(emb, *[getattr(built, str(i)) for i in range(1, blocks + 1)], Head(emb, tp_head))
