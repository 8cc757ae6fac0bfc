"""Monitors receive events ``(name, value, x)`` after each optimizer step; x is the number of
samples seen so far (DeepSpeed's convention, so curves of runs with different batch sizes align).

Event names follow DeepSpeed's: ``Train/Samples/train_loss``, ``Train/Samples/lr``,
``Train/Samples/loss_scale``, plus ``Train/Samples/samples_per_sec`` (and tokens/s, TFLOP/s when known).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

Event = tuple[str, float, int]


class TensorBoardMonitor:
    """The real TensorBoard event writer, under ``output_path/job_name``."""

    def __init__(self, output_path: str, job_name: str):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir = os.path.join(output_path or "runs", job_name)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events: list[Event]) -> None:
        for name, value, x in events:
            self.writer.add_scalar(name, value, x)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvMonitor:
    """One ``<metric>.csv`` per event name (``/`` becomes ``_``) under ``output_path/job_name``, with a
    ``step,value`` header: what ``shardspeed-plot`` reads."""

    def __init__(self, output_path: str, job_name: str):
        self.log_dir = os.path.join(output_path or "csv_monitor", job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._files: dict[str, TextIO] = {}

    def file_for(self, name: str) -> str:
        return os.path.join(self.log_dir, name.replace("/", "_") + ".csv")

    def write_events(self, events: list[Event]) -> None:
        for name, value, x in events:
            f = self._files.get(name)
            if f is None:
                path = self.file_for(name)
                fresh = not os.path.exists(path) or os.path.getsize(path) == 0
                f = self._files[name] = open(path, "a")  # noqa: SIM115 (kept open for the run)
                if fresh:
                    f.write("step,value\n")
            f.write(f"{x},{value!r}\n")
        for f in self._files.values():
            f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class ProgressBar:
    """One line rewritten in place: step, loss, lr, samples/s (and the total when known)."""

    def __init__(self, total_steps: int | None = None, stream: TextIO | None = None):
        self.total, self.stream, self.step = total_steps, stream or sys.stderr, 0

    def write_events(self, events: list[Event]) -> None:
        self.step += 1
        values = {name.rsplit("/", 1)[-1]: v for name, v, _ in events}
        of = f"/{self.total}" if self.total else ""
        parts = [f"step {self.step}{of}"]
        for key, label, fmt in (("train_loss", "loss", ".4f"), ("lr", "lr", ".3e"),
                                ("samples_per_sec", "samples/s", ".2f")):
            if key in values:
                parts.append(f"{label} {values[key]:{fmt}}")
        self.stream.write("\r" + "  ".join(parts))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class MonitorMaster:
    """The enabled monitors of a config; only rank 0 writes."""

    def __init__(self, config: Any, rank: int):
        self.monitors: list[Any] = []
        if rank != 0:
            return
        if config.tensorboard.enabled:
            self.monitors.append(TensorBoardMonitor(config.tensorboard.output_path, config.tensorboard.job_name))
        if config.csv_monitor.enabled:
            self.monitors.append(CsvMonitor(config.csv_monitor.output_path, config.csv_monitor.job_name))
        if config.progress_bar.enabled:
            self.monitors.append(ProgressBar(config.progress_bar.total_steps))

    @property
    def enabled(self) -> bool:
        return bool(self.monitors)

    def write_events(self, events: list[Event]) -> None:
        for m in self.monitors:
            m.write_events(events)

    def close(self) -> None:
        for m in self.monitors:
            m.close()
