"""shardspeed: ZeRO data parallelism, mixed precision and large-batch training for PyTorch.

A DeepSpeed script runs after ``import shardspeed as deepspeed``.
"""

import sys

from shardspeed import ops, zero
from shardspeed.activation import checkpointing
from shardspeed.comm import init_distributed
from shardspeed.config import ConfigError, ShardspeedConfig
from shardspeed.data import RepeatingLoader
from shardspeed.engine import ShardspeedEngine, add_config_arguments, initialize

# ``deepspeed.checkpointing`` is a module: make ``import shardspeed.checkpointing`` work the same way
sys.modules[f"{__name__}.checkpointing"] = checkpointing

__version__ = "0.1.0"
DeepSpeedEngine = ShardspeedEngine  # the name DeepSpeed scripts type-check against

__all__ = ["ConfigError", "checkpointing", "DeepSpeedEngine", "RepeatingLoader", "ShardspeedConfig", "ShardspeedEngine",
           "__version__", "add_config_arguments", "init_distributed", "initialize", "ops", "zero"]
