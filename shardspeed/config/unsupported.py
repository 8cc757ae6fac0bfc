"""DeepSpeed keys the schema accepts (so DeepSpeed configs load) but shardspeed does not act on.

[Note: unsupported keys] A key that is accepted and then ignored is worse than an unknown key: the
user believes they got CPU offload, sparse gradients or wandb logging and did not. So every such key
is listed here with the values that mean what shardspeed does anyway ("neutral": DeepSpeed's
defaults, and values whose meaning our fixed behaviour already has); any other value is a
ConfigError naming the key. Keys whose every value leaves results and memory as shardspeed has them
are accepted whatever their value; each says why below. When a key starts working, its entry goes.

Accepted with any value (and why):
- ``zero_optimization.elastic_checkpoint``: our checkpoints load at any world size and stage by
  construction (checkpoint/pieces.py); DeepSpeed's ``false`` only withholds that, which no run needs.
- ``zero_optimization.stage3_gather_16bit_weights_on_model_save``: ``save_16bit_model`` always
  gathers full weights (stage 3's state_dict hooks); ``false`` in DeepSpeed writes nothing at stage 3.
- ``zero_optimization.memory_efficient_linear``: stage 3 swaps a released parameter's ``.data`` for a
  placeholder and re-gathers it before the module's backward, so no op's saved inputs keep a gathered
  weight alive, whichever linear is used; both values behave as DeepSpeed's ``true``.
- ``zero_force_ds_cpu_optimizer``: DeepSpeed reads it only with ``offload_optimizer``, to insist on
  its compiled CPU Adam; our offload steps whichever optimizer the run has, in the same arithmetic
  with or without offload (zero/swap_optimizer.py), so there is nothing to force.
- ``fp16.auto_cast``: ``engine(...)`` casts floating inputs to the compute dtype anyway (DeepSpeed's
  ``true``); with ``false`` a DeepSpeed script must cast itself, which still works here.
- ``bf16.immediate_grad_update``: gradient hooks add each bf16 gradient into the fp32 accumulation
  buffer as soon as it is ready (``true``); ``false`` adds the same values after backward, so results
  are equal either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Unsupported:
    key: str  # dotted, as written in the JSON
    neutral: Callable[[Any], bool]  # the value means what shardspeed does anyway
    instead: str  # what shardspeed does, and what to write instead


def _is(expected: Any) -> Callable[[Any], bool]:
    return lambda value: value == expected


def _at_least(bound: float) -> Callable[[Any], bool]:
    return lambda value: value >= bound


def _no_tp_subsection(value: Any) -> bool:
    return value is None or (value.tp_size == 1 and value.tp_grain_size == 1 and value.mpu is None
                             and value.tp_group is None)


UNSUPPORTED: tuple[Unsupported, ...] = (
    # Every strategy copies gradients end to end into flat, contiguous buckets (zero/sharded.py,
    # zero/stage3.py): that is what true asks for, and there is no non-contiguous path.
    Unsupported("zero_optimization.contiguous_gradients", _is(True),
                "gradients always go through contiguous flat buckets; remove the key or set it to true"),
    # Round-robin orders DeepSpeed's gradient copies into its CPU optimizer's buffers; our offload
    # steps the reduced gradient shards where they are (zero/swap_optimizer.py), so false is ours.
    Unsupported("zero_optimization.round_robin_gradients", _is(False),
                "reduced gradient shards are stepped where they are, never copied round-robin; remove the key "
                "or set it to false"),
    # Checkpoints restore the fp32 masters from the saved fp32 values (checkpoint/engine_io.py).
    Unsupported("zero_optimization.load_from_fp32_weights", _is(True),
                "checkpoints always restore the fp32 master weights from their saved fp32 values; "
                "remove the key or set it to true"),
    # A parameter that gets no gradient contributes zeros to every reduction (zero/sharded.py,
    # zero/stage3.py), which is what true means; false would make that an error.
    Unsupported("zero_optimization.ignore_unused_parameters", _is(True),
                "parameters that get no gradient are reduced as zeros, never an error; "
                "remove the key or set it to true"),
    Unsupported("aio.use_gds", _is(False),
                "the disk tier reads and writes through the host (zero/swap_io.py); remove the key or set it to false"),
    Unsupported("sparse_gradients", _is(False),
                "embedding gradients are reduced dense; remove the key or set it to false"),
    Unsupported("dump_state", _is(False),
                "print the config yourself (engine.config.model_dump()); remove the key or set it to false"),
    Unsupported("seed", _is(None),
                "call torch.manual_seed(...) before shardspeed.initialize(); remove the key"),
    Unsupported("wandb.enabled", _is(False),
                "log with \"tensorboard\" or \"csv_monitor\" instead; remove the section or set enabled to false"),
    # The comm log records every collective (prof_all true); there is no per-op filter or caller trace.
    Unsupported("comms_logger.prof_all", _is(True),
                "the comm log records every op; remove the key or set it to true"),
    Unsupported("comms_logger.prof_ops", _is([]),
                "the comm log records every op; remove the key"),
    Unsupported("comms_logger.debug", _is(False),
                "use comms_logger.verbose for a line per op; remove the key or set it to false"),
    Unsupported("flops_profiler.recompute_fwd_factor", _is(0.0),
                "the profile counts one forward; remove the key or set it to 0"),
    Unsupported("optimizer.legacy_fusion", _is(False),
                "remove the key or set it to false"),
    Unsupported("fp16.fp16_master_weights_and_grads", _is(False),
                "master weights and gradients are fp32 in fp16 training; remove the key or set it to false"),
    # AutoTP (tensor_parallel/autotp.py): the row layers all-reduce in line, the precision is the
    # fp16/bf16 sections', and the plan is AutoTP's name rules plus partition_config.layer_specs.
    Unsupported("tensor_parallel.tp_overlap_comm", _is(False),
                "the row-parallel all-reduce is not overlapped with computation; remove the key or set it to false"),
    Unsupported("tensor_parallel.dtype", _is(None),
                "the compute dtype comes from the \"fp16\" / \"bf16\" sections; remove the key"),
    Unsupported("tensor_parallel.tensor_parallel", _no_tp_subsection,
                "these are inference settings: the size is autotp_size and the groups come from "
                "initialize(mpu=...) or shardspeed.initialize_model_parallel(); remove the \"tp\" block"),
    Unsupported("tensor_parallel.injection_policy_tuple", _is(None),
                "give the plan as partition_config.layer_specs; remove the key"),
    Unsupported("tensor_parallel.preset_model", _is(None),
                "AutoTP's name rules cover Llama-style (q/k/v/o_proj, gate/up/down_proj), GPT-2 and BERT models; "
                "remove the key, or give partition_config.layer_specs for others"),
    Unsupported("tensor_parallel.keep_module_on_host", _is(False),
                "the model is sliced where it is, then moved to the device by the engine; remove the key or set "
                "it to false"),
    Unsupported("tensor_parallel.replace_with_kernel_inject", _is(False),
                "no inference kernels are injected; remove the key or set it to false"),
    Unsupported("tensor_parallel.partition_config.lm_head_patterns", _is(None),
                "the LM head stays whole (replicated); to cut an untied head give a layer_spec with "
                "\"partition_type\": \"column\", \"gather_output\": true; remove the key"),
    Unsupported("tensor_parallel.partition_config.embedding_partition_dim", _is(None),
                "embeddings stay whole (replicated); remove the key"),
)


_ABSENT = object()


def _lookup(cfg: Any, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        if value is None:
            return _ABSENT  # an absent optional section (e.g. no "optimizer"): nothing was set
        value = getattr(value, part)
    return value


def _shown(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(exclude_defaults=True) if dump else value


def unsupported_settings(cfg: Any) -> list[str]:
    """One message per key of ``cfg`` set to a value shardspeed does not act on (see the Note)."""
    messages = []
    for entry in UNSUPPORTED:
        value = _lookup(cfg, entry.key)
        if value is not _ABSENT and not entry.neutral(value):
            messages.append(f"config key '{entry.key}' = {_shown(value)!r} is not supported yet: {entry.instead}")
    return messages
