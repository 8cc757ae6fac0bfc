"""DeepSpeed-compatible import paths for the optimizers (``deepspeed.ops.adam.FusedAdam`` etc.)."""
