"""Typed configuration: DeepSpeed's JSON keys and shapes, validated field by field.

Every section forbids unknown keys, so a typo is an error (with the closest valid name, see
``loader.py``) instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from shardspeed.config.unsupported import unsupported_settings


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class OptimizerConfig(Section):
    type: str = Field(description="Adam, AdamW, Lamb or SGD (case-insensitive)")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the optimizer")
    legacy_fusion: bool = False


class SchedulerConfig(Section):
    type: str = Field(description="WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle or LRRangeTest")
    params: dict[str, Any] = Field(default_factory=dict)


class FP16Config(Section):
    enabled: bool = False
    auto_cast: bool = False
    loss_scale: float = Field(0.0, ge=0, description="0 selects dynamic loss scaling; > 0 a static scale")
    initial_scale_power: int = Field(16, ge=0, le=64, description="dynamic scaling starts at 2**power")
    loss_scale_window: int = Field(1000, ge=1, description="clean steps before the scale doubles")
    hysteresis: int = Field(2, ge=1, description="overflows tolerated before the scale halves")
    consecutive_hysteresis: bool = False
    min_loss_scale: float = Field(1.0, gt=0)
    fp16_master_weights_and_grads: bool = False


class BF16Config(Section):
    # "auto": bf16 where the device computes it natively, else fp32 (precision/policy.py); true forces
    # bf16 even where it is emulated (~100x slower than fp32 on an AVX2-only CPU; warned about)
    enabled: bool | Literal["auto"] = False
    immediate_grad_update: bool = False

    @field_validator("enabled", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> Any:
        # One message instead of pydantic's two (one per member of the union); what pydantic reads
        # as a bool (1, "true", ...) stays accepted, as before "auto" existed.
        if value == "auto":
            return value
        try:
            return TypeAdapter(bool).validate_python(value)
        except ValidationError:
            raise ValueError(f'bf16.enabled must be true, false or "auto", got {value!r}') from None


MAX_IN_CPU_DEFAULT = 1_000_000_000


class OffloadConfig(Section):
    """``zero_optimization.offload_optimizer`` / ``offload_param``: where a tier of model state lives
    (zero/swap_optimizer.py, Note: optimizer state on disk).

    ``device``: "none" keeps it with the training device; "cpu" is host memory, which on a CPU run
    is where it already is (accepted, changes nothing, logged once); "nvme" is files under
    ``nvme_path`` (one directory per rank, removed at exit)."""

    device: Literal["none", "cpu", "nvme"] = "none"
    # pinned host buffers only exist next to an accelerator; on a CPU run any value means the same
    pin_memory: bool = False
    nvme_path: str | None = None
    # offload_optimizer: sub-group buffers in the read/step/write ring (at least 2; 3 lets the
    # write-back of one sub-group overlap the step of the next); offload_param: gathered-shard buffers
    buffer_count: int = Field(5, ge=1)
    buffer_size: int = Field(100_000_000, ge=1)  # offload_param: elements per parameter buffer
    # DeepSpeed's offload_param: elements kept in memory when on nvme. Not implemented: only the default
    # is accepted (ZeroConfig._offload_where_it_applies), so no value is silently ignored
    max_in_cpu: int = Field(MAX_IN_CPU_DEFAULT, ge=0)
    # DeepSpeed's faster start-up of NVMe state; our swap files start empty (state is written at the
    # first step), so both values behave alike
    fast_init: bool = False
    # DeepSpeed's switches for overlapping reads/writes with the step: ours always overlap them
    pipeline_read: bool = False
    pipeline_write: bool = False
    # offload_optimizer: the fraction of the optimizer state (by sub-group, in step order) put on the
    # tier; the rest stays in memory
    ratio: float = Field(1.0, gt=0, le=1)


class AioConfig(Section):
    """DeepSpeed's ``aio`` block, read by the disk tier (zero/swap_io.py). The tier is a thread pool
    of positional reads and writes, not libaio: ``block_size`` is the bytes of one request,
    ``intra_op_parallelism`` (alias ``thread_count``) the threads that serve them, ``queue_depth``
    the requests a thread keeps queued. ``single_submit`` and ``overlap_events`` choose how libaio
    submits and reaps requests; a thread pool submits each request as its own call and reaps it
    when it returns, so both values of each behave alike."""

    block_size: int = Field(1_048_576, ge=4096)
    queue_depth: int = Field(8, ge=1)
    intra_op_parallelism: int = Field(1, ge=1, alias="thread_count")
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False

    @field_validator("block_size")
    @classmethod
    def _aligned(cls, value: int) -> int:
        if value % 4096:
            raise ValueError(f"aio.block_size {value} must be a multiple of 4096 bytes (direct I/O moves whole "
                             f"disk blocks); e.g. {max(4096, value // 4096 * 4096)}")
        return value


class ZeroConfig(Section):
    stage: int = Field(0, ge=0, le=3)
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int = Field(500_000_000, ge=1)
    allgather_partitions: bool = True
    allgather_bucket_size: int = Field(500_000_000, ge=1)
    overlap_comm: bool | None = None
    load_from_fp32_weights: bool = True
    elastic_checkpoint: bool = False
    offload_param: OffloadConfig | None = None
    offload_optimizer: OffloadConfig | None = None
    sub_group_size: int = 1_000_000_000
    # DeepSpeed's default (5e7) when set; unset, stage 3 sizes the window to the model (zero/stage3.py,
    # Note: default windows), so the engine reads model_fields_set to tell the two apart
    stage3_prefetch_bucket_size: int = Field(50_000_000, alias="prefetch_bucket_size")
    stage3_param_persistence_threshold: int = Field(100_000, alias="param_persistence_threshold")
    stage3_max_live_parameters: int = Field(1_000_000_000, alias="max_live_parameters")
    # DeepSpeed's default is 1e9 (keep everything). Ours, when unset, is the prefetch window: a
    # unit stays gathered from forward into backward only if backward would prefetch it again at
    # once, so keeping it costs no memory beyond the prefetch window (zero/stage3.py, Note: reuse distance)
    stage3_max_reuse_distance: int | None = Field(None, ge=0, alias="max_reuse_distance")
    stage3_gather_16bit_weights_on_model_save: bool = Field(
        False, alias="stage3_gather_fp16_weights_on_model_save"
    )
    # shardspeed's own: gather each entry of a ModuleList/Sequential as one unit (zero/stage3.py, Note: units)
    stage3_coalesce_layers: bool = True
    # shardspeed's own: step each unit's optimizer state as soon as its gradients are reduced, during
    # backward, so no gradient shard outlives its unit's reduction (zero/stage3.py, Note: optimizer in backward)
    optimizer_in_backward: bool = False
    round_robin_gradients: bool = False
    ignore_unused_parameters: bool = True
    memory_efficient_linear: bool = True

    @model_validator(mode="after")
    def _offload_where_it_applies(self) -> ZeroConfig:
        opt, par = self.offload_optimizer, self.offload_param
        for key, off, stages in (("offload_optimizer", opt, (1, 2, 3)), ("offload_param", par, (3,))):
            if off is None or off.device == "none":
                continue
            if self.stage not in stages:
                what = "the partitioned optimizer state" if key == "offload_optimizer" else "stage 3's parameter shards"
                need = "1, 2 or 3" if key == "offload_optimizer" else "3"
                raise ValueError(f"zero_optimization.{key}.device '{off.device}' needs ZeRO stage {need} (it moves "
                                 f"{what}), but zero_optimization.stage is {self.stage}: set the stage to {need} "
                                 f"or \"device\": \"none\"")
            if off.max_in_cpu != MAX_IN_CPU_DEFAULT:
                raise ValueError(f"zero_optimization.{key}.max_in_cpu {off.max_in_cpu} is not implemented: with "
                                 "offload_param.device 'nvme' every unit's shard goes to disk except units of at most "
                                 "stage3_param_persistence_threshold elements, which stay in memory; remove the key "
                                 "(or set it to 1e9), and raise stage3_param_persistence_threshold to keep more "
                                 "parameters in memory")
            if off.device == "nvme" and not off.nvme_path:
                raise ValueError(f"zero_optimization.{key}.device 'nvme' needs zero_optimization.{key}.nvme_path: "
                                 "a directory on a local disk with room for the offloaded state")
        # [Note: sub-groups] sub_group_size splits the optimizer step only where state moves between a
        # tier and memory (zero/swap_optimizer.py); in memory every partition steps whole
        nvme_opt = opt is not None and opt.device == "nvme"
        if self.sub_group_size < 1_000_000_000 and not nvme_opt:
            raise ValueError(f"config key 'zero_optimization.sub_group_size' = {self.sub_group_size} applies only "
                             "with zero_optimization.offload_optimizer.device 'nvme' (the step then runs sub-group by "
                             "sub-group, streamed from disk); in memory the optimizer steps each rank's partition "
                             "whole: remove the key or set it to 1e9 or more")
        if self.sub_group_size < 1:
            raise ValueError(f"zero_optimization.sub_group_size must be at least 1, got {self.sub_group_size}")
        return self


class ActivationCheckpointingConfig(Section):
    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    cpu_checkpointing: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


class FlopsProfilerConfig(Section):
    enabled: bool = False
    recompute_fwd_factor: float = 0.0
    profile_step: int = 1
    module_depth: int = -1
    top_modules: int = 1
    detailed: bool = True
    output_file: str | None = None


class MonitorConfig(Section):
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class ProgressBarConfig(Section):
    """shardspeed's own: a one-line progress display on rank 0's stderr."""

    enabled: bool = False
    total_steps: int | None = None


class ThroughputConfig(Section):
    """shardspeed's own: what turns samples/s into tokens/s, TFLOP/s and MFU."""

    seq_length: int | None = Field(None, ge=1)  # tokens per sample
    peak_tflops: float | None = Field(None, gt=0)  # per rank; None: measured once with a matmul


