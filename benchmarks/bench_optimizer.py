"""Adam kernels on this machine: torch's fused kernel (what FusedAdam runs), foreach, and a
per-tensor loop, on the anchors' GPT parameters (27.37M), 2 threads.

    .venv/bin/python benchmarks/bench_optimizer.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result, build_model, median  # noqa: E402

from shardspeed.optim import FusedAdam, FusedLamb  # noqa: E402


def time_steps(make, reps: int = 15) -> float:
    model = build_model()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make(params)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    torch.set_num_threads(2)
    cases = {
        "FusedAdam (torch fused kernel)": lambda p: FusedAdam(p, lr=1e-3, weight_decay=0.01),
        "torch AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
        "torch AdamW for-loop": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=False),
        "FusedAdam bias_correction=False (ours, foreach)": lambda p: FusedAdam(p, lr=1e-3, bias_correction=False),
        "FusedLamb (ours, foreach)": lambda p: FusedLamb(p, lr=1e-3, weight_decay=0.01),
    }
    print("| optimizer | median step ms |\n|---|---|")
    for name, make in cases.items():
        ms = 1e3 * time_steps(make)
        append_result("optimizer", {"name": name, "median_step_ms": ms})
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
