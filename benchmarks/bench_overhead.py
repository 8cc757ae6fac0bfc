"""Single-process engine overhead against a plain PyTorch loop, and the cost of `import shardspeed`.

    .venv/bin/python benchmarks/bench_overhead.py [--reps 2]

Overhead: the anchors' GPT, batch 8, fp32, AdamW (torch's fused kernel on both sides), 2 threads,
each run in a fresh process, runs alternating. Import: fresh interpreters, `import torch` against
`import torch, shardspeed`, median of 9 each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, append_result, batch, build_model, median, read_results  # noqa: E402


def worker(mode: str, steps: int, warmup: int, tag: str) -> None:
    import torch

    torch.set_num_threads(2)
    model = build_model()
    if mode == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

        def step(i):
            x, y = batch(i, 8)
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import shardspeed

        engine, *_ = shardspeed.initialize(model=model, config={
            "train_batch_size": 8, "steps_per_print": None,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}})

        def step(i):
            x, y = batch(i, 8)
            engine.backward(engine(x, y))
            engine.step()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    append_result("overhead", {"mode": mode, "tag": tag, "median_step_s": median(times), "times": times})


def import_cost(reps: int = 9) -> dict[str, float]:
    def t(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        return time.perf_counter() - start

    torch_only, both = [], []
    for _ in range(reps):
        torch_only.append(t("import torch"))
        both.append(t("import torch, shardspeed"))
    return {"torch_s": median(torch_only), "torch_and_shardspeed_s": median(both),
            "shardspeed_s": median(both) - median(torch_only)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--worker", choices=["plain", "engine"])
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.tag)
        return
    for rep in range(args.reps):
        for mode in (("plain", "engine") if rep % 2 == 0 else ("engine", "plain")):
            print(f"rep {rep}: {mode}", flush=True)
            subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps), "--warmup",
                            str(args.warmup), "--tag", args.tag], check=True, cwd=ROOT)
    rows = [r for r in read_results("overhead") if r["tag"] == args.tag]
    plain = median([r["median_step_s"] for r in rows if r["mode"] == "plain"])
    engine = median([r["median_step_s"] for r in rows if r["mode"] == "engine"])
    imp = import_cost()
    append_result("import", {"tag": args.tag, **imp})
    print("| what | plain PyTorch | shardspeed | ratio |\n|---|---|---|---|")
    print(f"| median step s, 1 process | {plain:.3f} | {engine:.3f} | {engine / plain:.3f} |")
    print(f"| import s (after torch) | {imp['torch_s']:.3f} (import torch) | +{imp['shardspeed_s']:.3f} | |")


if __name__ == "__main__":
    main()
