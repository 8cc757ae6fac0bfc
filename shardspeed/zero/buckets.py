"""Flat, contiguous gradient buckets and the index that maps them back to named tensors.

Pure arithmetic (no processes): which parameters share a bucket, at which offset each one lives.
Buckets follow the reverse of registration order, the order backward usually produces gradients,
so the first bucket fills (and its reduction starts) while backward is still running.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketPlan:
    param_ids: tuple[int, ...]  # indices into the parameter list, in bucket order
    slots: tuple[Slot, ...]
    numel: int


def plan_buckets(names: Sequence[str], shapes: Sequence[tuple[int, ...]], cap_numel: int,
                 alone: Collection[str] = ()) -> list[BucketPlan]:
    """Group parameters (walked in reverse) into buckets of at most ``cap_numel`` elements; a single
    parameter larger than the cap, or named in ``alone`` (embedding tables reduced as index slices,
    zero/sparse.py), gets a bucket of its own."""
    buckets: list[BucketPlan] = []
    ids: list[int] = []
    slots: list[Slot] = []
    offset = 0

    def close() -> None:
        nonlocal ids, slots, offset
        if ids:
            buckets.append(BucketPlan(tuple(ids), tuple(slots), offset))
        ids, slots, offset = [], [], 0

    for i in reversed(range(len(names))):
        numel = 1
        for d in shapes[i]:
            numel *= d
        if ids and (offset + numel > cap_numel or names[i] in alone):
            close()
        ids.append(i)
        slots.append(Slot(names[i], tuple(shapes[i]), offset, numel))
        offset += numel
        if names[i] in alone:
            close()
    close()
    return buckets


class GradBucket:
    """One flat buffer and per-parameter views into it."""

    def __init__(self, plan: BucketPlan, dtype: torch.dtype, device: torch.device):
        self.plan = plan
        self.buffer = torch.zeros(plan.numel, dtype=dtype, device=device)
        self.views = [self.buffer[s.offset:s.offset + s.numel].view(s.shape) for s in plan.slots]
        self.ready = 0
        self.launched = False

    def complete(self) -> bool:
        return self.ready == len(self.plan.param_ids)

    def reset(self) -> None:
        self.ready = 0
        self.launched = False
