"""A tensor-parallel GPT written by hand for the engine's tests (the library's own layers are tested
elsewhere): the full model is drawn from one seed and each rank keeps its slices, marked with
``tensor_parallel.meta``; the two region mappings Megatron needs are small autograd functions
here. With T = 1 it is an ordinary model (no marks, no collectives): the single-process reference.

Sliced: the fused qkv (rows, stride 3: q, k, v each cut), the attention output (columns), the MLP's
fc (rows, and its bias) and out (columns). Replicated: embeddings, LayerNorms, the row-parallel
biases (added after the all-reduce), the head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt_model import synthetic_batch
from shardspeed import checkpointing
from shardspeed.tensor_parallel.meta import SliceSpec, mark_sliced, take_slice


@dataclass(frozen=True)
class TPConfig:
    vocab: int = 64
    seq: int = 16
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    ffn: int = 128


class GridMPU:
    """Megatron's layout for T x D (x P) ranks, tensor innermost, then data, then pipe; DeepSpeed's
    and Megatron's method names. Every rank builds every group, in the same order."""

    def __init__(self, tp: int, pp: int = 1):
        from shardspeed.comm import get_rank, get_world_size, new_group

        world, rank = get_world_size(), get_rank()
        dp = world // (tp * pp)
        self.tp, self.dp, self.pp = tp, dp, pp
        self.p, rest = divmod(rank, dp * tp)
        self.d, self.t = divmod(rest, tp)

        def at(p, d, t):
            return p * dp * tp + d * tp + t

        def build(lists):
            mine = None
            for ranks in lists:
                g = new_group(ranks)
                if rank in ranks:
                    mine = g
            return mine

        self.tp_group = build([[at(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)])
        self.dp_group = build([[at(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)])
        self.pp_group = build([[at(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)])
        self.mp_group = build([[at(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)])

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self):
        return self.d

    def get_data_parallel_world_size(self):
        return self.dp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self):
        return self.p * self.tp + self.t

    def get_model_parallel_world_size(self):
        return self.tp * self.pp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.t

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group


class _CopyToTP(torch.autograd.Function):
    """Into a sliced layer: identity forward; the input's gradient is summed over the slices."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        from shardspeed.comm import all_reduce

        g = g.contiguous().clone()
        all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """Out of a row-parallel layer: partial sums added over the slices; gradient passes through."""

    @staticmethod
    def forward(ctx, x, group):
        from shardspeed.comm import all_reduce

        x = x.contiguous().clone()
        all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class TPBlock(nn.Module):
    def __init__(self, c: TPConfig, tp: int, group):
        super().__init__()
        self.c, self.tp, self.group = c, tp, group
        self.ln1 = nn.LayerNorm(c.hidden)
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden, bias=False)  # no bias: see examples/gpt_model.py
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc = nn.Linear(c.hidden, c.ffn)
        self.out = nn.Linear(c.ffn, c.hidden)

    def _into(self, x):
        return _CopyToTP.apply(x, self.group) if self.tp > 1 else x

    def _out_of(self, x):
        return _ReduceFromTP.apply(x, self.group) if self.tp > 1 else x

    def forward(self, x):
        b, t, d = x.shape
        heads, hd = self.c.heads // self.tp, d // self.c.heads
        q, k, v = F.linear(self._into(self.ln1(x)), self.qkv.weight).view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, heads * hd)
        x = x + self._out_of(F.linear(a, self.proj.weight)) + self.proj.bias
        h = F.gelu(F.linear(self._into(self.ln2(x)), self.fc.weight, self.fc.bias))
        return x + self._out_of(F.linear(h, self.out.weight)) + self.out.bias


# (parameter suffix, dim, stride) of every sliced parameter of a block
SLICED = [("qkv.weight", 0, 3), ("proj.weight", 1, 1), ("fc.weight", 0, 1), ("fc.bias", 0, 1), ("out.weight", 1, 1)]


class TPGPT(nn.Module):
    """``forward(tokens, targets)``: the mean next-token loss."""

    def __init__(self, c: TPConfig = TPConfig(), tp: int = 1, tp_rank: int = 0, group=None, seed: int = 0,
                 recompute: bool = False):
        super().__init__()
        torch.manual_seed(seed)  # the full model, whatever T: each rank then keeps its slices
        self.c, self.recompute = c, recompute
        self.tok = nn.Embedding(c.vocab, c.hidden)
        self.pos = nn.Embedding(c.seq, c.hidden)
        self.blocks = nn.ModuleList(TPBlock(c, tp, group) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)
        if tp > 1:
            for blk in self.blocks:
                for suffix, dim, stride in SLICED:
                    mod_name, pname = suffix.split(".")
                    mod = getattr(blk, mod_name)
                    p = nn.Parameter(take_slice(getattr(mod, pname).data, SliceSpec(dim, stride), tp, tp_rank))
                    mark_sliced(p, dim, stride)
                    setattr(mod, pname, p)

    def forward(self, tokens, targets):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for blk in self.blocks:
            h = checkpointing.checkpoint(blk, h) if self.recompute else blk(h)
        logits = self.head(self.ln(h))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def sliced_names(c: TPConfig = TPConfig()) -> dict[str, SliceSpec]:
    return {f"blocks.{i}.{s}": SliceSpec(d, st) for i in range(c.layers) for s, d, st in SLICED}


def batches(step: int, dp_rank: int, dp: int, micro: int, gas: int, c: TPConfig = TPConfig()):
    """This data-parallel rank's micro-batches of global step ``step`` (global batch micro*gas*dp);
    every tensor-parallel rank of a data-parallel rank sees the same ones."""
    x, y = synthetic_batch(step, micro * gas * dp, c.seq, c.vocab)
    return [(x[s:s + micro], y[s:s + micro]) for s in ((k * dp + dp_rank) * micro for k in range(gas))]


def reference(steps: int, global_batch: int, opt_fn, clip: float, c: TPConfig = TPConfig()):
    """Plain single-process PyTorch on the unsliced model: parameters after each step."""
    model = TPGPT(c)
    opt = opt_fn(model.parameters())
    out = []
    for step in range(steps):
        x, y = synthetic_batch(step, global_batch, c.seq, c.vocab)
        opt.zero_grad()
        model(x, y).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out
