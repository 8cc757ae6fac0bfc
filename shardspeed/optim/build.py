"""Build the optimizer from the config's ``optimizer {type, params}`` section, or take the client's."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from shardspeed.config import ConfigError
from shardspeed.config.errors import did_you_mean
from shardspeed.config.schema import OptimizerConfig
from shardspeed.optim.adam import FusedAdam
from shardspeed.optim.lamb import FusedLamb


def _adam(params: Any, adam_w_mode: bool = True, torch_adam: bool = False, **kw: Any) -> torch.optim.Optimizer:
    if torch_adam:
        kw.pop("bias_correction", None)
        return torch.optim.Adam(params, decoupled_weight_decay=adam_w_mode, **kw)
    return FusedAdam(params, adam_w_mode=adam_w_mode, **kw)


def _adamw(params: Any, **kw: Any) -> torch.optim.Optimizer:
    kw.pop("adam_w_mode", None)
    return _adam(params, adam_w_mode=True, **kw)


def _sgd(params: Any, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, foreach=True, **kw)


def _adagrad(params: Any, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, foreach=True, **kw)


# type (lower case) -> (factory, accepted parameter names)
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "amsgrad", "adam_w_mode", "torch_adam",
              "fused", "foreach", "max_grad_norm")
OPTIMIZERS: dict[str, tuple[str, Callable[..., torch.optim.Optimizer], tuple[str, ...]]] = {
    "adam": ("Adam", _adam, _ADAM_KEYS),
    "adamw": ("AdamW", _adamw, _ADAM_KEYS),
    "lamb": ("Lamb", FusedLamb, tuple(inspect.signature(FusedLamb).parameters)[1:]),
    "sgd": ("SGD", _sgd, ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")),
    "adagrad": ("Adagrad", _adagrad, ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")),
}


def supported_optimizers() -> list[str]:
    return [name for name, _, _ in OPTIMIZERS.values()]


def build_optimizer(cfg: OptimizerConfig, params: Any) -> tuple[torch.optim.Optimizer, float]:
    """The optimizer named by ``cfg`` over ``params``, and the clipping norm its params asked for.

    The seed's GPT-2 config puts ``max_grad_norm`` under Adam's params; DeepSpeed's old Adam read it
    as gradient clipping, so it is returned for the engine to apply (0.0 when absent).
    """
    key = cfg.type.lower()
    if key not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer type '{cfg.type}' in optimizer.type; supported: "
            f"{', '.join(supported_optimizers())}.{did_you_mean(cfg.type, supported_optimizers())}"
        )
    name, factory, accepted = OPTIMIZERS[key]
    kwargs = dict(cfg.params)
    for k in kwargs:
        if k not in accepted:
            raise ConfigError(
                f"optimizer.params.{k} is not a parameter of {name}; accepted: {', '.join(accepted)}."
                f"{did_you_mean(k, accepted)}"
            )
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    clip = 0.0
    if key in ("adam", "adamw"):
        clip = float(kwargs.pop("max_grad_norm", 0.0))
    return factory(params, **kwargs), clip
