"""``shardspeed-plot RUN_DIR``: PNG plots of a run's CSV monitor files (loss, learning rate, loss
scale, throughput), one image per metric and a ``summary.png`` with all of them.

RUN_DIR is the ``csv_monitor`` folder of one job (``output_path/job_name``): one ``<metric>.csv``
per metric with a ``step,value`` header, x = samples seen.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

# (file stem, title, y label, log scale) in the order of the summary
PLOTS = [("Train_Samples_train_loss", "loss", "loss", False),
         ("Train_Samples_lr", "learning rate", "lr", False),
         ("Train_Samples_loss_scale", "loss scale", "loss scale", True),
         ("Train_Samples_samples_per_sec", "throughput", "samples/s", False)]


def read_series(path: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["step", "value"]:
            raise ValueError(f"{path}: expected a 'step,value' header (a shardspeed csv_monitor file), got {header}")
        for line_no, row in enumerate(rows, start=2):
            try:
                xs.append(float(row[0]))
                ys.append(float(row[1]))
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{line_no}: not a 'step,value' row: {row}") from None
    return xs, ys


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs; returns their paths. Metrics without a CSV are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such folder (give the csv_monitor output_path/job_name folder)")
    found = [(p, read_series(os.path.join(run_dir, p[0] + ".csv"))) for p in PLOTS
             if os.path.exists(os.path.join(run_dir, p[0] + ".csv"))]
    if not found:
        raise FileNotFoundError(f"{run_dir}: none of {', '.join(p[0] + '.csv' for p in PLOTS)} is there; is "
                                "csv_monitor enabled in the config, and is this its output_path/job_name folder?")
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (stem, title, ylabel, log), (xs, ys) in found:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, xs, ys, title, ylabel, log)
        path = os.path.join(out_dir, stem.replace("Train_Samples_", "") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.6), squeeze=False)
    for ax, ((_, title, ylabel, log), (xs, ys)) in zip(axes[0], found, strict=True):
        _draw(ax, xs, ys, title, ylabel, log)
    fig.tight_layout()
    path = os.path.join(out_dir, "summary.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return written + [path]


def _draw(ax, xs: list[float], ys: list[float], title: str, ylabel: str, log: bool) -> None:
    ax.plot(xs, ys, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("samples")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log", base=2)
    ax.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shardspeed-plot", description=__doc__.split("\n\n")[0],
                                 epilog="example: shardspeed-plot runs/csv/my_job --out plots/")
    ap.add_argument("run_dir", help="a csv_monitor folder (output_path/job_name)")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")
    args = ap.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"shardspeed-plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
