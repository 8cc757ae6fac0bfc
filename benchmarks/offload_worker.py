"""One rank of the offload speed benchmark: the same GPT trained with ZeRO stage 3 with its
optimizer state in memory and on disk (offload_optimizer nvme), modes taking turns in one launch,
step times barrier to barrier, bytes the swap file moved per step. Started by bench_offload.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result  # noqa: E402
from mem_worker import _count  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402


def config(mode: str, nvme: str, sub_group: int) -> dict:
    zero = {"stage": 3, "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000}
    if mode in ("nvme", "nvme+params"):
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme, "buffer_count": 3}
        zero["sub_group_size"] = sub_group
    if mode == "nvme+params":
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme}
    return {"train_batch_size": 2, "steps_per_print": None, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": zero, "aio": {"thread_count": 2}}


def run(mode: str, args: argparse.Namespace, cfg: GPTConfig) -> dict:
    import shardspeed
    from shardspeed import comm

    torch.manual_seed(1234)
    engine, *_ = shardspeed.initialize(model=GPT(cfg), config=config(mode, args.nvme, args.sub_group))
    rank = comm.get_rank()
    swap = engine.optimizer_swapper
    tier = engine.strategy.param_tier
    files = [f for f in (getattr(swap, "file", None), getattr(tier, "file", None)) if f is not None]
    times, io = [], []
    for step in range(args.warmup + args.steps):
        x, y = synthetic_batch(step, 2, cfg.seq, cfg.vocab)
        before = (sum(f.bytes_read for f in files), sum(f.bytes_written for f in files))
        comm.barrier()
        t = time.perf_counter()
        loss = engine(x[rank:rank + 1], y[rank:rank + 1])
        engine.backward(loss)
        engine.step()
        comm.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
            if files:
                after = (sum(f.bytes_read for f in files), sum(f.bytes_written for f in files))
                io.append((after[0] - before[0], after[1] - before[1]))
    mem = engine.memory_breakdown()
    if swap:
        swap.close()
    if tier is not None:
        tier.close()
    return {"mode": mode, "step_s": times, "swap_io_bytes": io, "memory": mem,
            "direct_io": bool(swap and swap.file.direct)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default="memory,nvme")
    ap.add_argument("--nvme", required=True)
    ap.add_argument("--sub-group", type=int, default=50_000_000)
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import shardspeed
    from shardspeed import comm

    shardspeed.init_distributed()
    cfg = GPTConfig(vocab=8192, seq=128, layers=args.layers, hidden=args.hidden, heads=16)
    n = _count(cfg)
    rows = [run(mode, args, cfg) for mode in args.modes.split(",")]
    gathered = comm.all_gather_object(rows)
    if comm.get_rank() == 0:
        for i, row in enumerate(rows):
            row["swap_io_bytes_per_rank"] = [g[i]["swap_io_bytes"] for g in gathered]
            append_result("offload", {**row, "layers": args.layers, "hidden": args.hidden, "n_params": n,
                                      "tag": args.tag, "cpu": torch.backends.cpu.get_cpu_capability()})
        print(json.dumps([{k: r[k] for k in ("mode", "step_s")} for r in rows]))


if __name__ == "__main__":
    main()
