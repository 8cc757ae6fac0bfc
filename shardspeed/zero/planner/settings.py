"""The settings that decide memory, read from a config the way the engine reads them.

[Note: same defaults as the engine] Every default here mirrors ``engine/engine.py`` and the
strategies: an unset ``reduce_bucket_size`` is 25 MiB of gradient-accumulation dtype (DDP's bucket),
an unset ``allgather_bucket_size`` follows it, an unset ``stage3_prefetch_bucket_size`` is sized to
the model (zero/stage3.py, Note: default windows). A planner that read the schema's defaults
(5e8) would predict buffers the engine never allocates. Change both places together.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardspeed.accelerator import native_bf16
from shardspeed.config import ConfigError, ShardspeedConfig, load_config
from shardspeed.config.schema import OffloadConfig
from shardspeed.zero.stage3_parts import Stage3Options

DDP_BUCKET_BYTES = 25 * 2**20  # engine.py's _DDP_BUCKET_BYTES
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class OptimizerKind:
    """Per-element bytes of optimizer state (fp32, on the masters) and of the step's temporaries."""

    name: str
    state_bytes: int  # per master element, kept between steps
    step_temp_bytes: int  # per master element, alive only during step() (0 for torch's fused CPU/CUDA Adam)


def optimizer_kind(cfg: ShardspeedConfig) -> OptimizerKind:
    """What ``optim/build.py`` would build. Without an ``optimizer`` section the client passes its own:
    AdamW is assumed (and said in the plan)."""
    if cfg.optimizer is None:
        return OptimizerKind("AdamW (assumed: no optimizer section)", 8, 0)
    kind, p = cfg.optimizer.type.lower(), cfg.optimizer.params
    if kind in ("adam", "adamw"):
        state = 12 if p.get("amsgrad") else 8
        # FusedAdam runs torch's fused kernel (no temporaries) unless bias correction is off, torch_adam
        # picks torch's default or foreach is forced: those keep sqrt(v) for every element (optim/adam.py)
        fused = p.get("bias_correction", True) and not p.get("amsgrad") and not p.get("torch_adam") \
            and p.get("foreach") is None and p.get("fused") is not False
        return OptimizerKind(cfg.optimizer.type, state, 0 if fused else 4)
    if kind == "lamb":
        return OptimizerKind("Lamb", 8, 8)  # the update and its square, for the trust ratio (optim/lamb.py)
    if kind == "sgd":
        return OptimizerKind("SGD", 4 if p.get("momentum", 0) else 0, 0)
    if kind == "adagrad":
        return OptimizerKind("Adagrad", 4, 4)
    raise ConfigError(f"optimizer.type '{cfg.optimizer.type}': the planner knows Adam, AdamW, Lamb, SGD and Adagrad")


@dataclass(frozen=True)
class PlanSettings:
    stage: int
    world: int  # data-parallel ranks
    compute: str  # fp32 | bf16 | fp16 (resolved)
    accum: str
    reduce: str
    bucket_numel: int
    allgather_numel: int
    optimizer: OptimizerKind
    z3: Stage3Options = field(default_factory=Stage3Options)
    offload_optimizer: OffloadConfig | None = None
    offload_param: OffloadConfig | None = None
    sub_group_size: int = 1_000_000_000
    device_type: str = "cpu"  # where the model computes: on "cpu", device and host are one memory
    zero_init: bool = False  # the model is built under zero.Init (stage 3): never whole on a rank

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute]

    @property
    def accum_bytes(self) -> int:
        return DTYPE_BYTES[self.accum]

    @property
    def reduce_bytes(self) -> int:
        return DTYPE_BYTES[self.reduce]


@dataclass(frozen=True)
class OffloadSections:
    """The config's offload sections and ``sub_group_size`` (a separate argument so the estimators can
    ask about settings without writing a config)."""

    optimizer: OffloadConfig | None = None
    param: OffloadConfig | None = None
    sub_group_size: int = 1_000_000_000


def settings_from_config(cfg: ShardspeedConfig, world: int, device_type: str = "cpu", zero_init: bool = False,
                         offload: OffloadSections | None = None) -> PlanSettings:
    """The planner's view of ``cfg`` for ``world`` data-parallel ranks (Note: same defaults as the engine)."""
    if world < 1:
        raise ValueError(f"the number of ranks must be at least 1, got {world}")
    z = cfg.zero_optimization
    compute = cfg.compute_dtype_name
    if compute == "auto":
        compute = "bf16" if native_bf16(device_type).native else "fp32"
    accum = cfg.data_types.grad_accum_dtype or "fp32"
    reduce = cfg.communication_data_type or accum
    bucket = (z.reduce_bucket_size if "reduce_bucket_size" in z.model_fields_set
              else DDP_BUCKET_BYTES // DTYPE_BYTES[accum])
    gather = z.allgather_bucket_size if "allgather_bucket_size" in z.model_fields_set else bucket
    prefetch = z.stage3_prefetch_bucket_size if "stage3_prefetch_bucket_size" in z.model_fields_set else None
    z3 = Stage3Options(prefetch_numel=prefetch, persistence_threshold=z.stage3_param_persistence_threshold,
                       max_live_numel=z.stage3_max_live_parameters, coalesce_layers=z.stage3_coalesce_layers,
                       max_reuse_distance=z.stage3_max_reuse_distance, optimizer_in_backward=z.optimizer_in_backward)
    off = offload if offload is not None else OffloadSections(z.offload_optimizer, z.offload_param, z.sub_group_size)
    return PlanSettings(stage=z.stage, world=world, compute=compute, accum=accum, reduce=reduce, bucket_numel=bucket,
                        allgather_numel=gather, optimizer=optimizer_kind(cfg), z3=z3,
                        offload_optimizer=_active(off.optimizer), offload_param=_active(off.param),
                        sub_group_size=off.sub_group_size,
                        device_type=device_type, zero_init=zero_init)


def _active(o: OffloadConfig | None) -> OffloadConfig | None:
    return o if o is not None and o.device != "none" else None


def load_plan_config(source: str | Path | dict[str, Any]) -> tuple[ShardspeedConfig, OffloadSections]:
    """The config (validated as the engine validates it: offload where it applies, nvme_path set,
    sub_group_size only with optimizer offload to nvme) and its offload sections."""
    cfg = load_config(copy.deepcopy(source) if isinstance(source, dict) else source)
    z = cfg.zero_optimization
    return cfg, OffloadSections(z.offload_optimizer, z.offload_param, z.sub_group_size)
