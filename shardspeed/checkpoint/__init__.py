"""Checkpoints that resume exactly and load at any world size or ZeRO stage; fp32 consolidation."""

from shardspeed.checkpoint.engine_io import full_module_state, load_checkpoint, save_checkpoint
from shardspeed.checkpoint.files import CheckpointError

__all__ = ["CheckpointError", "full_module_state", "load_checkpoint", "save_checkpoint"]
