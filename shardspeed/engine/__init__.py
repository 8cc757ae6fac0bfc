"""The engine (forward/backward/step) and ``initialize()``."""

from shardspeed.engine.engine import ShardspeedEngine
from shardspeed.engine.initialize import add_config_arguments, initialize

__all__ = ["ShardspeedEngine", "add_config_arguments", "initialize"]
