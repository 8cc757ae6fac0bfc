"""AutoTP: slice a plain model's ``nn.Linear`` layers for tensor parallelism without a rewrite.

``autotp(model, T)`` plans (``autotp_plan.plan_autotp``: which Linear is cut by columns, by rows, or
stays whole) and applies the plan in place: each planned layer is replaced by a
``ColumnParallelLinear`` / ``RowParallelLinear`` made from its own full weight (``from_linear``), and
attention modules are told their per-rank head counts. ``shardspeed.initialize`` does this when the
config says ``"tensor_parallel": {"autotp_size": T}``.

[Note: every rank starts from the same full model]
Slicing copies the values the model already has, so the ranks must hold the same unsliced model
before ``autotp`` (build it after the same ``torch.manual_seed`` on every rank, or load the same
checkpoint); each keeps its slice, and the T ranks together hold exactly the original model. The
data-parallel broadcast in the engine then only repeats what each tensor-parallel rank already has.

[Note: dropout inside sliced regions]
Hugging Face attention draws its attention-probability dropout from the default generator, which is
the same on every tensor-parallel rank: rank r's heads get the mask rank 0's heads get. Each mask is
still an honest Bernoulli mask, but masks are correlated across head groups (Megatron draws them in
``get_rng_tracker().fork()``); AutoTP does not rewrite the model's forward to change that.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from shardspeed.comm import get_rank
from shardspeed.config import ConfigError
from shardspeed.config.schema import PartitionConfig, TensorParallelConfig
from shardspeed.tensor_parallel.autotp_plan import Plan, Rule, plan_autotp
from shardspeed.tensor_parallel.groups import TensorParallelGroup, resolve
from shardspeed.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from shardspeed.tensor_parallel.meta import slice_spec

PlanSpec = Mapping[str, str] | Sequence[Rule] | None

log = logging.getLogger("shardspeed")


def autotp(model: nn.Module, tp_size: int | None = None, plan: PlanSpec = None, *, tp_group: Any = None,
           use_default_rules: bool = True, strict: bool = False) -> nn.Module:
    """Slice ``model`` in place for tensor parallelism and return it.

    Args:
        model: the unsliced model, the same on every rank (Note: every rank starts from the same full model).
        tp_size: T; default: the size of the tensor-parallel group. Given, it must equal that size.
        plan: explicit rules ``{regex: "column" | "column:S" | "row" | "replicate"}`` tried before
            the name rules (``autotp_plan``, Note: plan patterns).
        tp_group: the tensor-parallel group; default: the current model-parallel unit's
            (``shardspeed.initialize_model_parallel(tensor_parallel_size=T)``).
        use_default_rules, strict: as in ``plan_autotp``.

    Example::

        shardspeed.initialize_model_parallel(tensor_parallel_size=2)
        model = autotp(GPT2LMHeadModel(config))  # c_attn, c_fc: columns; c_proj: rows; lm_head whole
    """
    tp = resolve(tp_group)
    if tp_size is None:
        tp_size = tp.world_size
    if tp_size != tp.world_size:
        raise ValueError(f"autotp(tp_size={tp_size}) but the tensor-parallel group has {tp.world_size} rank(s): "
                         f"call shardspeed.initialize_model_parallel(tensor_parallel_size={tp_size}) first, or "
                         "pass tp_group=")
    apply_plan(model, plan_autotp(model, tp_size, plan, use_default_rules=use_default_rules, strict=strict), tp)
    return model


def apply_plan(model: nn.Module, plan: Plan, tp: TensorParallelGroup) -> nn.Module:
    """Replace each planned Linear by its slice for this rank and set the per-rank head counts."""
    if plan.tp_size != tp.world_size:
        raise ValueError(f"a plan for T={plan.tp_size} cannot be applied on a tensor-parallel group of "
                         f"{tp.world_size} rank(s)")
    for p in plan.sliced():
        parent, attr = _parent(model, p.name)
        old = getattr(parent, attr)
        if p.kind == "column":
            new: nn.Module = ColumnParallelLinear.from_linear(old, stride=p.stride, gather_output=p.gather_output,
                                                              transposed=p.transposed, tp_group=tp)
        else:
            new = RowParallelLinear.from_linear(old, transposed=p.transposed, tp_group=tp)
        setattr(parent, attr, new)
    for fix in plan.head_fixes:
        module = model.get_submodule(fix.module)
        for attr, value in fix.values:
            setattr(module, attr, value)
    return model


def autotp_from_config(model: nn.Module, section: TensorParallelConfig, tp_group: Any, optimizer: Any = None,
                       model_parameters: Any = None) -> nn.Module:
    """What ``initialize()`` does with the config's ``tensor_parallel`` section: with ``autotp_size``
    T > 1, slice ``model`` over ``tp_group`` (which must have T ranks) by AutoTP's name rules and the
    ``partition_config`` layer specs. A model that already holds tensor-parallel slices (built from the
    tensor-parallel layers, or passed through ``autotp`` by the user) is left as it is. An optimizer
    object or ``model_parameters`` made before slicing would hold the replaced, unsliced parameters,
    so they are refused."""
    size = section.autotp_size
    if size <= 1:
        return model
    tp = resolve(tp_group) if tp_group is not None else TensorParallelGroup(None)
    if tp.world_size != size:
        raise ConfigError(f"config tensor_parallel.autotp_size is {size}, but the model-parallel unit "
                          f"(initialize(mpu=...) or shardspeed.initialize_model_parallel()) has tensor-parallel size "
                          f"{tp.world_size}: make them equal")
    if is_tensor_parallel(model):
        log.info("AutoTP: %s already holds tensor-parallel slices; left as it is", type(model).__name__)
        return model
    if isinstance(optimizer, torch.optim.Optimizer) or model_parameters is not None:
        given = "optimizer=" if isinstance(optimizer, torch.optim.Optimizer) else "model_parameters="
        raise ValueError(f"initialize({given}...) with tensor_parallel.autotp_size {size}: AutoTP replaces the "
                         "model's Linear layers, so parameters taken before initialize() are the unsliced ones. "
                         "Give the optimizer in the config or as a callable params -> optimizer, or slice first "
                         "(shardspeed.tensor_parallel.autotp(model)) and build them from the sliced model")
    rules, use_default, strict = rules_from_partition_config(section.partition_config)
    plan = plan_autotp(model, size, rules, use_default_rules=use_default, strict=strict)
    if get_rank() == 0:
        log.info("%s", plan.summary())
    return apply_plan(model, plan, tp)


def rules_from_partition_config(pc: PartitionConfig | None) -> tuple[list[Rule], bool, bool]:
    """DeepSpeed's ``partition_config`` as rules (each pattern of a spec one rule, in order),
    ``use_default_specs`` and ``strict_mode``. "skip" is our "replicate"; a shape [S, -1] is stride S."""
    if pc is None:
        return [], True, False
    rules = []
    for spec in pc.layer_specs:
        kind = "replicate" if spec.partition_type == "skip" else spec.partition_type
        stride = int(spec.shape[0]) if spec.shape else 1
        types = tuple(spec.model_types) if spec.model_types is not None else None
        rules += [Rule(_valid(p), kind, stride, spec.gather_output, types) for p in spec.patterns]  # type: ignore[arg-type]
    return rules, pc.use_default_specs, pc.strict_mode


def _valid(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"tensor_parallel.partition_config.layer_specs: pattern {pattern!r} is not a regular "
                          f"expression: {e}") from None
    return pattern


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is already a tensor-parallel slice (built from the
    tensor-parallel layers, or sliced by ``autotp`` before)."""
    return any(slice_spec(p) is not None for p in model.parameters())


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
