"""How far bf16 training drifts from fp32 in 25 steps: shardspeed against FSDP2 and DeepSpeed, 2 ranks,
on the anchors' exact model and data (../shared/anchors/bench.py), side by side in one run.

    .venv/bin/python benchmarks/bench_bf16_drift.py [--ds-venv ../.venv-deepspeed]

Reference: torch DDP in fp32. Each bf16 run is compared step by step; the number is the largest
absolute loss difference over the 25 steps (the anchors' measure). Every bf16 mode is run with both of
torch's AdamW kernels (foreach, which the anchors used, and fused, shardspeed's default): their fp32
roundings differ by an ulp, and bf16 parameters turn that into a visibly different loss curve, so a
fair comparison of engines holds the kernel fixed.
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

from common import ANCHORS_DIR, OUT, ROOT, append_result, launch, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_worker.py")
TAG = "bf16-drift"


def run_deepspeed(ds_venv: str, zero: int) -> None:
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(ANCHORS_DIR, "bench.py"), tmp)
    out = os.path.join(tmp, "ds.jsonl")
    # check=False: torch 2.13's gloo can abort a rank at exit after the results were written
    subprocess.run([os.path.join(ds_venv, "bin", "torchrun"), "--standalone", "--nproc_per_node", "2",
                    os.path.join(tmp, "bench.py"), "--mode", "ds", "--zero", str(zero), "--dtype", "bf16",
                    "--ds-clip", "0", "--no-count", "--out", out], check=False, cwd=tmp,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(out) as f:
        rec = json.loads(f.readline())
    append_result("stage0", {"mode": "deepspeed", "dtype": "bf16", "stage": zero, "tag": TAG, "model": "anchors",
                             "adam": "foreach", "median_step_s": rec["median_step_s"], "losses": rec["losses"]})


def summarize() -> str:
    rows = [r for r in read_results("stage0") if r["tag"] == TAG]
    ref = next(r["losses"] for r in rows if r["mode"] == "ddp" and r["adam"] == "foreach")
    lines = ["| mode | dtype | AdamW kernel | loss @1 / @10 / @25 | max abs loss diff vs DDP fp32, 25 steps |",
             "|---|---|---|---|---|"]
    for r in rows:
        name = {"ddp": "torch DDP", "fsdp2": "torch FSDP2 (bf16 params, fp32 reduce)",
                "shardspeed": f"shardspeed stage {r['stage']}", "deepspeed": f"DeepSpeed ZeRO-{r['stage']}"}[r["mode"]]
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref, strict=True))
        lo = r["losses"]
        lines.append(f"| {name} | {r['dtype']} | {r['adam']} | {lo[0]:.4f} / {lo[9]:.4f} / {lo[24]:.4f} | {diff:.2e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    args = ap.parse_args()
    path = os.path.join(OUT, "stage0.jsonl")
    if os.path.exists(path):  # one table per run: drop this benchmark's earlier rows
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get("tag") != TAG]
        with open(path, "w") as f:
            f.writelines(keep)
    common = ["--model", "anchors", "--warmup", "5", "--steps", "20", "--tag", TAG]
    for adam in ("foreach", "fused"):
        launch(2, WORKER, "--mode", "ddp", "--dtype", "fp32", "--adam", adam, *common)
        launch(2, WORKER, "--mode", "fsdp2", "--dtype", "bf16", "--adam", adam, *common)
        for s in args.stages.split(","):
            launch(2, WORKER, "--mode", "shardspeed", "--dtype", "bf16", "--stage", s, "--adam", adam, *common)
    if os.path.exists(os.path.join(args.ds_venv, "bin", "torchrun")):
        for s in args.stages.split(","):
            run_deepspeed(args.ds_venv, int(s))
    print(summarize())


if __name__ == "__main__":
    main()
