"""``GatheredParameters``: full parameters for a moment, under ZeRO stage 3."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from shardspeed.comm import broadcast, get_global_rank


class GatheredParameters:
    """Make ``params`` whole inside the ``with`` block.

    ``modifier_rank=None``: read only; the values are dropped on exit. ``modifier_rank=r``: the
    values rank ``r`` (a rank of the data-parallel group) holds on exit are broadcast to every rank
    and re-partitioned, masters included. Parameters not partitioned by stage 3 are left as they are.
    Every rank of the data-parallel group must enter the block (it is a collective).
    """

    def __init__(self, params: torch.nn.Parameter | Iterable[torch.nn.Parameter], modifier_rank: int | None = None,
                 fwd_module: Any = None, enabled: bool = True):
        self.params = [params] if isinstance(params, torch.nn.Parameter) else list(params)
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._held: list[tuple[Any, list[Any]]] = []

    def __enter__(self) -> GatheredParameters:
        if not self.enabled:
            return self
        by_strategy: dict[int, tuple[Any, list[torch.nn.Parameter]]] = {}
        for p in self.params:
            owner = getattr(p, "_shardspeed_z3", None)
            if owner is not None:
                by_strategy.setdefault(id(owner[0]), (owner[0], []))[1].append(p)
        for strategy, params in by_strategy.values():
            self._held.append((strategy, strategy.acquire(params)))
        return self

    def __exit__(self, *exc: Any) -> None:
        modified = self.modifier_rank is not None and exc[0] is None
        for strategy, units in self._held:
            if modified:
                src = get_global_rank(strategy.group, self.modifier_rank)
                with torch.no_grad():
                    for u in units:
                        for p in u.params:
                            broadcast(p.data, src=src, group=strategy.group)
            strategy.release(units, modified=modified)
        self._held.clear()
