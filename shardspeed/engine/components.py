"""Turn what ``initialize()`` was given (client objects, factories, or config sections) into the
engine's optimizer, scheduler and data loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from shardspeed.config import ConfigError, ShardspeedConfig
from shardspeed.optim import FusedAdam, build_optimizer, build_scheduler
from shardspeed.zero import Strategy


def param_groups(module: torch.nn.Module, model_parameters: Iterable[Any] | None,
                 client_optimizer: Any = None) -> list[dict[str, Any]]:
    """The optimizer's param groups over module parameters: the client optimizer's, or
    ``model_parameters`` normalised (tensors, (name, tensor) pairs, or param-group dicts)."""
    if isinstance(client_optimizer, torch.optim.Optimizer):
        return [{"params": list(g["params"])} for g in client_optimizer.param_groups]
    if model_parameters is None:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        return [dict(g, params=list(g["params"])) for g in items]
    return [{"params": [x[1] if isinstance(x, tuple) else x for x in items]}]


def _fresh(client: torch.optim.Optimizer) -> bool:
    """No step taken yet: no state, or only what a constructor makes (step 0: torch's Adagrad)."""
    for state in client.state.values():
        if state and ("step" not in state or float(state["step"]) != 0):
            return False
    return True


def _constructor_state(client: torch.optim.Optimizer) -> None:
    """State an optimizer makes in its constructor and never in ``step()``, for the masters it now
    holds (their shapes are the strategy's: flat shards at stages 1-3). torch's Adagrad reads
    ``state["sum"]`` in ``step()`` without creating it; the values are its constructor's."""
    if not isinstance(client, torch.optim.Adagrad):
        return
    for group in client.param_groups:
        dtype = torch.float32 if group.get("fused") else torch.get_default_dtype()
        for p in group["params"]:
            step = torch.tensor(0.0, dtype=dtype, device=p.device if group.get("fused") else None)
            client.state[p] = {"step": step, "sum": torch.full_like(p, group["initial_accumulator_value"],
                                                                    memory_format=torch.preserve_format)}


def make_optimizer(cfg: ShardspeedConfig, client: Any, groups: list[dict[str, Any]],
                   strategy: Strategy) -> tuple[torch.optim.Optimizer | None, float]:
    """The optimizer over the strategy's fp32 masters, and any clipping norm its config asked for."""
    if client is not None and cfg.optimizer is not None:
        raise ConfigError("an optimizer was given twice: to initialize(optimizer=...) and in the config's "
                          "'optimizer' section; remove one")
    if isinstance(client, torch.optim.Optimizer):
        if not _fresh(client):
            raise ValueError("the client optimizer has already taken steps; pass a fresh optimizer to initialize()")
        _check_tested(cfg, client)
        mapped = strategy.map_param_groups([{"params": g["params"]} for g in client.param_groups])
        for group, new in zip(client.param_groups, mapped, strict=True):
            group["params"] = new["params"]
        client.state.clear()
        _constructor_state(client)
        check_sparse_optimizer(client, strategy)
        return client, 0.0
    master_groups = strategy.map_param_groups(groups)
    if callable(client):
        opt = client(master_groups)
        _check_tested(cfg, opt)
        check_sparse_optimizer(opt, strategy)
        return opt, 0.0
    if client is not None:
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable(params), got {type(client)}")
    if cfg.optimizer is None:
        return None, 0.0
    built, clip = build_optimizer(cfg.optimizer, master_groups)
    check_sparse_optimizer(built, strategy)
    return built, clip


# Optimizers that step a parameter from a sparse gradient: ours (SparseAdam's update on sparse
# gradients, optim/adam.py) and torch's natively sparse ones.
_SPARSE_READY = (FusedAdam, torch.optim.SparseAdam, torch.optim.SGD, torch.optim.Adagrad)


def check_sparse_optimizer(optimizer: torch.optim.Optimizer, strategy: Strategy) -> None:
    """Under sparse_gradients a ``sparse=True`` embedding's gradient reaches the optimizer sparse
    (zero/sparse.py): refuse, by parameter name, an optimizer that would raise at its first step."""
    sparse = strategy.sparse_grad_masters()
    if not sparse:
        return
    name, _ = sparse[0]
    if not isinstance(optimizer, _SPARSE_READY):
        raise ConfigError(
            f"embedding '{name}' is built with sparse=True, so under sparse_gradients its gradient reaches the "
            f"optimizer as a sparse tensor, which {type(optimizer).__name__} cannot take: use the config's Adam or "
            "AdamW (SparseAdam's lazy update on that table, Adam elsewhere), SGD or Adagrad, or build the embedding "
            "with sparse=False (still reduced as index slices, then stepped densely)")
    if isinstance(optimizer, (torch.optim.SGD, torch.optim.Adagrad)):
        # torch's SGD and Adagrad take sparse gradients but not with weight decay: SGD fails adding the
        # dense parameter to the sparse gradient, Adagrad refuses it, both at the first step and
        # without naming the parameter. The table's group is found by its master (a flat shard at
        # stages 1/2), so the check holds at every stage.
        kind = type(optimizer).__name__
        for i, group in enumerate(optimizer.param_groups):
            held = {id(m) for m in group["params"]}
            for name, master in sparse:
                if id(master) in held and group.get("weight_decay", 0) != 0:
                    raise ConfigError(
                        f"embedding '{name}' is built with sparse=True, so under sparse_gradients its gradient reaches "
                        f"{kind} as a sparse tensor, and {kind} cannot apply weight_decay "
                        f"({group['weight_decay']} in param group {i}) to a sparse gradient: set weight_decay 0 "
                        "for that table (a param group of its own), use the config's AdamW (decays the rows it "
                        "updates), or build the embedding with sparse=False (still reduced as index slices, then "
                        "stepped densely)")
    if isinstance(optimizer, torch.optim.SparseAdam):
        held = {id(m) for _, m in sparse}
        names = {id(m): n for n, m in strategy.named_params}
        for group in optimizer.param_groups:
            for m in group["params"]:
                if id(m) not in held:
                    what = names.get(id(m), "a dense parameter")
                    raise ConfigError(
                        f"torch.optim.SparseAdam holds '{what}', whose gradient is dense; give SparseAdam only the "
                        "sparse=True embeddings, or use the config's Adam/AdamW, which steps sparse tables as "
                        "SparseAdam and the rest as Adam")


# Optimizers whose update is elementwise (so it is the same on a flat shard) or that know how to
# finish per-parameter norms across shards (set_partition).
_ZERO_SAFE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop,
              torch.optim.SparseAdam)


