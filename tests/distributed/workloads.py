"""Training runs shared by the distributed tests: the engine on N ranks, and plain PyTorch in one
process on the same data, so the two can be compared parameter by parameter."""

from __future__ import annotations

import copy
from typing import Any

import torch

from examples.gpt_model import GPT, GPTConfig, synthetic_batch

TINY = GPTConfig(vocab=64, seq=16, layers=2, hidden=32, heads=4)


# odd sizes: nothing divides evenly across 2 or 3 ranks; tied input/output embedding
ODD = dict(vocab=61, hidden=30, heads=3, tie_embeddings=True)


def model_config(**overrides: Any) -> GPTConfig:
    return GPTConfig(**{**TINY.__dict__, **overrides})


def tiny_gpt(seed: int = 0, **overrides: Any) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config(**overrides))


def micro_slices(step: int, rank: int, world: int, micro: int, gas: int, cfg: GPTConfig = TINY):
    """This rank's micro-batches of global step ``step`` (the global batch is micro*gas*world)."""
    x, y = synthetic_batch(step, micro * gas * world, cfg.seq, cfg.vocab)
    out = []
    for k in range(gas):
        start = (k * world + rank) * micro
        out.append((x[start:start + micro], y[start:start + micro]))
    return out


def engine_run(rank: int, config: dict, steps: int, model_kwargs: dict | None = None,
               zero_init: bool = False) -> dict[str, Any]:
    import shardspeed

    if zero_init:
        with shardspeed.zero.Init(config_dict_or_path=config):
            model = tiny_gpt(**(model_kwargs or {}))
    else:
        model = tiny_gpt(**(model_kwargs or {}))
    cfg = model_config(**(model_kwargs or {}))
    engine, _, _, _ = shardspeed.initialize(model=model, config=config)
    world = engine.dp_world_size
    losses = []
    for step in range(steps):
        total = 0.0
        for x, y in micro_slices(step, engine.topo.dp_rank, world, engine.train_micro_batch_size_per_gpu(),
                                 engine.gradient_accumulation_steps(), cfg):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / engine.gradient_accumulation_steps())
    params = {n: p.detach().float().clone() for n, p in engine.module.state_dict().items()
              if n in dict(engine.module.named_parameters())}
    comm_bytes = None
    if engine.comm_stats is not None:
        comm_bytes = {op: s.bytes for op, s in engine.comm_stats.ops.items()}
    return {"params": params, "losses": losses, "global_steps": engine.global_steps, "comm_bytes": comm_bytes,
            "micro_steps": engine.micro_steps, "skipped": engine.skipped_steps, "lr": engine.get_lr(),
            "memory": engine.memory_breakdown()}


def reference_run(steps: int, global_batch: int, lr: float, weight_decay: float, clip: float,
                  model_kwargs: dict | None = None, make_opt: Any = None) -> dict[str, Any]:
    """Plain single-process PyTorch: full batch, AdamW (or ``make_opt(params)``), clip_grad_norm_."""
    model = tiny_gpt(**(model_kwargs or {}))
    cfg = model_config(**(model_kwargs or {}))
    opt = (make_opt or (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay)))(model.parameters())
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(step, global_batch, cfg.seq, cfg.vocab)
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses,
            "model": copy.deepcopy(model)}


# bf16/fp16 runs against fp32 on the tiny GPT, a few steps, as model_rel_diff: parameters are rounded to
# 8 (bf16) or 11 (fp16) bits of mantissa and the gradients computed from them differ (measured at
# stages 0-3: bf16 4.8-5.7e-3, fp16 1.9-2.2e-3)
LOW_PRECISION_TOL = 1e-2


def model_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters at once: how far apart two runs' models are. Per tensor
    (max_rel_diff) a LayerNorm bias that starts at zero is all rounding noise, so low-precision runs
    are compared this way."""
    assert a.keys() == b.keys()
    diff = sum(torch.linalg.vector_norm(a[k].double() - b[k].double()).item() ** 2 for k in a)
    size = sum(torch.linalg.vector_norm(b[k].double()).item() ** 2 for k in a)
    return (diff / size) ** 0.5


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Worst over tensors of ||a - b|| / ||b||: how far apart two runs' parameters are, relative to
    their size (elementwise ratios are dominated by the few elements Adam's normalisation amplifies
    from rounding noise; see CONVENTIONS.md)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        diff = torch.linalg.vector_norm(a[name].double() - b[name].double()).item()
        worst = max(worst, diff / max(torch.linalg.vector_norm(b[name].double()).item(), 1e-30))
    return worst


class SplitMPU:
    """Megatron's mpu interface for 2 ranks in one model-parallel group, each rank its own
    data-parallel group. Build it after the process group exists, on every rank."""

    def __init__(self):
        import torch.distributed as dist

        self._rank = dist.get_rank()
        self.dp = [dist.new_group([0]), dist.new_group([1])]
        self.mp = dist.new_group([0, 1])

    def get_data_parallel_group(self):
        return self.dp[self._rank]

    def get_model_parallel_group(self):
        return self.mp
