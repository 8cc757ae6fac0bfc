"""Where the stage boundaries go: pure functions from per-layer weights to boundaries, plus the three
ways of weighing layers (parameter counts, a class-name pattern, measured time).

Boundaries are a list ``parts`` of length P + 1: stage s holds layers ``parts[s] <= i < parts[s + 1]``,
``parts[0] == 0``, ``parts[P] == n``.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from shardspeed.pipe.spec import LayerSpec, TiedLayerSpec

__all__ = ["layer_type_weights", "parameter_weights", "partition_balanced", "partition_uniform", "profile_weights"]


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Equal layer counts; the last ``num_items % num_parts`` parts take one more (under 1F1B an early
    stage holds more micro-batches in flight, so it is the one to keep light)."""
    base, extra = divmod(num_items, num_parts)
    parts = [0]
    for s in range(num_parts):
        parts.append(parts[-1] + base + (1 if s >= num_parts - extra else 0))
    return parts


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Contiguous, non-empty parts whose heaviest part is as light as possible.

    Among the partitions with that smallest maximum, the one with the smallest sum of squared part
    weights, then of squared layer counts, is chosen: so 10 equal layers on 4 stages split 2/2/3/3,
    not 3/3/3/1, and weightless layers (``type:`` non-matches) spread instead of piling up on one
    stage. Remaining ties go to lighter early stages, as in ``partition_uniform``. Exact dynamic
    programming, O(P n^2): instant for the hundreds of layers models have.
    """
    n = len(weights)
    if not 1 <= num_parts <= n:
        raise ValueError(f"cannot split {n} layers into {num_parts} non-empty parts")
    if any(w < 0 for w in weights):
        raise ValueError(f"layer weights must be >= 0, got {list(weights)}")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def part(i: int, j: int) -> float:  # weight of layers i..j-1, computed the same way everywhere
        return prefix[j] - prefix[i]

    inf = float("inf")
    # bottleneck[k][j]: lightest possible heaviest part when layers 0..j-1 form k parts
    bottleneck = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    bottleneck[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for j in range(k, n - (num_parts - k) + 1):
            bottleneck[k][j] = min(max(bottleneck[k - 1][i], part(i, j)) for i in range(k - 1, j))
    limit = bottleneck[num_parts][n]

    # second pass: under that limit, the lexicographically smallest (sum w^2, sum count^2)
    best: list[list[tuple[float, int] | None]] = [[None] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, num_parts + 1):
        for j in range(k, n - (num_parts - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev is None or part(i, j) > limit:
                    continue
                cost = (prev[0] + part(i, j) ** 2, prev[1] + (j - i) ** 2)
                current = best[k][j]
                if current is None or cost < current:  # strict: the earliest cut wins a tie
                    best[k][j], cut[k][j] = cost, i
    parts, j = [n], n
    for k in range(num_parts, 0, -1):
        j = cut[k][j]
        parts.append(j)
    return parts[::-1]


# -- weighing layers ---------------------------------------------------------------------------------
def parameter_weights(layers: Sequence[Any]) -> list[int]:
    """Trainable parameters per layer; a spec is counted without being built (``LayerSpec.count_parameters``)."""
    out = []
    for layer in layers:
        if isinstance(layer, LayerSpec):
            out.append(layer.count_parameters())
        elif isinstance(layer, nn.Module):
            out.append(sum(p.numel() for p in layer.parameters() if p.requires_grad))
        else:
            out.append(0)
    return out


def layer_name(layer: Any) -> str | None:
    """The class name a ``type:`` pattern is matched against (a function's ``__name__`` for callables)."""
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", None)


def layer_type_weights(layers: Sequence[Any], pattern: str) -> list[int]:
    """1 for layers whose class name matches ``pattern`` (``re.search``, case-insensitive), else 0."""
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"partition_method 'type:{pattern}': {pattern!r} is not a regular expression ({e})") from None
    return [1 if (name := layer_name(layer)) is not None and regex.search(name) else 0 for layer in layers]


def profile_weights(layers: Sequence[Any], sample: Any, repeats: int = 3) -> list[float]:
    """Seconds of forward + backward per layer (median of ``repeats`` runs after a warm-up), feeding
    ``sample`` through every layer in turn. Builds every layer on this rank (the price of measuring)
    on ``sample``'s device, with the random number generators restored afterwards."""
    device = _device_of(sample)
    with torch.random.fork_rng(devices=[]):
        tied: dict[str, nn.Module] = {}
        funcs: list[Callable[[Any], Any]] = []
        for layer in layers:
            if isinstance(layer, TiedLayerSpec):
                module = tied.setdefault(layer.key, layer.build().to(device))
                fn = layer.forward_fn
                funcs.append(module if fn is None else (lambda x, fn=fn, module=module: fn(module, x)))
            elif isinstance(layer, LayerSpec):
                funcs.append(layer.build().to(device))
            else:
                funcs.append(layer)
        x, seconds = sample, []
        for fn in funcs:
            seconds.append(statistics.median(_time_layer(fn, x) for _ in range(repeats + 1)))
            with torch.no_grad():
                x = fn(x)
    return seconds


def _time_layer(fn: Callable[[Any], Any], x: Any) -> float:
    inputs = _detached(x)
    start = time.perf_counter()
    out = fn(inputs)
    grads = [t for t in _tensors(out) if t.requires_grad]
    if grads:
        torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
    return time.perf_counter() - start


def _detached(x: Any) -> Any:
    """A fresh leaf copy of ``x`` (floating tensors require grad, so the layer's backward runs in full)."""
    if torch.is_tensor(x):
        return x.detach().requires_grad_(x.is_floating_point())
    if isinstance(x, tuple | list):
        return type(x)(_detached(v) for v in x)
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return x


def _tensors(x: Any) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, tuple | list):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _device_of(x: Any) -> torch.device:
    tensors = _tensors(x)
    if not tensors:
        raise ValueError("partition_method='profile': profile_input must be a tensor or a tuple/list/dict of tensors "
                         f"(the first layer's input), got {type(x).__name__}")
    return tensors[0].device
