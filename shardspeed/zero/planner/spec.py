"""What the planner needs to know about a model: each parameter's name, shape and whether it trains,
in registration order, and which parameters stage 3 gathers together. Built from a module, a
model factory (on the meta device: nothing is allocated), or only a parameter count.

[Note: a parameter count alone] Buckets, stage-3 units and the largest gradient autograd makes at
once depend on the layer sizes, not on the total. Given only ``N`` (and optionally the largest
layer ``L``), the model is taken to be ``ceil(N / L)`` layers of ``L`` parameters (the last one
smaller), each a one-tensor module; ``L`` defaults to ``ceil(N / 8)``. The plan says so beside its
figures; a model or factory gives the real layout.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from shardspeed.zero.stage3_parts import Stage3Options, unit_members

DEFAULT_LAYERS = 8  # a parameter count alone is taken as this many equal layers (Note: a parameter count alone)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    trainable: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelSpec:
    params: tuple[ParamInfo, ...]  # registration order
    units: tuple[tuple[int, ...], ...]  # stage-3 units (indices into params), registration order
    assumed: str = ""  # how the layout was made up when it was not read from a model ("" when it was)

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def largest_param(self) -> int:
        return max((p.numel for p in self.params), default=0)

    @property
    def largest_unit(self) -> int:
        return max((sum(self.params[i].numel for i in u) for u in self.units), default=0)


def spec_from_module(module: torch.nn.Module, z3: Stage3Options | None = None) -> ModelSpec:
    """The layout of ``module`` (real, meta or built under ``zero.Init``: ``ds_shape`` is read where
    a parameter is already partitioned)."""
    named = list(module.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(named)}
    params = tuple(ParamInfo(n, tuple(getattr(p, "ds_shape", p.shape)), p.requires_grad) for n, p in named)
    units = tuple(tuple(index[id(p)] for _, p in members) for _, members in unit_members(module, z3 or Stage3Options()))
    return ModelSpec(params, units)


def spec_from_count(total_params: int, largest_layer_params: int | None = None) -> ModelSpec:
    """A made-up layout with ``total_params`` parameters (Note: a parameter count alone)."""
    if total_params <= 0:
        raise ValueError(f"the parameter count must be positive, got {total_params}")
    layer = largest_layer_params if largest_layer_params is not None else -(-total_params // DEFAULT_LAYERS)
    if not 0 < layer <= total_params:
        raise ValueError(f"the largest layer ({layer} parameters) must be positive and at most the "
                         f"parameter count ({total_params})")
    sizes = [layer] * (total_params // layer) + ([total_params % layer] if total_params % layer else [])
    params = tuple(ParamInfo(f"layers.{i}.weight", (s,), True) for i, s in enumerate(sizes))
    how = "given" if largest_layer_params is not None else f"assumed: parameters / {DEFAULT_LAYERS}"
    assumed = f"{len(sizes)} layers of at most {layer:,} parameters ({how}; a model factory gives the real layout)"
    return ModelSpec(params, tuple((i,) for i in range(len(sizes))), assumed)


def load_factory(target: str) -> torch.nn.Module:
    """Build ``module:factory`` (``factory`` may be a dotted attribute path) on the meta device: the
    layout without the memory. Errors name the part that failed."""
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--model {target!r}: expected MODULE:FACTORY, e.g. mypkg.models:build_gpt")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--model {target!r}: cannot import module '{mod_name}' ({e})") from None
    obj: object = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {target!r}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {target!r}: '{attr}' is not callable")
    with torch.device("meta"):
        model = obj()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {target!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
