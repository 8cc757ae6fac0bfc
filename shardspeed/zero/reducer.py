"""The one gradient reduction of stages 0-3: cast and prescale, all-reduce or reduce-scatter, a bound
on what is in flight, post-divide into where the average belongs; and the pool of full-size
gradient buffers the partitioned stages borrow for the length of one reduction.

[Note: one reducer] Every stage reduces the same way; they differ only in where the average goes.
Stage 0 replaces its bucket by the average (all-reduce, in place). Stages 1-3 add this rank's part
of the average into an fp32 shard (reduce-scatter), which accumulates over micro-batches; a fresh
shard (nothing reduced into it this step) is written directly by the collective when the dtypes
allow, so the first micro-batch costs no extra copy.

[Note: bounded reduction memory] Each reduction in flight holds its full-size input, and on gloo a
flat copy of it too. Stages 1-3 launch with a bound (``reduce_bucket_size`` elements): before a
launch, and before a buffer is borrowed to be filled, the oldest reductions are retired until the
new one fits: a buffer being filled and the ones in flight together stay within the bound, and the
pool hands the retired buffer straight to the next unit. Otherwise the full gradients of the whole
model (4 B/param, what partitioning exists to avoid) would be alive at the end of backward. The
oldest had the whole time the next buffer's first gradient took to compute (the borrow happens in
that gradient's hook), so the wait is usually free. Stage 0 all-reduces its persistent buckets in
place and needs no bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shardspeed.comm import Handle, all_reduce, reduce_scatter
from shardspeed.zero.strategy import StrategyOptions


@dataclass
class _Flight:
    handle: Handle
    out: torch.Tensor  # where the collective writes the sum
    dest: torch.Tensor  # where the average ends up
    numel: int  # full-size elements this reduction holds
    replace: bool  # dest takes the average (stage 0); else the average is added to it
    on_done: Callable[[], None] | None


class GradientReducer:
    def __init__(self, opts: StrategyOptions, group: object, world: int, bound: int | None):
        self.opts, self.group, self.bound = opts, group, bound
        self.post = world / (opts.predivide_factor if opts.prescale else 1.0)
        self._inflight: deque[_Flight] = deque()

    def _wire(self, full: torch.Tensor) -> torch.Tensor:
        """What goes on the wire: ``full`` in the reduce dtype, prescaled (a copy when it is cast)."""
        o = self.opts
        wire = full if o.reduce_dtype == full.dtype else full.to(o.reduce_dtype)
        if o.prescale and o.predivide_factor != 1.0:
            wire.div_(o.predivide_factor)
        return wire

    def make_room(self, numel: int) -> None:
        """Retire the oldest reductions until ``numel`` more elements fit under the bound. Called
        before a launch, and before a full-size buffer is borrowed to be filled (Note: bounded
        reduction memory): the buffer being filled counts too."""
        if self.bound is None:
            return
        while self._inflight and sum(f.numel for f in self._inflight) + numel > self.bound:
            self._retire(self._inflight.popleft())

    def average(self, full: torch.Tensor, on_done: Callable[[], None] | None = None) -> None:
        """Replace ``full`` by its average over the group (stage 0)."""
        self.make_room(full.numel())
        wire = self._wire(full)
        handle = all_reduce(wire, group=self.group, async_op=self.opts.overlap)
        self._inflight.append(_Flight(handle, wire, full, full.numel(), True, on_done))

    def add_shard(self, full: torch.Tensor, shard: torch.Tensor, lo: int, fresh: bool,
                  on_done: Callable[[], None] | None = None) -> None:
        """Add this rank's part, ``[lo, lo + shard.numel())``, of the average of ``full`` over the
        group into ``shard``; ``fresh``: the shard holds nothing reduced yet (stages 1-3)."""
        self.make_room(full.numel())
        wire = self._wire(full)
        if not self.opts.reduce_scatter:  # DeepSpeed's reduce_scatter: false: average it all, keep a part
            handle = all_reduce(wire, group=self.group, async_op=self.opts.overlap)
            out = wire[lo:lo + shard.numel()]
        else:
            out = shard if fresh and wire.dtype == shard.dtype else wire.new_empty(shard.numel())
            # the wire is this reduction's own (a borrowed buffer, a cast copy, or stage 1's full buffer,
            # zeroed after the step): gloo may reduce it in place (comm/collectives.py)
            handle = reduce_scatter(out, wire, group=self.group, async_op=self.opts.overlap, scratch=True)
        self._inflight.append(_Flight(handle, out, shard, full.numel(), False, on_done))

    def _retire(self, f: _Flight) -> None:
        f.handle.wait()
        in_place = f.out.data_ptr() == f.dest.data_ptr() and f.out.dtype == f.dest.dtype
        if in_place:  # the collective wrote the destination itself (stage 1 in fp32 even via all-reduce)
            if self.post != 1.0:
                f.dest.div_(self.post)
        elif f.replace:
            f.dest.copy_(f.out)
            if self.post != 1.0:
                f.dest.div_(self.post)
        else:  # a fresh shard is zeros, so adding is also right for the first micro-batch
            f.dest.add_(f.out.to(f.dest.dtype), alpha=1.0 / self.post)
        if f.on_done is not None:
            f.on_done()

    def drain(self) -> None:
        """Finish every reduction in flight, oldest first."""
        while self._inflight:
            self._retire(self._inflight.popleft())


class BufferPool:
    """Full-size gradient buffers, uninitialised, kept between borrows of the same size within a
    step and emptied at ``step()`` (at rest a rank holds its shards only). At most ``cap_numel``
    elements are kept: buffers of many sizes (one per bucket size) would otherwise pile up beyond
    the bound on what is in flight (Note: bounded reduction memory)."""

    def __init__(self, cap_numel: int, before_take: Callable[[int], None] | None = None) -> None:
        self.cap_numel = cap_numel
        self.before_take = before_take  # the reducer's make_room: retired buffers come back here first
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._pooled_numel = 0
        self.allocated = 0  # bytes of buffers alive (borrowed or pooled)
        self.peak_allocated = 0

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.before_take is not None:
            self.before_take(numel)
        free = self._free.get((numel, dtype))
        if free:
            self._pooled_numel -= numel
            return free.pop()
        self.clear()  # pooled buffers of other sizes would sit beside the new one: let them go
        self.allocated += numel * torch.tensor([], dtype=dtype).element_size()
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, t: torch.Tensor) -> None:
        if self._pooled_numel + t.numel() > self.cap_numel:
            self.allocated -= t.numel() * t.element_size()  # dropped: freed once the caller lets go
            return
        self._pooled_numel += t.numel()
        self._free.setdefault((t.numel(), t.dtype), []).append(t)

    def pooled_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._free.values() for t in ts)

    def clear(self) -> None:
        self.allocated -= self.pooled_bytes()
        self._pooled_numel = 0
        self._free.clear()


def zero_unwritten(buf: torch.Tensor, ranges: list[tuple[int, int]], written: list[bool],
                   gaps: list[tuple[int, int]]) -> None:
    """Zero the parts of a borrowed buffer no gradient was copied into this backward: the ranges of
    parameters that got none, and the padding ``gaps`` (reduced, never read, kept finite)."""
    for (lo, hi), done in zip(ranges, written, strict=True):
        if not done:
            buf[lo:hi].zero_()
    for lo, hi in gaps:
        buf[lo:hi].zero_()
