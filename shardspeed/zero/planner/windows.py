"""How many elements the bounded buffers of a step hold at their worst: simulations of the rules the
strategies follow, on sizes alone (pure functions, no tensors).

[Note: simulate, do not multiply] The strategies bound their buffers with rules (retire the oldest
reduction before a new buffer would cross ``reduce_bucket_size``; prefetch units until a budget is
spent; keep a unit for backward if little follows it). What is alive at the worst moment depends on
the sizes and their order, e.g. 8 buckets of 6.25M under a 6.55M bound hold one bucket, not
``bound`` elements and not two. Replaying the rule gives the figure the code reaches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReductionPeak:
    backward: int  # most full-size buffer elements alive at once during backward (in flight + pooled + filling)
    in_flight: int  # of which, at that moment, in flight (each has a wire copy when the reduce dtype differs)
    after_backward: int  # elements still pooled once every reduction is drained (alive through step())


def reduction_peak(sizes: Sequence[int], bound: int | None, pool_cap: int | None) -> ReductionPeak:
    """Replay ``GradientReducer.make_room`` and ``BufferPool`` (zero/reducer.py) over buffers of
    ``sizes`` elements, borrowed in this order. ``bound`` None: nothing is retired early (stage 0);
    ``pool_cap`` None: buffers are not borrowed (stage 0 and 1 keep theirs)."""
    inflight: deque[int] = deque()
    pool: dict[int, int] = {}
    pooled = 0
    peak, peak_inflight = 0, 0

    def give(n: int) -> None:
        nonlocal pooled
        if pool_cap is not None and pooled + n <= pool_cap:
            pool[n] = pool.get(n, 0) + 1
            pooled += n

    for s in sizes:
        if bound is not None:
            while inflight and sum(inflight) + s > bound:
                give(inflight.popleft())
        if pool.get(s):
            pool[s] -= 1
            pooled -= s
        else:
            pool.clear()
            pooled = 0
        alive = sum(inflight) + pooled + s
        if alive > peak:
            peak, peak_inflight = alive, sum(inflight) + s
        inflight.append(s)
    while inflight:
        give(inflight.popleft())
    return ReductionPeak(peak, peak_inflight, pooled)


def prefetch_budget(unit_numels: Sequence[int], prefetch_numel: int | None) -> int:
    """Stage 3's prefetch window in elements (zero/stage3.py, Note: default windows)."""
    if prefetch_numel is not None:
        return prefetch_numel
    sizes = list(unit_numels) or [0]
    return min(50_000_000, max(max(sizes), sum(sizes) // 8))


def gathered_peak(numels: Sequence[int], full: Sequence[int], persistent: Sequence[bool], budget: int,
                  max_live: int, reuse_distance: int) -> tuple[int, int]:
    """(forward, backward) peaks of gathered elements (full-size, persistent units excluded) for units
    run in the order given, once the first step recorded that order (zero/stage3.py: _prefetch,
    _reused_soon). A unit's ``numels`` count against the budget and ``max_live``; its ``full``
    (padded) size is what its gather buffer holds."""
    n = len(numels)
    persistent_live = sum(m for m, p in zip(numels, persistent, strict=True) if p)

    def window(i: int, step: int, live: set[int]) -> set[int]:
        out = set(live) | {i}
        left, j = budget, i + step
        while 0 <= j < n and left > 0:
            if not persistent[j] and j not in out:
                if persistent_live + sum(numels[k] for k in out) + numels[j] > max_live:
                    break
                out.add(j)
            left -= numels[j]
            j += step
        return out

    def size(units: set[int]) -> int:
        return sum(full[k] for k in units if not persistent[k])

    fwd = max((size(window(i, +1, set())) for i in range(n) if not persistent[i]), default=0)
    # units kept gathered from forward into backward: little follows them in the trace
    after = [sum(numels[k + 1:]) for k in range(n)]
    kept = {k for k in range(n) if not persistent[k] and reuse_distance > 0 and after[k] <= reuse_distance}
    if n and not persistent[n - 1]:
        kept.add(n - 1)  # the last unit's release is deferred into backward (Note: deferred release)
    bwd = max((size(window(i, -1, {k for k in kept if k < i})) for i in range(n) if not persistent[i]), default=0)
    return fwd, bwd
