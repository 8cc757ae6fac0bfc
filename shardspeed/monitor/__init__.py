"""Where training metrics go: TensorBoard, CSV files, a progress line (rank 0 only)."""

from shardspeed.monitor.monitors import CsvMonitor, MonitorMaster, ProgressBar, TensorBoardMonitor

__all__ = ["CsvMonitor", "MonitorMaster", "ProgressBar", "TensorBoardMonitor"]
