"""Partition math for ZeRO: pure functions, tested without processes.

[Note: layout] Trainable parameters are packed, per optimizer param group, into flat buckets
(reverse registration order, at most ``bucket_numel`` elements each). A bucket is padded to a
multiple of the data-parallel world size N and cut into N equal, contiguous shards; rank r owns
shard r of every bucket. One reduce-scatter per bucket therefore lands exactly this rank's gradient
shard, and one all-gather per bucket rebuilds the parameters. Parameters may straddle shards; the
``Slot`` index (name, shape, offset) of each bucket maps any flat range back to named tensors,
which is what per-parameter optimizers (LAMB) and world-size-agnostic checkpoints need.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shardspeed.zero.buckets import BucketPlan, Slot, plan_buckets


def padded_size(numel: int, world_size: int, align: int = 1) -> int:
    """Smallest size >= numel divisible by world_size * align."""
    unit = world_size * align
    return -(-numel // unit) * unit


@dataclass(frozen=True)
class ShardedBucketPlan:
    plan: BucketPlan
    group: int  # optimizer param-group index
    padded: int  # total elements including padding
    shard: int  # elements per rank

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard


@dataclass(frozen=True)
class Segment:
    """The part of parameter ``slot`` that lies in a shard: ``length`` elements starting at
    ``param_offset`` inside the (flattened) parameter and at ``shard_offset`` inside the shard."""

    slot: Slot
    param_offset: int
    shard_offset: int
    length: int


def plan_sharded_buckets(names_by_group: Sequence[Sequence[str]], shapes_by_group: Sequence[Sequence[tuple]],
                         bucket_numel: int, world_size: int, alone: Collection[str] = ()) -> list[ShardedBucketPlan]:
    out = []
    for g, (names, shapes) in enumerate(zip(names_by_group, shapes_by_group, strict=True)):
        for plan in plan_buckets(names, shapes, bucket_numel, alone):
            padded = padded_size(plan.numel, world_size)
            out.append(ShardedBucketPlan(plan, g, padded, padded // world_size))
    return out


def shard_segments(plan: ShardedBucketPlan, rank: int) -> list[Segment]:
    """The pieces of each parameter that fall into ``rank``'s shard of the bucket, in flat order."""
    lo, hi = plan.shard_range(rank)
    segs = []
    for slot in sorted(plan.plan.slots, key=lambda s: s.offset):
        start, end = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if start < end:
            segs.append(Segment(slot, start - slot.offset, start - lo, end - start))
    return segs
