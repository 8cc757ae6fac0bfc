"""Learning-rate schedules with DeepSpeed's names and parameters, stepped once per optimizer step.

Each schedule is a pure function of the step number (``lr_at``), so resuming is exact: the state is
``last_batch_iteration`` alone. Construction applies the step-0 value to the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shardspeed.config import ConfigError
from shardspeed.config.errors import did_you_mean
from shardspeed.config.schema import SchedulerConfig


def _per_group(value: float | list[float], n: int, name: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"scheduler.params.{name} has {len(value)} values for {n} parameter groups")
        return [float(v) for v in value]
    return [float(value)] * n


class StepSchedule:
    """Base: subclasses implement ``lr_at(step)`` (and optionally ``mom_at``) per parameter group."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_batch_iteration: int = -1):
        self.optimizer = optimizer
        # -1 (DeepSpeed's "not started") and 0 both mean: the first optimizer step uses step 0's lr.
        self.last_batch_iteration = max(last_batch_iteration, 0)
        self._apply(self.last_batch_iteration)

    def lr_at(self, step: int) -> list[float]:
        raise NotImplementedError

    def mom_at(self, step: int) -> list[float] | None:
        return None

    def _apply(self, step: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(step), strict=True):
            group["lr"] = lr
        moms = self.mom_at(step)
        if moms is not None:
            for group, mom in zip(self.optimizer.param_groups, moms, strict=True):
                if "betas" in group:
                    group["betas"] = (mom, group["betas"][1])
                elif "momentum" in group:
                    group["momentum"] = mom
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self._apply(self.last_batch_iteration)

    def get_lr(self) -> list[float]:
        return list(self._last_lr)

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch_iteration = state["last_batch_iteration"]
        self._apply(max(self.last_batch_iteration, 0))


class WarmupLR(StepSchedule):
    """Rise from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` (log or linear), then hold."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: float | list[float] = 0.0,
                 warmup_max_lr: float | list[float] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"scheduler.params.warmup_type '{warmup_type}': expected 'log' or 'linear'")
        n = len(optimizer.param_groups)
        self.min_lrs = _per_group(warmup_min_lr, n, "warmup_min_lr")
        self.max_lrs = _per_group(warmup_max_lr, n, "warmup_max_lr")
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration)

    def warmup_gamma(self, step: int) -> float:
        if step >= self.warmup_num_steps:
            return 1.0
        if self.warmup_type == "log":
            return math.log(step + 1) / math.log(self.warmup_num_steps)
        return step / self.warmup_num_steps

    def gamma(self, step: int) -> float:
        return self.warmup_gamma(step)

    def lr_at(self, step: int) -> list[float]:
        g = self.gamma(step)
        return [lo + (hi - lo) * g for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_lr: Any = 0.0,
                 warmup_max_lr: Any = 0.001, warmup_num_steps: int = 1000, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        if total_num_steps < warmup_num_steps:
            raise ConfigError(f"scheduler.params.total_num_steps {total_num_steps} < warmup_num_steps "
                              f"{warmup_num_steps}")
        self.total_num_steps = int(total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def gamma(self, step: int) -> float:
        if step < self.warmup_num_steps:
            return self.warmup_gamma(step)
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        return max(0.0, (self.total_num_steps - step) / span)


class WarmupCosineLR(StepSchedule):
    """Scale the optimizer's own lr: warm up from ``warmup_min_ratio`` to 1, then cosine down to
    ``cos_min_ratio`` at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"scheduler.params.warmup_type '{warmup_type}': expected 'log' or 'linear'")
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs, strict=True):
            g["initial_lr"] = lr
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio, self.cos_min_ratio = warmup_min_ratio, cos_min_ratio
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration)

    def ratio(self, step: int) -> float:
        if step < self.warmup_num_steps:
            if self.warmup_type == "log":
                g = math.log(step + 1) / math.log(self.warmup_num_steps)
            else:
                g = step / self.warmup_num_steps
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * g
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, (step - self.warmup_num_steps) / span)
        return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> list[float]:
        r = self.ratio(step)
        return [lr * r for lr in self.base_lrs]


