"""Layer specifications: a layer's class and arguments, built later, only on the stage that owns it.

A model of N layers does not fit on one rank's memory when it is pipelined for that very reason, so
``PipelineModule`` must decide the partition before any layer exists and then build only its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LayerSpec", "TiedLayerSpec"]


class LayerSpec:
    """``cls(*args, **kwargs)``, deferred: ``build()`` makes the module.

    Args:
        typename: an ``nn.Module`` subclass.
        *module_args, **module_kwargs: its constructor's arguments.
    """

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any):
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(f"LayerSpec: the first argument must be an nn.Module subclass, got {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Parameters ``build()`` would make, counted on the meta device: no memory, no
        initialisation, and the random number generators are left as they were (so a rank that
        counts every layer still builds its own layers with the same random state as one that does
        not). Falls back to a real CPU build for a constructor that cannot run on meta."""
        with torch.random.fork_rng(devices=[]):
            try:
                with torch.device("meta"):
                    module = self.build()
            except Exception:  # e.g. a constructor that reads values (.item()) from its tensors
                module = self.build()
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    def __repr__(self) -> str:
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{type(self).__name__}({self.typename.__name__}{''.join(', ' + a for a in args)})"


class TiedLayerSpec(LayerSpec):
    """A layer whose ``tied_weight_attr`` parameters are one logical parameter shared by every
    ``TiedLayerSpec`` with the same ``key`` (e.g. an embedding and the output head).

    Each stage that holds the key builds one module for it, used by all of its occurrences on that
    stage; across stages the engine keeps the tied parameters equal (broadcast at start, gradients
    summed over the holders). ``forward_fn(module, x)``, when given, replaces ``module(x)`` at that
    occurrence: the head written as ``lambda emb, x: x @ emb.weight.t()``.

    Args:
        key: the tie's name.
        typename, *module_args, **module_kwargs: as ``LayerSpec``.
        forward_fn: ``(module, inputs) -> outputs`` for this occurrence, or None for ``module(inputs)``.
        tied_weight_attr: attribute name(s) of the shared parameters (dotted paths allowed).
    """

    def __init__(self, key: str, typename: type[nn.Module], *module_args: Any,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 tied_weight_attr: str | Sequence[str] = ("weight",), **module_kwargs: Any):
        super().__init__(typename, *module_args, **module_kwargs)
        if not isinstance(key, str) or not key:
            raise ValueError(f"TiedLayerSpec: key must be a non-empty string, got {key!r}")
        self.key = key
        self.forward_fn = forward_fn
        attrs = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)
        if not attrs or not all(isinstance(a, str) and a for a in attrs):
            raise ValueError(f"TiedLayerSpec({key!r}): tied_weight_attr must name at least one attribute, "
                             f"got {tied_weight_attr!r}")
        self.tied_weight_attr = attrs

    def __repr__(self) -> str:
        return f"TiedLayerSpec(key={self.key!r}, {super().__repr__()[len('TiedLayerSpec('):]}"
