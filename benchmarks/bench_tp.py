"""Tensor parallelism at 4 ranks (issue 13): shardspeed T=2 x D=2 (ZeRO stages 1 and 3) against
PyTorch's own tensor parallelism T=2 x FSDP2 D=2 on a 2-D DeviceMesh, and FSDP2 at D=4, on the same
tied GPT, data and AdamW, in one command: step time and bytes communicated per step and rank.

    .venv/bin/python benchmarks/bench_tp.py [--reps 2] [--hidden 384 --vocab 4096 ...]

4 local ranks, 1 thread each (tp_worker.py). Runs alternate between the modes (reverse order on odd
repetitions) so machine drift hits every mode alike. Rows land in benchmarks/out/tp.jsonl; the
markdown table is printed with ratios against PyTorch's tensor parallelism.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, launch, median, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
MODES = [("shardspeed", 1), ("torch-tp", None), ("shardspeed", 3), ("fsdp2", None), ("torch-tp-shared-qkv", None)]
NAMES = {("shardspeed", 1): "shardspeed T=2 x ZeRO-1 D=2", ("shardspeed", 3): "shardspeed T=2 x ZeRO-3 D=2",
         ("torch-tp", None): "PyTorch TP T=2 x FSDP2 D=2", ("fsdp2", None): "PyTorch FSDP2 D=4",
         ("torch-tp-shared-qkv", None): "PyTorch TP T=2 x FSDP2 D=2, q/k/v input shared"}
# the worker's arguments for a mode (the shared-qkv variant: one backward all-reduce for q, k and v's input,
# where the usual per-projection plan issues three)
WORKER_MODE = {"torch-tp-shared-qkv": ["--mode", "torch-tp", "--shared-qkv-input"]}


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def summarize(tag: str) -> str:
    rows = [r for r in read_results("tp") if r["tag"] == tag]
    ref = [r for r in rows if r["mode"] == "torch-tp"]
    ref_wall = median([r["wall_step_s"] for r in ref]) if ref else float("nan")
    ref_bytes = ref[0]["comm_per_rank"][0]["ring_bytes"] if ref else float("nan")
    lines = ["| run | wall s/step (per rep) | barrier-to-barrier median s | time ratio vs PyTorch TP | "
             "collectives / step / rank | payload MiB / step / rank | ring-sent MiB / step / rank | "
             "bytes ratio vs PyTorch TP | loss @1 (plain model) | loss @last | ",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, stage in MODES:
        mine = [r for r in rows if r["mode"] == mode and r["stage"] == stage]
        if not mine:
            continue
        wall = median([r["wall_step_s"] for r in mine])
        b2b = median([r["median_step_s"] for r in mine])
        reps = " / ".join(f"{r['wall_step_s']:.3f}" for r in mine)
        comm = mine[0]["comm_per_rank"]
        calls = "/".join(sorted({f"{c['calls']:g}" for c in comm}))  # per rank, when ranks differ
        payload = max(c["bytes"] for c in comm)
        ring = max(c["ring_bytes"] for c in comm)
        r0 = mine[0]
        lines.append(f"| {NAMES[(mode, stage)]} | {wall:.3f} ({reps}) | {b2b:.3f} | {wall / ref_wall:.3f} | {calls} | "
                     f"{_mib(payload)} | {_mib(ring)} | {ring / ref_bytes:.3f} | {r0['losses'][0]:.6f} "
                     f"({r0['plain_loss_step1']:.6f}) | {r0['losses'][-1]:.6f} |")
    return "\n".join(lines)


def _group_name(key: str) -> str:
    """'all_reduce ranks 0,1' -> 'all_reduce tp': rank 0's groups, the tensor-parallel ranks innermost
    in both shardspeed's topology and the ("dp", "tp") mesh."""
    kind, ranks = key.split(" ranks ")
    return f"{kind} " + {"0,1": "tp", "0,2": "dp", "0,1,2,3": "world"}.get(ranks, f"ranks {ranks}")


def _spread(profs: list[dict], key: str) -> str:
    vals = [p[key] for p in profs]
    return f"{median(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})"


def where_time_goes(tag: str) -> str:
    """From the profiled steps (tp_worker.profile_steps), rank 0 and the slowest rank."""
    rows = [r for r in read_results("tp") if r["tag"] == tag]
    lines = ["| run | step under profiler s | aten ops (compute, copies) s | collectives and their waits s | "
             "rest (Python, unnamed waits) s | aten calls / step |", "|---|---|---|---|---|---|"]
    for mode, stage in MODES:
        mine = [r for r in rows if r["mode"] == mode and r["stage"] == stage]
        profs = [c.get("profile") for c in mine[0]["comm_per_rank"]] if mine else []
        if not profs or None in profs:
            continue
        cell = functools.partial(_spread, profs)
        lines.append(f"| {NAMES[(mode, stage)]} | {cell('step_s')} | {cell('aten_s')} | {cell('comm_s')} | "
                     f"{cell('rest_s')} | {median([p['aten_calls'] for p in profs]):.0f} |")
    return "\n".join(lines)


def breakdown(tag: str) -> str:
    """Per collective kind and group size: calls and payload per step on rank 0 (all modes)."""
    rows = [r for r in read_results("tp") if r["tag"] == tag]
    out = []
    for mode, stage in MODES:
        mine = [r for r in rows if r["mode"] == mode and r["stage"] == stage]
        if not mine:
            continue
        ops = mine[0]["comm_per_rank"][0]["ops"]
        parts = [f"{_group_name(k)}: {v['calls']:g} x, {_mib(v['bytes'])} MiB" for k, v in ops.items()]
        out.append(f"- {NAMES[(mode, stage)]}: " + "; ".join(parts))
        log = mine[0]["comm_per_rank"][0].get("shardspeed_comm_log")
        if log:
            out.append("  - shardspeed's comm log over the same steps: "
                       + "; ".join(f"{k}: {v['calls']:g} x, {_mib(v['bytes'])} MiB" for k, v in sorted(log.items())))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--only", default="",
                    help="comma-separated subset: shardspeed1,shardspeed3,torch-tp,fsdp2,torch-tp-shared-qkv")
    ap.add_argument("worker_args", nargs=argparse.REMAINDER,
                    help="passed to tp_worker.py after '--' (e.g. -- --hidden 512 --steps 20)")
    args = ap.parse_args()
    extra = [a for a in args.worker_args if a != "--"]
    modes = MODES
    if args.only:
        keep = set(args.only.split(","))
        modes = [m for m in MODES if f"{m[0]}{m[1] or ''}" in keep]
    for rep in range(args.reps):
        for mode, stage in (modes if rep % 2 == 0 else modes[::-1]):
            print(f"rep {rep}: {NAMES[(mode, stage)]}", flush=True)
            how = WORKER_MODE.get(mode, ["--mode", mode])
            launch(4, WORKER, *how, "--stage", str(stage or 0), "--tag", args.tag, *extra, results="tp")
    print(summarize(args.tag))
    print()
    print(breakdown(args.tag))
    print()
    print("Where a step's time goes (first repetition, median over ranks (min-max)):")
    print(where_time_goes(args.tag))
    print(f"raw: {os.path.join(OUT, 'tp.jsonl')}")


if __name__ == "__main__":
    main()
