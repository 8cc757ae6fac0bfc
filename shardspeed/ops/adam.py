"""``shardspeed.ops.adam.FusedAdam``: the name DeepSpeed scripts import."""

from shardspeed.optim.adam import FusedAdam

DeepSpeedCPUAdam = FusedAdam  # on CPU our FusedAdam already runs torch's fused CPU kernel

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]
