"""Where a stage-3 unit's parameters live in its flat form, and which part of it each rank keeps.
Pure functions.

[Note: flat units] A unit's parameters are laid end to end (each start aligned to ``ALIGN``
elements), the whole padded to a multiple of the world size and cut into equal shards: rank r keeps
elements [r*S, (r+1)*S). An all-gather of the shards is then the flat form itself, so every gathered
parameter is a view of the gather buffer (no copy out), and a gradient is one contiguous copy into
the reduce-scatter buffer. A parameter may fall across shards, or miss a rank's shard entirely: a
rank owns a *piece* of each parameter, possibly empty.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 16  # elements: 64 bytes in fp32, so every gathered parameter starts on a vector boundary


@dataclass(frozen=True)
class FlatLayout:
    offsets: tuple[int, ...]  # each parameter's first element in the flat form
    numels: tuple[int, ...]
    shard: int  # elements per rank; the flat form is world * shard long
    # this rank's piece of each parameter: (first element in the parameter, offset in the shard, length)
    pieces: tuple[tuple[int, int, int], ...]
    gaps: tuple[tuple[int, int], ...]  # flat ranges no parameter covers (alignment and tail padding)


def flat_layout(numels: list[int], world: int, rank: int, align: int = ALIGN) -> FlatLayout:
    offsets, end = [], 0
    gaps = []
    for n in numels:
        start = -(-end // align) * align
        if start > end:
            gaps.append((end, start))
        offsets.append(start)
        end = start + n
    shard = -(-end // world) if end else 0
    if world * shard > end:
        gaps.append((end, world * shard))
    lo, hi = rank * shard, (rank + 1) * shard
    pieces = []
    for o, n in zip(offsets, numels, strict=True):
        a, b = max(o, lo), min(o + n, hi)
        pieces.append((a - o, a - lo, b - a) if b > a else (0, 0, 0))
    return FlatLayout(tuple(offsets), tuple(numels), shard, tuple(pieces), tuple(gaps))
