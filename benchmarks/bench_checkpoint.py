"""Checkpoint save and load time and bytes on disk, shardspeed against DeepSpeed, side by side.

    .venv/bin/python benchmarks/bench_checkpoint.py [--ds-venv ../.venv-deepspeed]

2 ranks, fp32, a ~46M-parameter GPT, AdamW after one step, ZeRO stages 2 and 3; each save and load
timed between barriers, on this machine's local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, launch  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ckpt_worker.py")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    out = os.path.join(OUT, "checkpoint.jsonl")
    if os.path.exists(out):
        os.remove(out)
    tmp = tempfile.mkdtemp()
    torchrun = os.path.join(args.ds_venv, "bin", "torchrun")
    for stage in (2, 3):
        launch(2, WORKER, "--stage", str(stage), "--dir", os.path.join(tmp, f"ss{stage}"), "--out", out)
        if os.path.exists(torchrun):
            subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", WORKER, "--deepspeed", "--stage",
                            str(stage), "--dir", os.path.join(tmp, f"ds{stage}"), "--out", out], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    print("| library | ZeRO stage | save s | load s | bytes on disk | bytes/param |\n|---|---|---|---|---|---|")
    with open(out) as f:
        for r in map(json.loads, f):
            mib, per = r["bytes"] / 2**20, r["bytes"] / r["n_params"]
            print(f"| {r['lib']} | {r['stage']} | {r['save_s']:.2f} | {r['load_s']:.2f} | {mib:.0f} MiB | {per:.1f} |")


if __name__ == "__main__":
    main()
