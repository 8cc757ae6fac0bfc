"""ZeRO: partition math, one strategy per stage (chosen once), and the stage-3 helpers."""

from __future__ import annotations

import torch

from shardspeed.comm import Topology
from shardspeed.zero.stage0 import DataParallelStrategy
from shardspeed.zero.strategy import Strategy, StrategyOptions


class ZeroStageNotSupported(NotImplementedError):
    pass


def make_strategy(stage: int, module: torch.nn.Module, topo: Topology, opts: StrategyOptions) -> Strategy:
    """The strategy for ``zero_optimization.stage``, chosen once per engine."""
    if stage == 0:
        return DataParallelStrategy(module, topo, opts)
    raise ZeroStageNotSupported(
        f"zero_optimization.stage {stage} is not supported yet in this version of shardspeed; "
        "use stage 0 (set \"zero_optimization\": {\"stage\": 0} or remove the section)")


__all__ = ["DataParallelStrategy", "Strategy", "StrategyOptions", "ZeroStageNotSupported", "make_strategy"]
