"""ZeRO: partition math, one strategy per stage (chosen once), and the stage-3 helpers."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from shardspeed.comm import Topology
from shardspeed.config import ConfigError
from shardspeed.zero.gathered import GatheredParameters
from shardspeed.zero.init import Init
from shardspeed.zero.local import LocalStrategy
from shardspeed.zero.sharded import ShardedStrategy, Stage2Strategy
from shardspeed.zero.stage0 import DataParallelStrategy
from shardspeed.zero.stage3 import Stage3Options, Stage3Strategy, register_external_parameter
from shardspeed.zero.strategy import Piece, Strategy, StrategyOptions


class ZeroStageNotSupported(NotImplementedError):
    pass


def make_strategy(stage: int, module: torch.nn.Module, topo: Topology, opts: StrategyOptions,
                  groups: list[list[torch.nn.Parameter]], z3: Stage3Options | None = None) -> Strategy:
    """The strategy for ``zero_optimization.stage``, chosen once per engine. ``groups``: the
    parameters of each optimizer param group (partitions never mix groups)."""
    if stage == 0:
        single = topo.dp_world_size == 1 and topo.mp_world_size == 1
        plain = opts.compute_dtype == torch.float32 and opts.grad_accum_dtype == torch.float32
        if single and plain and not opts.sparse_gradients:
            return LocalStrategy(module, topo, opts)
        return DataParallelStrategy(module, topo, opts)
    if stage == 1:
        return ShardedStrategy(module, topo, opts, groups)
    if stage == 2:
        return Stage2Strategy(module, topo, opts, groups)
    if stage == 3:
        if opts.sparse_gradients:
            raise ConfigError("sparse_gradients is supported at ZeRO stages 0, 1 and 2: stage 3 partitions each "
                              "embedding table and gathers it for every forward, so its gradient is reduce-scattered "
                              "densely; use zero_optimization.stage 2 (or remove sparse_gradients)")
        return Stage3Strategy(module, topo, opts, groups, z3 or Stage3Options())
    raise ZeroStageNotSupported(f"zero_optimization.stage {stage}: expected 0, 1, 2 or 3")


__all__ = ["DataParallelStrategy", "GatheredParameters", "Init", "LocalStrategy", "Piece", "ShardedStrategy",
           "Stage2Strategy", "Stage3Options", "Stage3Strategy", "Strategy", "StrategyOptions", "ZeroStageNotSupported",
           "estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_cold",
           "estimate_zero2_model_states_mem_needs_all_live", "estimate_zero3_model_states_mem_needs",
           "estimate_zero3_model_states_mem_needs_all_cold", "estimate_zero3_model_states_mem_needs_all_live",
           "make_strategy", "register_external_parameter"]


# DeepSpeed's estimator names, answered by the planner (zero/planner/estimators.py). Imported on first
# use: the planner reads the strategies' layout code, the strategies never need the planner, and the
# engine's import of this package stays free of it.
_ESTIMATORS = ("estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_cold",
               "estimate_zero2_model_states_mem_needs_all_live", "estimate_zero3_model_states_mem_needs",
               "estimate_zero3_model_states_mem_needs_all_cold", "estimate_zero3_model_states_mem_needs_all_live")


def __getattr__(name: str) -> Any:
    if name in _ESTIMATORS:
        return getattr(importlib.import_module("shardspeed.zero.planner.estimators"), name)
    raise AttributeError(f"module 'shardspeed.zero' has no attribute {name!r}")
