"""fp16 loss scaling as a small state machine, testable step by step without a model.

Dynamic scaling (``fp16.loss_scale == 0``): start at ``2**initial_scale_power``. On an overflow the
step is skipped; the scale halves once ``hysteresis`` overflows have been absorbed (each overflow
before that only spends one unit of hysteresis), never below ``min_loss_scale``. After
``loss_scale_window`` consecutive clean steps the scale doubles and the hysteresis budget refills.
With ``consecutive_hysteresis`` the budget refills after every clean step instead, so only
back-to-back overflows halve the scale. Static scaling keeps one scale and still skips overflows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LossScalerState:
    scale: float
    hysteresis_left: int
    clean_steps: int = 0  # consecutive non-overflow steps since the last overflow or growth


class LossScaler:
    def __init__(self, init_scale: float = 1.0, dynamic: bool = False, scale_window: int = 1000,
                 hysteresis: int = 2, min_scale: float = 1.0, consecutive_hysteresis: bool = False,
                 scale_factor: float = 2.0):
        if init_scale <= 0:
            raise ValueError(f"loss scale must be positive, got {init_scale}")
        self.dynamic = dynamic
        self.scale_window = scale_window
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.consecutive_hysteresis = consecutive_hysteresis
        self.scale_factor = scale_factor
        self.state = LossScalerState(scale=float(init_scale), hysteresis_left=hysteresis)

    @classmethod
    def from_config(cls, fp16: Any) -> LossScaler:
        """From the ``fp16`` config section (FP16Config)."""
        if fp16.loss_scale > 0:
            return cls(init_scale=fp16.loss_scale, dynamic=False)
        return cls(init_scale=2.0 ** fp16.initial_scale_power, dynamic=True,
                   scale_window=fp16.loss_scale_window, hysteresis=fp16.hysteresis,
                   min_scale=fp16.min_loss_scale, consecutive_hysteresis=fp16.consecutive_hysteresis)

    @property
    def scale(self) -> float:
        return self.state.scale

    def update(self, overflow: bool) -> None:
        """Advance one optimizer step. The caller skips the step when ``overflow`` is true."""
        s = self.state
        if not self.dynamic:
            return
        if overflow:
            s.clean_steps = 0
            if s.hysteresis_left <= 1:
                s.scale = max(s.scale / self.scale_factor, self.min_scale)
            else:
                s.hysteresis_left -= 1
            return
        s.clean_steps += 1
        if self.consecutive_hysteresis:
            s.hysteresis_left = self.hysteresis
        if s.clean_steps % self.scale_window == 0:
            s.scale *= self.scale_factor
            s.hysteresis_left = self.hysteresis
            s.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = LossScalerState(**state)