class OneCycle(StepSchedule):
    """1Cycle (Smith, 2018): lr rises from ``cycle_min_lr`` to ``cycle_max_lr`` over
    ``cycle_first_step_size`` steps and falls back over ``cycle_second_step_size``; momentum moves the
    other way between ``cycle_max_mom`` and ``cycle_min_mom``. After the cycle lr decays as
    ``min_lr / (1 + decay_lr_rate * k)`` and momentum grows as ``max_mom * (1 + decay_mom_rate * k)``,
    with ``k = steps since the cycle / decay_step_size``.

    Momentum is Adam's beta1 (``betas[0]``; beta2 is left as the optimizer has it) or SGD's ``momentum``.
    Where DeepSpeed 0.19.8's OneCycle differs, on purpose: it replaces beta2 with 0.99, cycles only
    optimizers with ``betas``, and starts at ``(cycle_min_lr, cycle_min_mom)`` (low lr with low
    momentum) until its first ``step()``; here step 0 is ``(cycle_min_lr, cycle_max_mom)``, the cycle's
    own start."""

    def __init__(self, optimizer: torch.optim.Optimizer, cycle_min_lr: float, cycle_max_lr: float,
                 decay_lr_rate: float = 0.0, cycle_first_step_size: int = 2000,
                 cycle_second_step_size: int | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: int = 0,
                 cycle_momentum: bool = True, cycle_min_mom: float = 0.8, cycle_max_mom: float = 0.9,
                 decay_mom_rate: float = 0.0, last_batch_iteration: int = -1):
        self.min_lr, self.max_lr, self.decay_lr_rate = cycle_min_lr, cycle_max_lr, decay_lr_rate
        self.first = int(cycle_first_step_size)
        self.second = int(cycle_second_step_size) if cycle_second_step_size is not None else self.first
        self.first_stairs = int(cycle_first_stair_count)
        self.second_stairs = (int(cycle_second_stair_count) if cycle_second_stair_count is not None
                              else self.first_stairs)
        self.decay_step_size = int(decay_step_size)
        self.cycle_momentum = cycle_momentum
        self.min_mom, self.max_mom, self.decay_mom_rate = cycle_min_mom, cycle_max_mom, decay_mom_rate
        if self.first <= 0 or self.second <= 0:
            raise ConfigError("scheduler.params.cycle_first_step_size and cycle_second_step_size must be > 0")
        super().__init__(optimizer, last_batch_iteration)

    def _fraction(self, step: int) -> float | None:
        """Position in the cycle as 0..1..0 of the lr range, or None once the cycle is over."""
        if step < self.first:
            frac, stairs = step / self.first, self.first_stairs
        elif step < self.first + self.second:
            frac, stairs = 1.0 - (step - self.first) / self.second, self.second_stairs
        else:
            return None
        if stairs > 0:
            frac = math.floor(frac * stairs) / stairs
        return frac

    def _decay_k(self, step: int) -> float:
        done = step - self.first - self.second
        return done / self.decay_step_size if self.decay_step_size > 0 else 0.0

    def lr_at(self, step: int) -> list[float]:
        frac = self._fraction(step)
        if frac is None:
            lr = self.min_lr / (1.0 + self.decay_lr_rate * self._decay_k(step))
        else:
            lr = self.min_lr + (self.max_lr - self.min_lr) * frac
        return [lr] * len(self.optimizer.param_groups)

    def mom_at(self, step: int) -> list[float] | None:
        if not self.cycle_momentum:
            return None
        frac = self._fraction(step)
        if frac is None:
            mom = self.max_mom * (1.0 + self.decay_mom_rate * self._decay_k(step))
        else:
            mom = self.max_mom - (self.max_mom - self.min_mom) * frac
        return [mom] * len(self.optimizer.param_groups)


class LRRangeTest(StepSchedule):
    """Grow lr from ``lr_range_test_min_lr`` by ``step_rate`` per ``step_size`` steps (continuous or
    staircase), to find the largest stable lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_range_test_min_lr: float | list[float] = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1):
        self.min_lrs = _per_group(lr_range_test_min_lr, len(optimizer.param_groups), "lr_range_test_min_lr")
        self.step_size, self.step_rate = int(lr_range_test_step_size), float(lr_range_test_step_rate)
        self.staircase = lr_range_test_staircase
        super().__init__(optimizer, last_batch_iteration)

    def lr_at(self, step: int) -> list[float]:
        interval = step / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lr * (1 + self.step_rate * interval) for lr in self.min_lrs]


SCHEDULES: dict[str, type[StepSchedule]] = {
    c.__name__.lower(): c for c in (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)
}


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer) -> StepSchedule:
    names = [c.__name__ for c in SCHEDULES.values()]
    cls = SCHEDULES.get(cfg.type.lower())
    if cls is None:
        raise ConfigError(f"unknown scheduler type '{cfg.type}' in scheduler.type; supported: {', '.join(names)}."
                          f"{did_you_mean(cfg.type, names)}")
    import inspect

    accepted = [p for p in inspect.signature(cls).parameters if p not in ("optimizer",)]
    for k in cfg.params:
        if k not in accepted:
            raise ConfigError(f"scheduler.params.{k} is not a parameter of {cls.__name__}; accepted: "
                              f"{', '.join(accepted)}.{did_you_mean(k, accepted)}")
    try:
        return cls(optimizer, **cfg.params)
    except TypeError as e:  # a required parameter is missing
        raise ConfigError(f"scheduler {cls.__name__}: {e}") from None
