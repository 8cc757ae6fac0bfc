"""What autograd keeps of a gathered stage-3 parameter: a recipe, not the gathered tensor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False, slots=True)
class SavedParam:
    """A saved tensor that views a gathered unit, kept as the unit and the view's geometry."""

    unit: Any  # stage3_unit.Unit
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements, from the start of the unit's gathered buffer


class SavedUnits:
    """[Note: saved parameters] Autograd saves the weights a backward needs (``weight.t()`` for a
    Linear): a view that would keep the full gathered tensor alive after the unit is released, i.e.
    the whole model resident by the end of forward. Inside ``context()`` a saved tensor that aliases
    a gathered unit is kept as a recipe (the unit and the view's geometry) and rebuilt from the
    re-gathered unit when backward unpacks it. Every parameter of a unit views the unit's one
    gathered buffer, so a saved tensor is recognised by its storage alone: one dict lookup, as this
    runs for every tensor autograd saves, activations included."""

    def __init__(self, gather: Callable[[Any], None]):
        self._gather = gather  # gathers a unit again (a backward outside the usual order)
        self._by_buffer: dict[int, Any] = {}  # gathered units by their buffer's address

    def add(self, unit: Any) -> None:
        """``unit`` was just gathered into ``unit.buffer``."""
        self._by_buffer[unit.buffer.untyped_storage().data_ptr()] = unit

    def remove(self, unit: Any) -> None:
        """``unit.buffer`` is about to be released."""
        self._by_buffer.pop(unit.buffer.untyped_storage().data_ptr(), None)

    def context(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.layout != torch.strided:
            return t
        u = self._by_buffer.get(t.untyped_storage().data_ptr())
        if u is None or t.dtype != u.buffer.dtype:
            return t
        return SavedParam(u, tuple(t.shape), t.stride(), t.storage_offset())

    def _unpack(self, x: Any) -> torch.Tensor:
        if not isinstance(x, SavedParam):
            return x
        u = x.unit
        if not u.gathered:  # released since: gather it again
            self._gather(u)
        return u.buffer.as_strided(x.shape, x.stride, x.offset)