class WandbConfig(Section):
    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


class CommsLoggerConfig(Section):
    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    debug: bool = False
    prof_ops: list[str] = Field(default_factory=list)


class DataTypesConfig(Section):
    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = None


DTypeName = Literal["fp32", "fp16", "bf16"]


class PipelineConfig(Section):
    """Settings of the pipeline engine (``initialize(model=PipelineModule(...))``); ignored by a
    plain model. DeepSpeed has no key for the schedule (its engine always runs 1F1B)."""

    schedule: Literal["1f1b", "gpipe"] = Field(
        "1f1b", description="micro-batch order in train_batch: '1f1b' (PipeDream-flush: stage s holds at most "
        "p - s micro-batches' activations) or 'gpipe' (all forwards, then all backwards: every stage holds all "
        "m); both give the same gradients")
    early_grads: bool = Field(
        True, description="1f1b only: the backwards whose input gradient the previous stage waits for in its "
        "cool-down send it before computing the weight gradients of their F.linear / nn.Linear layers "
        "(schedule.py, Note: early gradient sends; activation/wgrad.py): shorter by (p - 1) x one stage's "
        "weight-gradient time per batch, the same gradients (equal in fp32 in the tests; the products are the same, "
        "in another order); false: every backward computes all its gradients before sending")
    activation_stats: bool = Field(
        False, description="count the bytes autograd saves per micro-batch for engine.pipe_stats()'s "
        "peak_activation_bytes (a Python hook on every saved tensor: 2-3 % of a step); micro-batches held are "
        "counted either way")

    @field_validator("schedule", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # "1F1B", "GPipe" as written in papers


class LayerSpecConfig(Section):
    """One entry of ``tensor_parallel.partition_config.layer_specs`` (DeepSpeed's ``TPLayerSpec``)."""

    # regular expressions, searched in each Linear's name and its weight's name (".*\\.o_proj\\.weight$")
    patterns: list[str] = Field(min_length=1)
    partition_type: Literal["column", "row", "skip"] = "column"  # skip: stays whole (replicated)
    # [S, -1]: the output is S equal blocks (a fused q/k/v: [3, -1]), each cut T ways
    shape: list[Any] | None = None
    partition_dim: int | None = None  # 0 for column, 1 for row (the weight's [out, in] dimension cut)
    model_types: list[str] | None = None  # only for models whose config.model_type is one of these
    gather_output: bool = False  # column only: all-gather the output (a head with no row layer after it)

    @model_validator(mode="after")
    def _what_we_slice(self) -> LayerSpecConfig:
        natural = 0 if self.partition_type == "column" else 1
        if self.partition_dim is not None and self.partition_dim != natural:
            raise ValueError(f"tensor_parallel.partition_config.layer_specs: partition_dim {self.partition_dim} "
                             f"for a {self.partition_type} layer is not supported yet; a column layer is cut along "
                             "dim 0 of its [out, in] weight, a row layer along dim 1 (remove the key)")
        if self.shape is not None and not (self.partition_type == "column" and len(self.shape) == 2
                                           and isinstance(self.shape[0], int) and self.shape[0] >= 1
                                           and self.shape[1] == -1):
            raise ValueError(f"tensor_parallel.partition_config.layer_specs: shape {self.shape} is not supported "
                             "yet; only [S, -1] on a column layer (its output is S equal blocks, e.g. [3, -1] for "
                             "a fused q/k/v)")
        if self.gather_output and self.partition_type != "column":
            raise ValueError("tensor_parallel.partition_config.layer_specs: gather_output applies to column "
                             f"layers only, not {self.partition_type}")
        return self


class PartitionConfig(Section):
    """DeepSpeed's ``tensor_parallel.partition_config``: explicit slicing rules, tried in order
    before AutoTP's name rules."""

    layer_specs: list[LayerSpecConfig] = Field(default_factory=list)
    use_default_specs: bool = True  # also place the Linears no spec matches by their names
    strict_mode: bool = False  # every Linear must be placed by a spec or a name rule (heads too)
    lm_head_patterns: list[str] | None = None
    embedding_partition_dim: int | None = None


class TPSubConfig(Section):
    """DeepSpeed's ``tensor_parallel.tp`` (inference-time settings)."""

    tp_size: int = 1
    tp_grain_size: int = 1
    mpu: Any = None
    tp_group: Any = None


class TensorParallelConfig(Section):
    """DeepSpeed's ``tensor_parallel`` section: AutoTP slices the model's Linear layers over
    ``autotp_size`` ranks before the engine is built (tensor_parallel/autotp.py)."""

    autotp_size: int = Field(0, ge=0, description="tensor-parallel size T; 0 or 1: no slicing")
    partition_config: PartitionConfig | None = None
    tp_overlap_comm: bool = False
    dtype: Any = None
    tensor_parallel: TPSubConfig | None = Field(None, alias="tp")
    injection_policy_tuple: Any = None
    preset_model: str | None = None
    keep_module_on_host: bool = False
    replace_with_kernel_inject: bool = Field(False, alias="kernel_inject")


class ShardspeedConfig(Section):
    """The whole configuration. Field names are DeepSpeed's."""

    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config, alias="bfloat16")
    gradient_clipping: float = Field(0.0, ge=0, description="clip by global norm; 0 disables")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig)
    zero_allow_untested_optimizer: bool = False
    zero_force_ds_cpu_optimizer: bool = True
    steps_per_print: int | None = Field(10, description="rank 0 logs every N optimizer steps; null disables")
    wall_clock_breakdown: bool = False
    memory_breakdown: bool = False
    dump_state: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = Field(1.0, gt=0)
    communication_data_type: DTypeName | None = None
    sparse_gradients: bool = Field(False, description="reduce nn.Embedding/EmbeddingBag gradients as index slices "
                                   "(ZeRO stages 0-2; sparse=True tables are then updated lazily): zero/sparse.py")
    dataloader_drop_last: bool = False
    activation_checkpointing: ActivationCheckpointingConfig = Field(
        default_factory=ActivationCheckpointingConfig
    )
    flops_profiler: FlopsProfilerConfig = Field(default_factory=FlopsProfilerConfig)
    tensorboard: MonitorConfig = Field(default_factory=MonitorConfig)
    csv_monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    progress_bar: ProgressBarConfig = Field(default_factory=ProgressBarConfig)
    throughput: ThroughputConfig = Field(default_factory=ThroughputConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig)
    tensor_parallel: TensorParallelConfig = Field(default_factory=TensorParallelConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    aio: AioConfig = Field(default_factory=AioConfig)
    seed: int | None = None

    @field_validator("zero_optimization", mode="before")
    @classmethod
    def _zero_from_bool(cls, value: Any) -> Any:
        # The seed's GPT-2 config writes "zero_optimization": true, which DeepSpeed reads as stage 1.
        if isinstance(value, bool):
            return {"stage": 1 if value else 0}
        return value

    @field_validator("communication_data_type", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        aliases = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16",
                   "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "float": "fp32"}
        if isinstance(value, str) and value.lower() in aliases:
            return aliases[value.lower()]
        return value

    @model_validator(mode="after")
    def _no_ignored_settings(self) -> ShardspeedConfig:
        # Keys accepted for DeepSpeed's sake but not acted on must not be set to a value that asks
        # for something we do not do (unsupported.py, Note: unsupported keys).
        problems = unsupported_settings(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _one_precision(self) -> ShardspeedConfig:
        if self.fp16.enabled and self.bf16.enabled is True:
            raise ValueError(
                "fp16.enabled and bf16.enabled are both true; enable one of them "
                "(bf16 needs no loss scaling, fp16 uses fp16.loss_scale)"
            )
        if self.fp16.enabled and self.bf16.enabled == "auto":
            raise ValueError(
                'fp16.enabled is true and bf16.enabled is "auto"; enable one of them '
                '(fp16 with loss scaling, or "auto": bf16 where the hardware has it, else fp32)'
            )
        return self

    @property
    def compute_dtype_name(self) -> DTypeName | Literal["auto"]:
        """The requested compute dtype; "auto" until ``precision.PrecisionPolicy`` resolves it
        against the device (the engine's ``policy.compute_name`` is the resolved one)."""
        if self.fp16.enabled:
            return "fp16"
        if self.bf16.enabled == "auto":
            return "auto"
        if self.bf16.enabled:
            return "bf16"
        return "fp32"
