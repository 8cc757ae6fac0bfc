"""shardspeed: ZeRO data parallelism, mixed precision and large-batch training for PyTorch.

A DeepSpeed script runs after ``import shardspeed as deepspeed``.

[Note: lazy package] The names below are imported on first use, so ``python -m shardspeed.launcher``
starts ranks without importing torch in the launcher (about a second saved on every launch), and
``import shardspeed`` costs only what a script touches.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_NAMES = {
    "ConfigError": ("shardspeed.config", "ConfigError"),
    "ShardspeedConfig": ("shardspeed.config", "ShardspeedConfig"),
    "RepeatingLoader": ("shardspeed.data", "RepeatingLoader"),
    "ShardspeedEngine": ("shardspeed.engine", "ShardspeedEngine"),
    "DeepSpeedEngine": ("shardspeed.engine", "ShardspeedEngine"),  # the name DeepSpeed scripts check against
    "add_config_arguments": ("shardspeed.engine", "add_config_arguments"),
    "initialize": ("shardspeed.engine", "initialize"),
    "init_distributed": ("shardspeed.comm", "init_distributed"),
    "initialize_model_parallel": ("shardspeed.comm", "initialize_model_parallel"),
}

__all__ = ["ConfigError", "DeepSpeedEngine", "RepeatingLoader", "ShardspeedConfig", "ShardspeedEngine",
           "__version__", "add_config_arguments", "checkpointing", "comm", "init_distributed", "initialize",
           "initialize_model_parallel", "monitor", "ops", "pipe", "profiling", "tensor_parallel", "zero"]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        module, attr = _NAMES[name]
        value = getattr(importlib.import_module(module), attr)
    elif not name.startswith("_"):
        try:  # a subpackage: shardspeed.zero, shardspeed.checkpointing, ...
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'shardspeed' has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module 'shardspeed' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
