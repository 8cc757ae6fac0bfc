"""Every benchmark of RESULTS.md, one after another (about 1.5 hours on the 2-core machine; the scale
probe needs the machine to itself). ``make bench`` runs this.

    .venv/bin/python benchmarks/run_all.py [--skip scale,recompute]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = [
    ("speed", ["bench_speed.py", "--stages", "0,1,2,3", "--reps", "2"]),
    ("drift", ["bench_bf16_drift.py", "--stages", "1,2,3"]),
    ("overhead", ["bench_overhead.py"]),
    ("optimizer", ["bench_optimizer.py"]),
    ("memory", ["bench_memory.py"]),
    ("checkpoint", ["bench_checkpoint.py"]),
    ("recompute", ["bench_recompute.py", "--reps", "2"]),
    ("launch", ["bench_launch.py", "--reps", "3"]),
    ("scale", ["bench_scale.py", "--layers", "24,25,26"]),
    ("rscan_comm", ["bench_rscan_comm.py", "--reps", "3"]),
    ("rscan_auc", ["bench_rscan_auc.py"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", default="", help="comma-separated names: " + ", ".join(n for n, _ in BENCHES))
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    for name, cmd in BENCHES:
        if name in skip:
            continue
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], check=True, cwd=os.path.dirname(HERE))


if __name__ == "__main__":
    main()
