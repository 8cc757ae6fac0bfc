"""Device abstraction: which device a rank computes on, its collective backend, memory readings,
and whether it computes bf16 natively."""

from shardspeed.accelerator.bf16 import Bf16Support, native_bf16
from shardspeed.accelerator.device import Accelerator, get_accelerator

__all__ = ["Accelerator", "Bf16Support", "get_accelerator", "native_bf16"]