def _check_tested(cfg: ShardspeedConfig, optimizer: torch.optim.Optimizer) -> None:
    if cfg.zero_optimization.stage == 0 or cfg.zero_allow_untested_optimizer:
        return
    if isinstance(optimizer, _ZERO_SAFE) or hasattr(optimizer, "set_partition"):
        return
    raise ConfigError(
        f"{type(optimizer).__name__} has not been tested with ZeRO stage {cfg.zero_optimization.stage}: ZeRO "
        "gives it flat shards of parameters, which is only correct for elementwise updates (Adam, AdamW, SGD, "
        "Adagrad, RMSprop, Lamb). If its update is elementwise, set \"zero_allow_untested_optimizer\": true")


def check_optimizer_in_backward(cfg: ShardspeedConfig, optimizer: Any, clip_norm: float,
                                gradient_accumulation_steps: int) -> None:
    """zero_optimization.optimizer_in_backward steps each unit during backward (zero/stage3.py, Note:
    optimizer in backward): refuse what needs the whole model's gradients before any step."""
    if not cfg.zero_optimization.optimizer_in_backward:
        return
    why = "steps each unit's parameters as soon as their gradients are reduced, during backward"
    stage = cfg.zero_optimization.stage
    if stage != 3:
        raise ConfigError(f"zero_optimization.optimizer_in_backward needs ZeRO stage 3, got stage {stage}")
    if clip_norm > 0:
        raise ConfigError(f"zero_optimization.optimizer_in_backward {why}, before the global gradient norm is "
                          f"known: set gradient_clipping to 0 (it is {clip_norm:g}) or turn optimizer_in_backward off")
    if gradient_accumulation_steps > 1:
        raise ConfigError(f"zero_optimization.optimizer_in_backward {why}, so gradients cannot accumulate over "
                          f"micro-batches: gradient_accumulation_steps is {gradient_accumulation_steps}; use 1 or "
                          "turn optimizer_in_backward off")
    if cfg.fp16.enabled:
        raise ConfigError(f"zero_optimization.optimizer_in_backward {why}, before fp16's overflow check has seen "
                          "every gradient: use bf16 or fp32, or turn optimizer_in_backward off")
    if hasattr(optimizer, "set_partition"):
        raise ConfigError(f"zero_optimization.optimizer_in_backward {why}; {type(optimizer).__name__} needs "
                          "norms over whole parameters across ranks at its step: use an element-wise optimizer "
                          "(Adam, AdamW, SGD, ...) or turn optimizer_in_backward off")


def make_scheduler(cfg: ShardspeedConfig, client: Any, optimizer: torch.optim.Optimizer | None) -> Any:
    if client is not None and cfg.scheduler is not None:
        raise ConfigError("an lr scheduler was given twice: to initialize(lr_scheduler=...) and in the config's "
                          "'scheduler' section; remove one")
    if client is not None:
        is_sched = hasattr(client, "step") and hasattr(client, "state_dict")
        return client if is_sched else _call_factory(client, optimizer)
    if cfg.scheduler is None:
        return None
    if optimizer is None:
        raise ConfigError("the config has a 'scheduler' section but no optimizer to schedule")
    return build_scheduler(cfg.scheduler, optimizer)


def _call_factory(factory: Callable[[Any], Any], optimizer: Any) -> Any:
    if not callable(factory):
        raise TypeError(f"lr_scheduler must be a scheduler or a callable(optimizer), got {type(factory)}")
    return factory(optimizer)
