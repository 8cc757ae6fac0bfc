"""Communication of the RScan model (examples/rscan) at 2 ranks: bytes per step and step time of
shardspeed with sparse gradients, shardspeed dense, torch DDP with a ``sparse=True`` table and DeepSpeed
0.19.8 at stage 0 with a ``sparse=True`` table, side by side in one command (issue 15).

    .venv/bin/python benchmarks/bench_rscan_comm.py [--reps 2] [--steps 20] [--ds-venv ../.venv-deepspeed]

Rows: benchmarks/out/rscan_comm.jsonl; the table is printed. What each mode runs and how bytes are
counted: benchmarks/rscan_worker.py. Modes alternate, and repeat in reverse order, so drift hits all.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, median, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rscan_worker.py")
MODES = ["shardspeed-sparse", "shardspeed-dense", "ddp", "deepspeed"]
NAMES = {"shardspeed-sparse": "shardspeed, sparse_gradients (sparse=True table, lazy Adam)",
         "shardspeed-dense": "shardspeed, dense gradients (Adam)",
         "ddp": "torch DDP, sparse=True table (SparseAdam + Adam)",
         "deepspeed": "DeepSpeed 0.19.8 stage 0, sparse=True table (SparseAdam + Adam)"}


def run(mode: str, args: argparse.Namespace) -> bool:
    out = os.path.join(OUT, "rscan_comm.jsonl")
    os.makedirs(OUT, exist_ok=True)
    before = len(read_results("rscan_comm"))
    worker_args = ["--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup), "--vocab",
                   str(args.vocab), "--out", out, "--tag", args.tag]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode == "deepspeed":
        cmd = [os.path.join(args.ds_venv, "bin", "torchrun"), "--standalone", "--nproc_per_node", "2", WORKER]
        env.pop("PYTHONPATH", None)
    else:
        from shardspeed.comm import free_port  # a port of our own: others' jobs share this machine

        cmd = [sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "--master_port", str(free_port()),
               "--no_local_rank", WORKER]
    p = subprocess.run(cmd + worker_args, cwd=ROOT, env=env, capture_output=True, text=True)
    ok = len(read_results("rscan_comm")) > before  # gloo may abort a rank at exit after the row is written
    if not ok:
        print(f"{mode}: failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", flush=True)
    return ok


def summarize(tag: str) -> str:
    rows = [r for r in read_results("rscan_comm") if r["tag"] == tag]
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    dense = by["shardspeed-dense"]
    dense_bytes = median([r["bytes_per_step"] for r in dense]) if dense else float("nan")
    walls = {m: median([r["wall_step_s"] for r in rs]) for m, rs in by.items() if rs}
    fastest = min(walls.values()) if walls else float("nan")
    lines = ["| mode | MiB / step / rank | dense / mode bytes | wall s / step (per rep) | vs fastest |",
             "|---|---|---|---|---|"]
    for m in MODES:
        rs = by[m]
        if not rs:
            lines.append(f"| {NAMES[m]} | not run | | | |")
            continue
        b = median([r["bytes_per_step"] for r in rs])
        reps = " / ".join(f"{r['wall_step_s']:.3f}" for r in rs)
        lines.append(f"| {NAMES[m]} | {b / 2**20:.3f} | {dense_bytes / b:.1f} x | {walls[m]:.3f} ({reps}) | "
                     f"{walls[m] / fastest:.2f} x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=300_000)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tag", default="run")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not os.path.exists(os.path.join(args.ds_venv, "bin", "torchrun")) and "deepspeed" in modes:
        print(f"no DeepSpeed venv at {args.ds_venv}: skipping DeepSpeed")
        modes.remove("deepspeed")
    print("load before:", os.getloadavg(), flush=True)
    for rep in range(args.reps):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            print(f"rep {rep}: {mode}", flush=True)
            run(mode, args)
    print("load after:", os.getloadavg())
    print(summarize(args.tag))
    print(f"raw: {os.path.join(OUT, 'rscan_comm.jsonl')}")


if __name__ == "__main__":
    main()
