"""Typed configuration (DeepSpeed's keys), loading and batch-size arithmetic."""

from shardspeed.config.batch import BatchSizes, resolve_batch_sizes
from shardspeed.config.errors import ConfigError
from shardspeed.config.loader import config_from_args, load_config
from shardspeed.config.schema import ShardspeedConfig

__all__ = ["BatchSizes", "ConfigError", "ShardspeedConfig", "config_from_args", "load_config",
           "resolve_batch_sizes"]
