"""``shardspeed.checkpointing`` (DeepSpeed's ``deepspeed.checkpointing``): the same module object as
``shardspeed.activation.checkpointing``, so ``configure()`` and ``checkpoint()`` share one state."""

import sys

from shardspeed.activation import checkpointing as _impl

sys.modules[__name__] = _impl
