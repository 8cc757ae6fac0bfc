"""Device abstraction: which device a rank computes on, its collective backend, memory readings."""

from shardspeed.accelerator.device import Accelerator, get_accelerator

__all__ = ["Accelerator", "get_accelerator"]
