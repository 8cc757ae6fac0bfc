"""Reading an LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017): the
loss of a run whose lr grows every step (``LRRangeTest``) falls while the lr is useful and rises once it
is too large. The suggested ``OneCycle`` range ends where the smoothed loss was lowest, scaled down
because a lr that is stable for a few steps of a sweep is at the edge of stability for a whole run,
and starts ``min_div`` times lower (4: Smith's "a factor of 3 or 4 less than the maximum", "A disciplined
approach to neural network hyper-parameters", 2018; on examples/rscan a 10x lower start spent the first
steps of the cycle on the initial plateau and reached the target AUC later than a constant lr)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RangeSuggestion:
    cycle_min_lr: float
    cycle_max_lr: float
    lr_at_min_loss: float  # lr of the lowest smoothed loss before divergence
    lr_steepest: float  # lr where the smoothed loss fell fastest (per unit of log lr)
    diverged_at_lr: float | None  # first lr where the smoothed loss exceeded diverge_factor x its minimum
    smoothed: list[float]  # the smoothed losses, one per step (as plotted)

    def scheduler(self, total_steps: int, cycle_min_mom: float = 0.85, cycle_max_mom: float = 0.95) -> dict:
        """The suggested range as a ``OneCycle`` scheduler config (``one_cycle_config``)."""
        return one_cycle_config(self.cycle_min_lr, self.cycle_max_lr, total_steps, cycle_min_mom, cycle_max_mom)


def one_cycle_config(min_lr: float, max_lr: float, total_steps: int, cycle_min_mom: float = 0.85,
                     cycle_max_mom: float = 0.95) -> dict:
    """A ``OneCycle`` scheduler config over ``total_steps``: the lr 45 % of the steps up, 45 % down, then
    decaying as ``min_lr / (1 + 0.5 k)`` with k counting tenths of ``total_steps`` past the cycle; momentum
    (beta1) goes from ``cycle_max_mom`` to ``cycle_min_mom`` and back meanwhile."""
    half = max(1, int(0.45 * total_steps))
    return {"type": "OneCycle", "params": {
        "cycle_min_lr": min_lr, "cycle_max_lr": max_lr,
        "cycle_first_step_size": half, "cycle_second_step_size": half,
        "decay_step_size": max(1, total_steps - 2 * half), "decay_lr_rate": 0.5,
        "cycle_momentum": True, "cycle_min_mom": cycle_min_mom, "cycle_max_mom": cycle_max_mom}}


def smooth(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled to 0)."""
    avg, out = 0.0, []
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest_one_cycle(lrs: list[float], losses: list[float], smoothing: float = 0.9, diverge_factor: float = 1.5,
                      max_scale: float = 0.5, min_div: float = 4.0, skip_start: int = 3,
                      min_drop: float = 0.02) -> RangeSuggestion:
    """Suggest ``cycle_min_lr`` / ``cycle_max_lr`` from a range test's per-step ``lrs`` and ``losses``.

    ``cycle_max_lr = max_scale * lr_at_min_loss`` and ``cycle_min_lr = cycle_max_lr / min_div``. Steps
    after the smoothed loss first exceeds ``diverge_factor`` times its running minimum are ignored (a
    non-finite loss counts as divergence), and so are the first ``skip_start`` steps, whose loss is still
    the initial one's noise. A sweep whose smoothed loss never falls ``min_drop`` (a fraction) below
    its start is an error: there is nothing to read (a loss stuck at chance, e.g. 0.693 for a binary
    loss, looks like that).
    """
    if len(lrs) != len(losses):
        raise ValueError(f"range test: {len(lrs)} learning rates for {len(losses)} losses")
    if len(lrs) < skip_start + 3:
        raise ValueError(f"range test: {len(lrs)} steps are too few to read (need at least {skip_start + 3})")
    if any(b < a for a, b in zip(lrs, lrs[1:], strict=False)) or lrs[0] <= 0:
        raise ValueError("range test: the learning rates must be positive and non-decreasing (an LRRangeTest run)")
    finite = [x if math.isfinite(x) else math.inf for x in losses]
    end = next((i for i, x in enumerate(finite) if x == math.inf), len(finite))
    sm = smooth(finite[:end], smoothing) + [math.inf] * (len(finite) - end)
    best, diverged = skip_start, None
    for i in range(skip_start, len(sm)):
        if sm[i] > diverge_factor * sm[best]:
            diverged = i
            break
        if sm[i] < sm[best]:
            best = i
    stop = diverged if diverged is not None else len(sm)
    if best == skip_start and stop - skip_start < 3:
        raise ValueError("range test: the loss rose from the start; begin the sweep at a lower lr")
    if sm[skip_start] - sm[best] < min_drop * abs(sm[skip_start]):
        raise ValueError(f"range test: the smoothed loss never fell by {100 * min_drop:g} % (from "
                         f"{sm[skip_start]:.4g} to at best {sm[best]:.4g}); the model did not train: sweep over "
                         "more steps, or from a lower lr to a lower maximum")
    slopes = [(sm[i + 1] - sm[i]) / max(math.log(lrs[i + 1] / lrs[i]), 1e-12)
              for i in range(skip_start, min(stop, best + 1) - 1)]
    steepest = skip_start + min(range(len(slopes)), key=slopes.__getitem__) if slopes else best
    top = max_scale * lrs[best]
    return RangeSuggestion(cycle_min_lr=top / min_div, cycle_max_lr=top, lr_at_min_loss=lrs[best],
                           lr_steepest=lrs[steepest], diverged_at_lr=lrs[diverged] if diverged is not None else None,
                           smoothed=sm)


def range_test_params(min_lr: float, max_lr: float, steps: int) -> dict:
    """``LRRangeTest`` parameters that grow the lr linearly from ``min_lr`` to ``max_lr`` over ``steps``."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"range test: need 0 < min lr < max lr, got {min_lr} and {max_lr}")
    if steps < 2:
        raise ValueError(f"range test: {steps} steps; need at least 2")
    return {"lr_range_test_min_lr": min_lr, "lr_range_test_step_size": 1,
            "lr_range_test_step_rate": (max_lr / min_lr - 1) / (steps - 1), "lr_range_test_staircase": False}
