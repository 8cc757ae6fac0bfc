"""The memory planner: per-rank device, host and disk bytes of a config on a model, before running
it (plan.py), DeepSpeed's estimator functions computed from it (estimators.py), and the
``shardspeed-plan`` command (cli.py)."""

from shardspeed.zero.planner.items import TIERS, Item
from shardspeed.zero.planner.plan import Plan, make_plan
from shardspeed.zero.planner.settings import PlanSettings, load_plan_config, settings_from_config
from shardspeed.zero.planner.spec import ModelSpec, spec_from_count, spec_from_module

__all__ = ["TIERS", "Item", "ModelSpec", "Plan", "PlanSettings", "load_plan_config", "make_plan",
           "settings_from_config", "spec_from_count", "spec_from_module"]
