"""Stage 0 step time against torch DDP, fp32 and bf16, 2 ranks, side by side in one run.

    .venv/bin/python benchmarks/bench_stage0.py [--reps 2]

Model: the anchors' GPT (27.37M parameters), global batch 8, AdamW, no clipping. Runs alternate
between the modes (and reverse order on odd repetitions) so machine drift hits both alike.
bf16 for DDP is torch.autocast (fp32 parameters, bf16 matmuls), what a plain PyTorch user would write.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, launch, median, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_worker.py")


def summarize(tag: str, stages: list[int]) -> str:
    rows = [r for r in read_results("stage0") if r["tag"] == tag]
    lines = ["| mode | dtype | median step s (per rep) | ratio vs DDP | loss @1 / @25 | max loss diff vs DDP fp32 |",
             "|---|---|---|---|---|---|"]
    ref_loss = next((r["losses"] for r in rows if r["mode"] == "ddp" and r["dtype"] == "fp32"), None)
    for dtype in ("fp32", "bf16"):
        ddp = [r["median_step_s"] for r in rows if r["mode"] == "ddp" and r["dtype"] == dtype]
        for mode, stage in [("ddp", 0)] + [("shardspeed", s) for s in stages]:
            mine = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype and r["stage"] == stage]
            if not mine:
                continue
            med = median([r["median_step_s"] for r in mine])
            ratio = med / median(ddp) if ddp else float("nan")
            losses = mine[0]["losses"]
            diff = max(abs(a - b) for a, b in zip(losses, ref_loss, strict=True)) if ref_loss else float("nan")
            name = "torch DDP" if mode == "ddp" else f"shardspeed stage {stage}"
            reps = " / ".join(f"{r['median_step_s']:.3f}" for r in mine)
            lines.append(f"| {name} | {dtype} | {med:.3f} ({reps}) | {ratio:.3f} | {losses[0]:.4f} / "
                         f"{losses[-1]:.4f} | {diff:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stages", default="0", help="comma-separated shardspeed ZeRO stages to include")
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    modes = [("ddp", "fp32", 0), ("ddp", "bf16", 0)]
    modes += [("shardspeed", d, s) for d in ("fp32", "bf16") for s in stages]
    path = os.path.join(OUT, "stage0.jsonl")
    for rep in range(args.reps):
        for mode, dtype, stage in (modes if rep % 2 == 0 else modes[::-1]):
            print(f"rep {rep}: {mode} {dtype} stage {stage}", flush=True)
            launch(2, WORKER, "--mode", mode, "--dtype", dtype, "--stage", str(stage), "--tag", args.tag)
    print(summarize(args.tag, stages))
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
