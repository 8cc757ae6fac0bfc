"""One rank of the memory benchmark: steady model-state bytes per parameter, and peak RSS.
Started by bench_memory.py through the launcher."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result, batch  # noqa: E402

from examples.gpt_model import GPT, GPTConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import shardspeed
    from shardspeed import comm

    cfg = GPTConfig(vocab=8192, seq=128, layers=args.layers, hidden=512, heads=8)
    torch.manual_seed(1234)
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    engine, *_ = shardspeed.initialize(model=model, config={
        "train_batch_size": 8, "steps_per_print": None, "bf16": {"enabled": args.dtype == "bf16"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 25_000_000 // 4}})
    rank = comm.get_rank()
    micro = engine.train_micro_batch_size_per_gpu()
    for step in range(3):
        x, y = batch(step, 8, cfg)
        engine.backward(engine(x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]))
        engine.step()
    mem = engine.memory_breakdown()
    mem["peak_rss"] = engine.accelerator.max_memory_allocated()
    rows = comm.all_gather_object(mem)
    if rank == 0:
        append_result("memory", {"stage": args.stage, "dtype": args.dtype, "n_params": n, "tag": args.tag,
                                 "per_rank": rows})


if __name__ == "__main__":
    main()
