"""Activation checkpointing: peak memory and step time of a 12-layer GPT at sequence 512 with and
without recompute, through the engine, one process.

    .venv/bin/python benchmarks/bench_recompute.py [--reps 2]

Model: examples/gpt_model.py, 12 layers, hidden 512, 8 heads, vocab 8192, seq 512, batch 8, fp32,
AdamW, dropout 0.1; recompute = every block under ``shardspeed.checkpointing.checkpoint`` with the
config's ``activation_checkpointing`` section. Each mode runs in its own process (peak RSS is per
process; MALLOC_MMAP_THRESHOLD_=65536 so freed activations leave the resident set) with 2 threads;
median of steps 2-6. Modes alternate, reverse order on odd repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, append_result, median, read_results  # noqa: E402


def worker(recompute: bool, tag: str) -> None:
    import torch

    import shardspeed
    from examples.gpt_model import GPT, GPTConfig, synthetic_batch

    torch.set_num_threads(2)
    cfg = GPTConfig(vocab=8192, seq=512, layers=12, hidden=512, heads=8, dropout=0.1, recompute=recompute)
    torch.manual_seed(0)
    model = GPT(cfg)
    config = {"train_batch_size": 8, "steps_per_print": None,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    if recompute:
        config["activation_checkpointing"] = {"partition_activations": False}
    engine, *_ = shardspeed.initialize(model=model, config=config)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, losses = [], []
    for step in range(6):
        x, y = synthetic_batch(step, 8, cfg.seq, cfg.vocab)
        t = time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    append_result("recompute", {"recompute": recompute, "tag": tag, "median_step_s": median(times[1:]),
                                "times": times, "losses": losses, "rss_after_init": rss_start,
                                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--worker", choices=["off", "on"])
    args = ap.parse_args()
    if args.worker:
        worker(args.worker == "on", args.tag)
        return
    modes = ["off", "on"]
    for rep in range(args.reps):
        for m in (modes if rep % 2 == 0 else modes[::-1]):
            print(f"rep {rep}: recompute {m}", flush=True)
            subprocess.run([sys.executable, __file__, "--worker", m, "--tag", args.tag], check=True, cwd=ROOT,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    rows = [r for r in read_results("recompute") if r["tag"] == args.tag]
    off = [r for r in rows if not r["recompute"]]
    on = [r for r in rows if r["recompute"]]
    t_off, t_on = median([r["median_step_s"] for r in off]), median([r["median_step_s"] for r in on])
    m_off, m_on = median([r["peak_rss"] for r in off]), median([r["peak_rss"] for r in on])
    print("| recompute | median step s (per rep) | peak RSS GiB (per rep) | loss @1 / @6 |")
    print("|---|---|---|---|")
    for name, rs, t, m in (("off", off, t_off, m_off), ("on", on, t_on, m_on)):
        reps_t = " / ".join(f"{r['median_step_s']:.3f}" for r in rs)
        reps_m = " / ".join(f"{r['peak_rss'] / 2**30:.2f}" for r in rs)
        print(f"| {name} | {t:.3f} ({reps_t}) | {m / 2**30:.2f} ({reps_m}) | "
              f"{rs[0]['losses'][0]:.4f} / {rs[0]['losses'][-1]:.4f} |")
    print(f"peak memory falls by {100 * (1 - m_on / m_off):.1f}%, step time x{t_on / t_off:.2f}")
    print(json.dumps({"memory_drop": 1 - m_on / m_off, "time_ratio": t_on / t_off}))


if __name__ == "__main__":
    main()
