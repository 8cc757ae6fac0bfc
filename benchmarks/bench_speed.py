"""Step time of shardspeed ZeRO stages against torch DDP and DeepSpeed, fp32 and bf16, 2 ranks, side by
side in one run.

    .venv/bin/python benchmarks/bench_speed.py --stages 0,1,2 [--reps 2] [--ds-venv ../.venv-deepspeed]

Model: the anchors' GPT (27.37M parameters), global batch 8, AdamW, no clipping. Runs alternate
between the modes (and reverse order on odd repetitions) so machine drift hits both alike.
bf16 for DDP is torch.autocast (fp32 parameters, bf16 matmuls), what a plain PyTorch user would write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, append_result, launch, median, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_worker.py")


def run_deepspeed(ds_venv: str, zero: int, dtype: str, tag: str) -> None:
    """DeepSpeed itself, through the anchors' script (same dimensions; its model adds a qkv bias)."""
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(ROOT, "..", "shared", "anchors", "bench.py"), tmp)
    out = os.path.join(tmp, "ds.jsonl")
    # check=False: torch 2.13's gloo can abort a rank at interpreter exit (SIGABRT, "terminate called
    # without an active exception") after the results were written; a missing results file still fails
    subprocess.run([os.path.join(ds_venv, "bin", "torchrun"), "--standalone", "--nproc_per_node", "2",
                    os.path.join(tmp, "bench.py"), "--mode", "ds", "--zero", str(zero), "--dtype", dtype,
                    "--ds-clip", "0", "--no-count", "--out", out], check=False, cwd=tmp,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(out) as f:
        rec = json.loads(f.readline())
    append_result("stage0", {"mode": "deepspeed", "dtype": dtype, "stage": zero, "tag": tag,
                             "median_step_s": rec["median_step_s"], "times": rec["step_times"],
                             "losses": rec["losses"]})


def _time(r: dict) -> float:
    """The loop's wall time per step where the run measured it (Note: what a step time holds in
    dp_worker.py), else the barrier-to-barrier median (DeepSpeed through the anchors' script, which
    leaves nothing in flight after step())."""
    return r.get("wall_step_s", r["median_step_s"])


def summarize(tag: str, stages: list[int]) -> str:
    """fp32 is compared with DDP; bf16 with FSDP2's bf16 (bf16 compute, fp32 masters and reduction:
    the recipe shardspeed's bf16 runs), not with DDP under autocast."""
    rows = [r for r in read_results("stage0") if r["tag"] == tag]
    lines = ["| mode | dtype | wall s/step (per rep) | barrier-to-barrier median s | ratio vs reference "
             "| loss @1 / @25 | max loss diff vs DDP fp32 |", "|---|---|---|---|---|---|---|"]
    ref_loss = next((r["losses"] for r in rows if r["mode"] == "ddp" and r["dtype"] == "fp32"), None)
    for dtype in ("fp32", "bf16"):
        ref_mode = ("ddp", 0) if dtype == "fp32" else ("fsdp2", 3)
        ref = [_time(r) for r in rows if (r["mode"], r["stage"]) == ref_mode and r["dtype"] == dtype]
        for mode, stage in ([("ddp", 0), ("fsdp2", 3)] + [("shardspeed", s) for s in stages]
                            + [("deepspeed", s) for s in stages]):
            mine = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype and r["stage"] == stage]
            if not mine:
                continue
            med = median([_time(r) for r in mine])
            b2b = median([r["median_step_s"] for r in mine])
            ratio = med / median(ref) if ref else float("nan")
            losses = mine[0]["losses"]
            diff = max(abs(a - b) for a, b in zip(losses, ref_loss, strict=False)) if ref_loss else float("nan")
            if mode == "deepspeed":  # another model init (anchors' script): its loss is not comparable
                diff = float("nan")
            name = {"ddp": "torch DDP" + (" (autocast)" if dtype == "bf16" else ""), "fsdp2": "torch FSDP2",
                    "shardspeed": f"shardspeed stage {stage}", "deepspeed": f"DeepSpeed ZeRO-{stage}"}[mode]
            reps = " / ".join(f"{_time(r):.3f}" for r in mine)
            ref_name = "DDP" if dtype == "fp32" else "FSDP2"
            lines.append(f"| {name} | {dtype} | {med:.3f} ({reps}) | {b2b:.3f} | {ratio:.3f} x {ref_name} | "
                         f"{losses[0]:.4f} / {losses[-1]:.4f} | {diff:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stages", default="0", help="comma-separated shardspeed ZeRO stages to include")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"),
                    help="venv with deepspeed (skipped when absent)")
    args = ap.parse_args()
    has_ds = os.path.exists(os.path.join(args.ds_venv, "bin", "torchrun"))
    stages = [int(s) for s in args.stages.split(",")]
    modes = [("ddp", "fp32", 0), ("ddp", "bf16", 0)]
    modes += [("shardspeed", d, s) for d in ("fp32", "bf16") for s in stages]
    # FSDP2: stage 3's peer in torch, and the bf16 reference; the same fused AdamW kernel as everyone else
    modes += [("fsdp2", d, 3) for d in ("fp32", "bf16")]
    if has_ds:  # stage 0 is compared with DDP; DeepSpeed's ZeRO stages with ours
        modes += [("deepspeed", d, s) for d in ("fp32", "bf16") for s in stages if s > 0]
    path = os.path.join(OUT, "stage0.jsonl")
    for rep in range(args.reps):
        for mode, dtype, stage in (modes if rep % 2 == 0 else modes[::-1]):
            print(f"rep {rep}: {mode} {dtype} stage {stage}", flush=True)
            if mode == "deepspeed":
                run_deepspeed(args.ds_venv, stage, dtype, args.tag)
            else:
                extra = ["--adam", "fused"] if mode == "fsdp2" else []
                launch(2, WORKER, "--mode", mode, "--dtype", dtype, "--stage", str(stage), "--tag", args.tag, *extra,
                       results="stage0")
    print(summarize(args.tag, stages))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
