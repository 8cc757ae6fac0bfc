"""Optimizers (Adam/AdamW, LAMB, SGD), build-from-config, and LR schedules."""

from shardspeed.optim.adam import FusedAdam
from shardspeed.optim.build import build_optimizer, supported_optimizers
from shardspeed.optim.lamb import FusedLamb
from shardspeed.optim.range_test import RangeSuggestion, one_cycle_config, range_test_params, suggest_one_cycle
from shardspeed.optim.schedules import (
    LRRangeTest,
    OneCycle,
    StepSchedule,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)

__all__ = ["FusedAdam", "FusedLamb", "LRRangeTest", "OneCycle", "RangeSuggestion", "StepSchedule", "WarmupCosineLR",
           "WarmupDecayLR", "WarmupLR", "build_optimizer", "build_scheduler", "one_cycle_config", "range_test_params",
           "suggest_one_cycle", "supported_optimizers"]
