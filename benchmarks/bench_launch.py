"""Time from launching a job to its first step, for 2 and 4 local ranks: shardspeed's launcher
against torchrun and DeepSpeed's launcher, side by side.

    .venv/bin/python benchmarks/bench_launch.py [--reps 3] [--ds-venv ../.venv-deepspeed]

The job (launch_target.py) joins a gloo process group, all-reduces 1000 floats and has rank 0 print
the time; the figure is that time minus the moment the launcher process was started. Each launcher
runs from the venv it ships in (DeepSpeed's from its own); modes alternate, reverse order on odd
repetitions; median of the repetitions.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, append_result  # noqa: E402

TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_target.py")


def command(mode: str, n: int, port: int, ds_venv: str) -> list[str]:
    if mode == "shardspeed":
        return [sys.executable, "-m", "shardspeed.launcher", "--num_procs", str(n), "--master_port", str(port),
                "--no_local_rank", TARGET]
    if mode == "torchrun":
        return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(n),
                "--master_port", str(port), TARGET]
    return [os.path.join(ds_venv, "bin", "deepspeed"), "--num_gpus", str(n), "--master_port", str(port),
            TARGET]


def once(mode: str, n: int, port: int, ds_venv: str) -> float:
    start = time.time()
    p = subprocess.run(command(mode, n, port, ds_venv), capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    m = re.search(r"FIRST_STEP_AT (\d+\.\d+) world=(\d+)", p.stdout + p.stderr)
    if not m or int(m.group(2)) != n:
        raise RuntimeError(f"{mode} with {n} ranks did not report a first step:\n{p.stdout}\n{p.stderr}")
    return float(m.group(1)) - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    modes = ["shardspeed", "torchrun"]
    if os.path.exists(os.path.join(args.ds_venv, "bin", "deepspeed")):
        modes.append("deepspeed")
    times: dict[tuple[str, int], list[float]] = {}
    port = 29700
    for rep in range(args.reps):
        for n in (2, 4):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                port += 1
                t = once(mode, n, port, args.ds_venv)
                times.setdefault((mode, n), []).append(t)
                print(f"rep {rep}: {mode} {n} ranks: {t:.2f} s", flush=True)
    print("| launcher | ranks | launch to first step, s (median; per rep) |")
    print("|---|---|---|")
    for (mode, n), ts in sorted(times.items(), key=lambda kv: (kv[0][1], modes.index(kv[0][0]))):
        print(f"| {mode} | {n} | {statistics.median(ts):.2f} ({' / '.join(f'{t:.2f}' for t in ts)}) |")
        append_result("launch", {"mode": mode, "ranks": n, "tag": args.tag, "seconds": ts})


if __name__ == "__main__":
    main()
