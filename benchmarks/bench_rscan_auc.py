"""The talk's RScan table in miniature (issue 15): time to a fixed held-out AUC for

1. 1 rank, dense gradients, constant lr (the baseline),
2. 2 ranks, dense gradients, constant lr,
3. 2 ranks, sparse gradients, constant lr,
4. 2 ranks, sparse gradients, OneCycle over the range an LR range test suggests (the test runs first,
   in this command, at 2 ranks with sparse gradients),

with efficiency (samples/s), effectiveness (samples to the target, inverted: the talk's "AUC/samples")
and wall clock (training seconds to the target, inverted: "AUC/second") relative to the baseline.

    .venv/bin/python benchmarks/bench_rscan_auc.py [--target 0.85] [--lr 3e-3] [--grads sparse]

Every run is examples/rscan/train.py through the launcher, 1 thread per rank, the same data, seed and
model; the per-rank micro-batch is 64 queries everywhere, so 2 ranks take global batches of 128 (half
the updates per sample, the talk's "less frequent model updates"). Training seconds exclude the
held-out evaluations. The crossing of the target is interpolated linearly between the two evaluations
around it. Rows: benchmarks/out/rscan_auc.jsonl; curves and range test: benchmarks/figures/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, append_result, read_results  # noqa: E402

FIGURES = os.path.join(ROOT, "benchmarks", "figures")
TRAIN = os.path.join(ROOT, "examples", "rscan", "train.py")
CONFIG = os.path.join(ROOT, "examples", "rscan", "ds_config.json")


def train(name: str, ranks: int, extra: list[str], args: argparse.Namespace) -> str:
    out = os.path.join(OUT, "rscan_auc", name)
    shutil.rmtree(out, ignore_errors=True)
    from shardspeed.comm import free_port  # a port of our own: others' jobs share this machine

    cmd = [sys.executable, "-m", "shardspeed.launcher", "--num_procs", str(ranks), "--master_port",
           str(free_port()), TRAIN, "--deepspeed_config",
           CONFIG, "--eval_every", str(args.eval_every), "--eval_limit", str(args.eval_limit), "--out", out, *extra]
    print(f"{name}: {' '.join(cmd[7:])}", flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    tail = [line for line in p.stdout.splitlines() if "final held-out AUC" in line or "suggested" in line]
    print("  " + "\n  ".join(tail), flush=True)
    if not os.path.exists(os.path.join(out, "auc.jsonl")):
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return out


def crossing(curve: list[dict], target: float) -> dict | None:
    """Samples and training seconds where the AUC first reaches ``target`` (linear between evaluations)."""
    for a, b in zip(curve, curve[1:], strict=False):
        if b["auc"] >= target:
            f = 1.0 if b["auc"] == a["auc"] else min(1.0, max(0.0, (target - a["auc"]) / (b["auc"] - a["auc"])))
            return {k: a[k] + f * (b[k] - a[k]) for k in ("samples", "train_s", "step")}
    return None


def load_curve(out: str) -> list[dict]:
    with open(os.path.join(out, "auc.jsonl")) as f:
        return [json.loads(line) for line in f]


def plot(curves: dict[str, list[dict]], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, c in curves.items():
        ax1.plot([r["train_s"] for r in c], [r["auc"] for r in c], marker=".", label=name)
        ax2.plot([r["samples"] for r in c], [r["auc"] for r in c], marker=".", label=name)
    for ax, label in ((ax1, "training seconds (evaluation excluded)"), (ax2, "queries seen")):
        ax.axhline(target, color="k", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("held-out AUC")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"RScan in miniature: held-out AUC (target {target})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--lr", type=float, default=3e-3, help="the constant lr of runs 1-3")
    ap.add_argument("--max_steps", type=int, default=600, help="a run that has not reached the target stops here")
    ap.add_argument("--onecycle_steps", type=int, default=200, help="OneCycle's planned length (run 4)")
    ap.add_argument("--range", default="1e-4,5e-2", help="the range test's sweep")
    ap.add_argument("--range_steps", type=int, default=200)
    ap.add_argument("--grads", default="sparse", choices=["sparse", "flag"],
                    help="what 'sparse' means in runs 3-4: sparse=True table (lazy Adam) or dense table + flag")
    ap.add_argument("--eval_every", type=int, default=20)
    ap.add_argument("--eval_limit", type=int, default=600)
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    os.makedirs(FIGURES, exist_ok=True)
    print("load before:", os.getloadavg(), flush=True)
    common = ["--target_auc", str(args.target)]
    rng = train("range test", 2, ["--grads", args.grads, "--range_test", args.range, "--steps",
                                  str(args.range_steps), "--eval_every", str(10**6)], args)
    with open(os.path.join(rng, "lr_range_test.json")) as f:
        suggestion = json.load(f)
    shutil.copy(os.path.join(rng, "lr_range_test.png"), os.path.join(FIGURES, "rscan_lr_range_test.png"))
    one_cycle = f"{suggestion['cycle_min_lr']:.3g},{suggestion['cycle_max_lr']:.3g}"
    kind = "sparse" if args.grads == "sparse" else "sparse (dense table + flag)"
    runs = [("1 rank dense, constant lr (baseline)", 1,
             ["--grads", "dense", "--train_batch_size", "64", "--lr", str(args.lr), "--steps", str(args.max_steps)]),
            ("2 ranks dense, constant lr", 2,
             ["--grads", "dense", "--lr", str(args.lr), "--steps", str(args.max_steps)]),
            (f"2 ranks {kind}, constant lr", 2,
             ["--grads", args.grads, "--lr", str(args.lr), "--steps", str(args.max_steps)]),
            (f"2 ranks {kind} + OneCycle {one_cycle}", 2,
             ["--grads", args.grads, "--onecycle", one_cycle, "--steps", str(args.onecycle_steps)])]
    curves, rows = {}, []
    for name, ranks, extra in runs:
        out = train(name, ranks, extra + common, args)
        curve = load_curve(out)
        curves[name] = curve
        hit = crossing(curve, args.target)
        last = curve[-1]
        row = {"name": name, "ranks": ranks, "tag": args.tag, "target": args.target, "hit": hit,
               "samples_per_s": last["samples"] / last["train_s"], "final_auc": last["auc"],
               "steps": last["step"], "one_cycle": one_cycle if "OneCycle" in name else None,
               "range_test": suggestion, "load": os.getloadavg()}
        rows.append(row)
        append_result("rscan_auc", row)
    plot(curves, args.target, os.path.join(FIGURES, "rscan_auc_curves.png"))
    print("load after:", os.getloadavg())
    print(table(rows))


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| run | samples/s | queries to target | s to target | efficiency | effectiveness | wall clock |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = r["samples_per_s"] / base["samples_per_s"]
        if r["hit"] and base["hit"]:
            eft = base["hit"]["samples"] / r["hit"]["samples"]
            wall = base["hit"]["train_s"] / r["hit"]["train_s"]
            hit = f"{r['hit']['samples']:.0f} | {r['hit']['train_s']:.1f}"
            rel = f"{eft:.2f}x | {wall:.2f}x"
        else:
            hit, rel = f"not reached (AUC {r['final_auc']:.4f} after {r['steps']} steps) | -", "0x | 0x"
        lines.append(f"| {r['name']} | {r['samples_per_s']:.0f} | {hit} | {eff:.2f}x | {rel} |")
    return "\n".join(lines)


def report_again(tag: str) -> None:
    """The table and the curves' PNG again from the saved rows and run folders (no training)."""
    rows = [r for r in read_results("rscan_auc") if r["tag"] == tag][-4:]
    curves = {r["name"]: load_curve(os.path.join(OUT, "rscan_auc", r["name"])) for r in rows}
    plot(curves, rows[0]["target"], os.path.join(FIGURES, "rscan_auc_curves.png"))
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":  # --table [TAG]
        report_again(sys.argv[2] if len(sys.argv) > 2 else "run")
    else:
        main()
