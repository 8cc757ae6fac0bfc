"""``shardspeed-lr-range RUN_DIR``: read an LR range test from a run's CSV monitor files (``lr`` and
``train_loss`` per step), plot loss against lr to a PNG and print the suggested ``OneCycle`` range.

A run becomes a range test with ``"scheduler": {"type": "LRRangeTest", ...}`` and ``csv_monitor`` on;
``shardspeed.optim.range_test_params(min_lr, max_lr, steps)`` gives parameters for a linear sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shardspeed.optim.range_test import RangeSuggestion, suggest_one_cycle
from shardspeed.utils.plot import read_series


def plot_range_test(lrs: list[float], losses: list[float], s: RangeSuggestion, path: str, title: str = "") -> str:
    """Loss (raw and smoothed) against lr on a log axis, with the suggested range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="0.75", lw=0.8, label="loss per step")
    shown = [(x, y) for x, y in zip(lrs, s.smoothed, strict=True) if y != float("inf")]
    ax.plot([x for x, _ in shown], [y for _, y in shown], color="C0", lw=1.8, label="smoothed")
    ax.axvspan(s.cycle_min_lr, s.cycle_max_lr, color="C2", alpha=0.15,
               label=f"suggested OneCycle {s.cycle_min_lr:.2g} .. {s.cycle_max_lr:.2g}")
    ax.axvline(s.lr_at_min_loss, color="C3", ls="--", lw=1, label=f"lowest smoothed loss @ {s.lr_at_min_loss:.2g}")
    if s.diverged_at_lr is not None:
        ax.axvline(s.diverged_at_lr, color="k", ls=":", lw=1, label=f"diverged @ {s.diverged_at_lr:.2g}")
    finite = [y for _, y in shown]
    ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), max(finite[0], min(finite)) * 1.25 + 1e-9)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or "LR range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(lrs: list[float], losses: list[float], png: str, title: str = "") -> RangeSuggestion:
    """Suggest, plot, print the suggestion; the suggestion also lands next to the PNG as JSON."""
    s = suggest_one_cycle(lrs, losses)
    plot_range_test(lrs, losses, s, png, title)
    with open(os.path.splitext(png)[0] + ".json", "w") as f:
        json.dump({"cycle_min_lr": s.cycle_min_lr, "cycle_max_lr": s.cycle_max_lr,
                   "lr_at_min_loss": s.lr_at_min_loss, "lr_steepest": s.lr_steepest,
                   "diverged_at_lr": s.diverged_at_lr, "steps": len(lrs)}, f, indent=1)
    div = f"{s.diverged_at_lr:.3g}" if s.diverged_at_lr is not None else "not reached"
    print(f"LR range test over {len(lrs)} steps, lr {lrs[0]:.3g} .. {lrs[-1]:.3g}: lowest smoothed loss at lr "
          f"{s.lr_at_min_loss:.3g}, steepest fall at {s.lr_steepest:.3g}, divergence {div}\n"
          f"suggested OneCycle: cycle_min_lr {s.cycle_min_lr:.3g}, cycle_max_lr {s.cycle_max_lr:.3g}  (plot: {png})")
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardspeed-lr-range", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the csv_monitor folder of a range-test run (output_path/job_name)")
    parser.add_argument("--out", help="PNG path (default: RUN_DIR/lr_range_test.png)")
    args = parser.parse_args(argv)
    try:
        _, lrs = read_series(os.path.join(args.run_dir, "Train_Samples_lr.csv"))
        _, losses = read_series(os.path.join(args.run_dir, "Train_Samples_train_loss.csv"))
        report(lrs, losses, args.out or os.path.join(args.run_dir, "lr_range_test.png"))
    except (OSError, ValueError) as e:
        print(f"shardspeed-lr-range: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
