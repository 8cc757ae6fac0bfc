"""``shardspeed.ops.lamb.FusedLamb``: the name DeepSpeed scripts import."""

from shardspeed.optim.lamb import FusedLamb

__all__ = ["FusedLamb"]
