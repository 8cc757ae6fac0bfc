"""Pieces of stage 3 that do not hold its state: which parameters form a unit, external
parameters, and the output wrapper."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParamOffload:
    """``zero_optimization.offload_param`` with ``device: nvme`` (swap_params.py)."""

    nvme_path: str
    buffer_count: int
    buffer_size: int
    aio: Any
    rank: int


@dataclass(frozen=True)
class Stage3Options:
    prefetch_numel: int | None = None  # None: auto (Stage3Strategy, Note: default windows)
    persistence_threshold: int = 100_000
    max_live_numel: int = 1_000_000_000
    coalesce_layers: bool = True
    max_reuse_distance: int | None = None  # None: the prefetch window
    optimizer_in_backward: bool = False
    param_offload: ParamOffload | None = None  # parameter shards on disk (swap_params.py)


def unit_members(module: torch.nn.Module, z3: Stage3Options) -> list[tuple[torch.nn.Module, list]]:
    """Which parameters are gathered together, as (root module, [(name, param)]) in registration order.

    [Note: units] Every collective has a fixed cost (a round trip, a Python call, a copy), so a
    transformer layer gathered as one tensor is faster than its six sub-modules gathered one by one,
    and holds no more memory while it runs. With ``coalesce_layers`` each entry of a ``ModuleList``
    or ``nn.Sequential`` (the repeated layers of almost every model) is one unit when it holds at
    most half of ``max_live_numel`` (so two can be live: the running one and the prefetched next).
    Everything else is one unit per module that registers parameters. A parameter belongs to the
    first unit that reaches it, so tied weights are gathered once."""
    layers: set[int] = set()
    if z3.coalesce_layers:
        for m in module.modules():
            if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)):
                layers.update(id(c) for c in m.children())
    owned: set[int] = set()
    out = []
    for mname, m in module.named_modules():
        if id(m) in layers:
            mine = [(f"{mname}.{n}", p) for n, p in m.named_parameters() if id(p) not in owned]
            if sum(p.numel() if not hasattr(p, "ds_shape") else torch.Size(p.ds_shape).numel()
                   for _, p in mine) * 2 > z3.max_live_numel:
                mine = []  # too large to coalesce: its modules become units one by one
        else:
            mine = []
        if not mine:
            mine = [(f"{mname}.{n}" if mname else n, p) for n, p in m.named_parameters(recurse=False)
                    if id(p) not in owned]
        owned.update(id(p) for _, p in mine)
        if mine:
            out.append((m, mine))
    return out


def register_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> None:
    """Declare that ``module``'s forward uses ``parameter`` although another module owns it (e.g.
    ``x @ self.embed.weight.t()`` in a parent), so stage 3 gathers it whenever ``module`` runs.
    Call it before ``initialize()``; without ZeRO stage 3 it changes nothing."""
    external = module.__dict__.setdefault("_shardspeed_external", [])
    if all(p is not parameter for p in external):
        external.append(parameter)


def grad_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors in ``output`` that require grad: inside tensors, lists, tuples (named too), dicts
    (subclasses too, e.g. Hugging Face's ``ModelOutput``) and dataclasses, to any depth."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def collect(x: Any) -> None:
        if torch.is_tensor(x):
            if x.requires_grad and id(x) not in seen:
                seen.add(id(x))
                found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                collect(y)
        elif isinstance(x, dict):
            for y in x.values():
                collect(y)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                collect(getattr(x, f.name, None))

    collect(output)
    return found
