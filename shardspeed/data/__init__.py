"""Data loading: one shard of the dataset per data-parallel rank, at the configured micro-batch size."""

from shardspeed.data.loader import RepeatingLoader, ResumableLoader, build_dataloader

__all__ = ["RepeatingLoader", "ResumableLoader", "build_dataloader"]
