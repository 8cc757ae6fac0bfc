"""Which dtype each piece of training state lives in, decided once from the config.

[Note: precision policy]
- compute: the dtype of the module's parameters and activations (fp32, bf16 or fp16).
- master:  fp32 copy the optimizer updates. In fp32 training the parameters ARE the masters (no copy).
- grad_accum: where gradients accumulate across micro-batches and get reduced. fp32 by default for
  bf16 and fp16 too: bf16 reductions lose ~3 decimal digits per sum, which is the drift the anchors
  measured in DeepSpeed (3-6e-2 of loss after 25 steps).
- reduce: the dtype on the wire (``communication_data_type``); defaults to grad_accum.
- ``"bf16": {"enabled": "auto"}`` is bf16 where the device computes it natively, else fp32
  (accelerator/bf16.py, Note: native bf16). Forcing bf16 on a CPU that emulates it is allowed but
  warned about: it runs ~100x slower than fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from shardspeed.accelerator import native_bf16
from shardspeed.comm import all_reduce, get_rank, get_world_size, is_initialized
from shardspeed.config import ShardspeedConfig

log = logging.getLogger("shardspeed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}

_said: set[str] = set()  # messages already logged by this process (each is said once)


def _say_once(level: int, msg: str) -> None:
    if get_rank() == 0 and msg not in _said:
        _said.add(msg)
        log.log(level, msg)


def resolve_compute_dtype(cfg: ShardspeedConfig, device_type: str = "cpu") -> str:
    """The compute dtype's name for ``cfg`` on ``device_type``: resolves ``bf16.enabled: "auto"``
    and warns (rank 0, once) when bf16 is forced on a device that only emulates it."""
    requested = cfg.compute_dtype_name
    if requested not in ("bf16", "auto"):
        return requested
    support = native_bf16(device_type)
    native = support.native
    if is_initialized() and get_world_size() > 1:
        # every rank must train in the same dtype (parameter all-gathers, checkpoints): a job whose
        # nodes differ (AVX512-BF16 on one, AVX2 on another) uses bf16 only if all of them have it
        flag = torch.tensor([1 if native else 0], device=device_type if device_type == "cuda" else "cpu")
        all_reduce(flag, op="min")
        if bool(flag.item()) != native:
            support = type(support)(False, f"{support.reason}; another rank has no native bf16")
        native = bool(flag.item())
    device = "GPU" if device_type == "cuda" else "CPU"
    if requested == "auto":
        if native:
            _say_once(logging.INFO, f"bf16: auto -> bf16: this {device} computes bf16 natively ({support.reason})")
            return "bf16"
        _say_once(logging.INFO, f"bf16: auto -> fp32: this {device} has no native bf16 ({support.reason}); "
                                f"emulated bf16 would run ~100x slower than fp32")
        return "fp32"
    if not native:
        _say_once(logging.WARNING,
                  f"bf16.enabled is true but this {device} has no native bf16 ({support.reason}): bf16 is "
                  f"emulated and will run ~100x slower than fp32. Set \"bf16\": {{\"enabled\": \"auto\"}} "
                  f"to use bf16 only where the hardware computes it, or turn bf16 off to train in fp32")
    return "bf16"


@dataclass(frozen=True)
class PrecisionPolicy:
    compute: torch.dtype
    grad_accum: torch.dtype
    reduce: torch.dtype
    loss_scaling: bool

    @property
    def needs_master_copy(self) -> bool:
        return self.compute != torch.float32

    @property
    def compute_name(self) -> str:
        """The resolved compute dtype's name: fp32, bf16 or fp16 (never auto)."""
        return NAMES[self.compute]

    @classmethod
    def from_config(cls, cfg: ShardspeedConfig, device_type: str = "cpu") -> PrecisionPolicy:
        compute = DTYPES[resolve_compute_dtype(cfg, device_type)]
        accum = DTYPES[cfg.data_types.grad_accum_dtype or "fp32"]
        reduce = DTYPES[cfg.communication_data_type] if cfg.communication_data_type else accum
        return cls(compute=compute, grad_accum=accum, reduce=reduce, loss_scaling=cfg.fp16.enabled)
