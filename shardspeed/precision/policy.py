"""Which dtype each piece of training state lives in, decided once from the config.

[Note: precision policy]
- compute: the dtype of the module's parameters and activations (fp32, bf16 or fp16).
- master:  fp32 copy the optimizer updates. In fp32 training the parameters ARE the masters (no copy).
- grad_accum: where gradients accumulate across micro-batches and get reduced. fp32 by default for
  bf16 and fp16 too: bf16 reductions lose ~3 decimal digits per sum, which is the drift the anchors
  measured in DeepSpeed (3-6e-2 of loss after 25 steps).
- reduce: the dtype on the wire (``communication_data_type``); defaults to grad_accum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardspeed.config import ShardspeedConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    compute: torch.dtype
    grad_accum: torch.dtype
    reduce: torch.dtype
    loss_scaling: bool

    @property
    def needs_master_copy(self) -> bool:
        return self.compute != torch.float32

    @classmethod
    def from_config(cls, cfg: ShardspeedConfig) -> PrecisionPolicy:
        compute = DTYPES[cfg.compute_dtype_name]
        accum = DTYPES[cfg.data_types.grad_accum_dtype or "fp32"]
        reduce = DTYPES[cfg.communication_data_type] if cfg.communication_data_type else accum
        return cls(compute=compute, grad_accum=accum, reduce=reduce, loss_scaling=cfg.fp16.enabled)
