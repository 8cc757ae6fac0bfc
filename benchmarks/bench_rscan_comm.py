"""Communication of the RScan model (examples/rscan) at 2 ranks: bytes per step and step time of
shardspeed with sparse gradients, shardspeed dense, torch DDP with a ``sparse=True`` table and DeepSpeed
0.19.8 at stage 0 with a ``sparse=True`` table, side by side in one command (issue 15).

    .venv/bin/python benchmarks/bench_rscan_comm.py [--reps 3] [--steps 60] [--rounds 12] [--ds-venv ../.venv-deepspeed]

Interleaved (the default): one launch per repetition, from DeepSpeed's venv (the same torch wheel;
shardspeed imported from this tree), in which the four modes share one process group and take turns of
``--steps / --rounds`` steps, the order rotated every round and reversed on odd repetitions
(rscan_worker.py). The paired ratio of a mode to another is the median, over all rounds of all
repetitions, of their turns' ratio: the two ran seconds apart on the same batches, so load from outside
cancels. ``--separate`` launches each mode alone (its own venv), alternating, as earlier runs did.

Rows: benchmarks/out/rscan_comm.jsonl; the table is printed. What each mode runs and how bytes are
counted: benchmarks/rscan_worker.py.
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


def run(modes: list[str], args: argparse.Namespace) -> bool:
    """One launch of the worker for ``modes`` (several: interleaved in it)."""
    out = os.path.join(OUT, "rscan_comm.jsonl")
    os.makedirs(OUT, exist_ok=True)
    before = len(read_results("rscan_comm"))
    worker_args = ["--mode", ",".join(modes), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rounds", str(args.rounds if len(modes) > 1 else 1), "--vocab", str(args.vocab),
                   "--out", out, "--tag", args.tag]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if "deepspeed" in modes:
        cmd = [os.path.join(args.ds_venv, "bin", "torchrun"), "--standalone", "--nproc_per_node", "2", WORKER]
        env.pop("PYTHONPATH", None)  # the worker puts this tree first on its path itself
    else:
        from shardspeed.comm import free_port  # a port of our own: others' jobs share this machine

        cmd = [sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "--master_port", str(free_port()),
               "--no_local_rank", WORKER]
    p = subprocess.run(cmd + worker_args, cwd=ROOT, env=env, capture_output=True, text=True)
    ok = len(read_results("rscan_comm")) - before >= len(modes)  # gloo may abort a rank at exit after the rows
    if not ok:
        print(f"{modes}: failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", flush=True)
    return ok


def paired(rows: list[dict], mode: str, peer: str) -> list[float]:
    """``mode``'s turn / ``peer``'s turn in the same launch and round, over every launch that ran both."""
    ratios = []
    for launch in {(r["launch"]) for r in rows if "launch" in r}:
        here = {r["mode"]: r for r in rows if r.get("launch") == launch}
        if mode in here and peer in here:
            ratios += [a / b for a, b in zip(here[mode]["turn_step_s"], here[peer]["turn_step_s"], strict=True)]
    return ratios


def summarize(tag: str) -> str:
    rows = [r for r in read_results("rscan_comm") if r["tag"] == tag]
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    dense = by["shardspeed-dense"]
    dense_bytes = median([r["bytes_per_step"] for r in dense]) if dense else float("nan")
    walls = {m: median([r["wall_step_s"] for r in rs]) for m, rs in by.items() if rs}
    lines = ["| mode | MiB / step / rank | dense / mode bytes | s / step, median of launches (per launch) | "
             "paired vs shardspeed sparse: median (range), turns faster |", "|---|---|---|---|---|"]
    for m in MODES:
        rs = by[m]
        if not rs:
            lines.append(f"| {NAMES[m]} | not run | | | |")
            continue
        b = median([r["bytes_per_step"] for r in rs])
        reps = " / ".join(f"{r['wall_step_s']:.4f}" for r in rs)
        ratios = paired(rows, m, "shardspeed-sparse") if m != "shardspeed-sparse" else []
        pair = (f"{median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}), shardspeed faster in "
                f"{sum(x > 1 for x in ratios)} of {len(ratios)}" if ratios else "")
        lines.append(f"| {NAMES[m]} | {b / 2**20:.3f} | {dense_bytes / b:.1f} x | {walls[m]:.4f} ({reps}) | {pair} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=12, help="interleaved: turns per mode and launch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=300_000)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--separate", action="store_true", help="one launch per mode instead of interleaved turns")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    ap.add_argument("--table", action="store_true", help="print the table of --tag's rows, run nothing")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not args.table:
        if not os.path.exists(os.path.join(args.ds_venv, "bin", "torchrun")) and "deepspeed" in modes:
            print(f"no DeepSpeed venv at {args.ds_venv}: skipping DeepSpeed")
            modes.remove("deepspeed")
        print("load before:", os.getloadavg(), flush=True)
        for rep in range(args.reps):
            order = modes if rep % 2 == 0 else modes[::-1]
            print(f"rep {rep}: {order}", flush=True)
            if args.separate:
                for mode in order:
                    run([mode], args)
            else:
                run(order, args)
        print("load after:", os.getloadavg())
    print(summarize(args.tag))
    print(f"raw: {os.path.join(OUT, 'rscan_comm.jsonl')}")


if __name__ == "__main__":
    main()
