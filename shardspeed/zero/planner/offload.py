"""Where offload puts each piece of a plan, and the buffers it adds: every offload term of the
planner is in this file, so it follows the offload tier (zero/swap_optimizer.py, swap_params.py,
swap_io.py) in one place.

[Note: offload placement] The strategy decides what a shard is; the tier decides where it lives
(ARCHITECTURE.md). So a plan is first made as if nothing were offloaded, then:
- ``device: cpu`` (either section) moves the pieces to host memory; where the device is the CPU
  that is where they already are, and nothing changes (the engine says so once).
- ``offload_param: nvme`` (stage 3): each non-persistent unit's shard lives in the rank's params
  file (one ``ALIGN``-rounded region per unit), written as soon as the unit is built, and is read
  into a pool of ``buffer_count`` buffers of the largest such shard (allocated once, kept);
  persistent units keep theirs. Its fp32 master becomes a copy of its own even in fp32 training
  (the optimizer must not step a tensor on disk).
- ``offload_optimizer: nvme``: the strategy cuts its masters into sub-groups of at most
  ``sub_group_size`` elements (stage 3: whole units; with ``optimizer_in_backward`` one unit each),
  the first ones up to ``ratio`` of the elements go to the optimizer file: their per-element state
  and, where masters are copies (bf16/fp16, or parameters on disk), the masters too. A region is
  each tensor's slots (64-byte aligned) rounded up to ``ALIGN``; masters written before the state
  exists reserve room for it. A step streams regions through a ring of ``max(2, buffer_count)``
  buffers, each grown to the largest region that passed through it and kept between steps; the
  first step also holds one sub-group's state as the optimizer creates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from shardspeed.zero.planner.items import Item
from shardspeed.zero.planner.settings import PlanSettings

DISK_ALIGN = 4096  # swap regions start and end on O_DIRECT blocks (swap_io.ALIGN)
SLOT_ALIGN = 64  # each tensor inside a region starts on a cache line (swap_optimizer.ALIGN_SLACK)


@dataclass(frozen=True)
class OffloadLayout:
    """What a stage tells the tier about itself."""

    # the optimizer's tensors (elements), grouped by what the strategy steps together (stages 1-2:
    # one bucket shard each; stage 3: a unit's pieces), in the order they step
    master_groups: list[list[int]]
    tiered_shards: list[int] = field(default_factory=list)  # stage 3: non-persistent units' shard elements
    persistent_shard: int = 0  # stage 3: shard elements of persistent units (never on disk)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def sub_groups(groups: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Merge the strategy's step groups, in order, while they fit in ``size`` elements (a larger
    one stands alone; ``size`` 0: each alone)."""
    out: list[list[int]] = []
    n = 0
    for g in groups:
        k = sum(g)
        if not out or (n + k > size and out[-1]):
            out.append([])
            n = 0
        out[-1].extend(g)
        n += k
    return out


def on_tier(groups: list[list[int]], ratio: float) -> list[bool]:
    """Which sub-groups go to disk: the first ones, in step order, up to ``ratio`` of the elements
    (the first always)."""
    total = sum(sum(g) for g in groups)
    seen, out = 0, []
    for i, g in enumerate(groups):
        seen += sum(g)
        out.append(i == 0 or seen <= ratio * total + 0.5)
    return out


def region_bytes(group: list[int], slots_per_tensor: int) -> int:
    """A sub-group's bytes in a ring buffer: ``slots_per_tensor`` fp32 slots per non-empty tensor."""
    return _align(sum(_align(n * 4, SLOT_ALIGN) * slots_per_tensor for n in group if n), DISK_ALIGN)


def file_bytes(group: list[int], states: int, masters: bool) -> int:
    """A sub-group's bytes in the optimizer file: its region, or where masters were written first,
    the room reserved then for masters and state together."""
    per = states + int(masters)
    region = region_bytes(group, per)
    if not masters:
        return region
    reserve = 4 * sum(group) * per + SLOT_ALIGN * len(group) * per
    return _align(max(region_bytes(group, 1), _align(reserve, DISK_ALIGN)), DISK_ALIGN)


def ring_bytes(regions: list[int], buffer_count: int) -> int:
    """Host bytes of the ring once every region passed through it: region i uses buffer i mod R."""
    ring = max(2, buffer_count)
    return sum(max(regions[k::ring]) for k in range(min(ring, len(regions))))


def apply_offload(items: list[Item], layout: OffloadLayout, s: PlanSettings) -> tuple[list[Item], list[str]]:
    """``items`` with offloaded pieces moved to their tier, plus the offload buffers; and notes."""
    notes: list[str] = []
    host = "device" if s.device_type == "cpu" else "host"  # on a CPU machine device memory is host memory
    out = list(items)
    par, opt = s.offload_param, s.offload_optimizer
    if par is not None:  # first: it decides whether masters are copies the optimizer tier may take
        out = _offload_params(out, layout, s, host, notes)
    if opt is not None:
        out = _offload_optimizer(out, layout, s, host, notes)
    return out, notes


def _is(i: Item, role: str) -> bool:
    return i.role == role and i.group == "model states"


def _offload_params(items: list[Item], layout: OffloadLayout, s: PlanSettings, host: str,
                    notes: list[str]) -> list[Item]:
    par = s.offload_param
    assert par is not None
    if par.device == "cpu":
        if host == "device":
            notes.append("offload_param cpu: the device is the CPU, so parameter shards stay where they are")
        return [replace(i, tier=host) if _is(i, "param_shard") else i for i in items]
    largest = max(layout.tiered_shards, default=0)
    if largest > par.buffer_size:
        raise ValueError(f"zero_optimization.offload_param.buffer_size {par.buffer_size} is smaller than the largest "
                         f"shard a rank reads at once ({largest} elements); set it to {largest} or more")
    cb = s.compute_bytes
    on_disk = sum(_align(n * cb, DISK_ALIGN) for n in layout.tiered_shards)
    shard = sum(layout.tiered_shards) + layout.persistent_shard
    out = []
    for i in items:
        if _is(i, "param_shard"):
            out.append(replace(i, what=i.what + ": on disk", nbytes=on_disk, tier="disk"))
            if layout.persistent_shard:
                out.append(replace(i, what="parameter shards of persistent units", nbytes=layout.persistent_shard * cb))
        elif _is(i, "master") and i.nbytes == 0:  # it was the shard itself: now a copy of its own
            out.append(replace(i, what="fp32 masters (a copy: the shard is on disk)", nbytes=shard * 4))
            out.append(Item("init", "master", "fp32 masters (copies) of every unit cut so far", shard * 4))
        elif i.group == "init" and i.role == "param_shard":
            # each unit's shard goes to disk as soon as the unit is built (swap_params.ParamTier.add):
            # of the compute shards only the persistent ones and the one being written exist at once
            kept = (layout.persistent_shard * cb + 2 * _align(largest * cb, DISK_ALIGN)
                    + i.nbytes - shard * cb)  # the rest of the item: masters (bf16/fp16) and gradient shards
            out.append(replace(i, what="shards cut at initialize() (tiered ones written out one by one)",
                               nbytes=kept))
        else:
            out.append(i)
    count = min(max(1, par.buffer_count), len(layout.tiered_shards))
    out.append(Item("buffers", "swap", f"parameter read buffers ({count} x the largest shard, {largest:,} elements)",
                    count * _align(largest * cb, DISK_ALIGN), tier=host))
    return out


def _offload_optimizer(items: list[Item], layout: OffloadLayout, s: PlanSettings, host: str,
                       notes: list[str]) -> list[Item]:
    opt = s.offload_optimizer
    assert opt is not None
    if opt.device == "cpu":
        if host == "device":
            notes.append("offload_optimizer cpu: the device is the CPU, so masters and optimizer state stay where "
                         "they are")
        out = [replace(i, tier=host) if i.role in ("master", "optim", "grad_shard") else i for i in items]
        if host != "device":  # a master that was a view of the device's parameters becomes a host copy
            elems = sum(map(sum, layout.master_groups))
            out = [replace(i, what="fp32 masters (this rank's shard, on the host)", nbytes=elems * 4)
                   if _is(i, "master") and i.nbytes == 0 else i for i in out]
        return out
    states = s.optimizer.state_bytes // 4
    masters = any(_is(i, "master") and i.nbytes > 0 for i in items)  # copies, not views: they go too
    groups = sub_groups(layout.master_groups, 0 if s.z3.optimizer_in_backward else s.sub_group_size)
    tier = on_tier(groups, opt.ratio)
    streamed = [g for g, t in zip(groups, tier, strict=True) if t]
    kept_elems = sum(sum(g) for g, t in zip(groups, tier, strict=True) if not t)
    total_elems = sum(map(sum, groups))
    regions = [region_bytes(g, states + int(masters)) for g in streamed]
    out = []
    for i in items:
        if not (_is(i, "optim") or (masters and _is(i, "master"))):
            out.append(i)
        elif kept_elems:  # the sub-groups beyond ``ratio`` keep theirs in memory
            out.append(replace(i, what=i.what + f" (beyond ratio {opt.ratio}: in memory)",
                               nbytes=i.nbytes * kept_elems // max(total_elems, 1)))
    if streamed:
        out.append(Item("model states", "optim", "optimizer file (state" + (" and masters" if masters else "") +
                        f", {len(streamed)} sub-groups)", sum(file_bytes(g, states, masters) for g in streamed),
                        tier="disk"))
        out.append(Item("buffers", "swap", f"optimizer ring ({min(max(2, opt.buffer_count), len(streamed))} buffers "
                        "of the largest sub-group through each)", ring_bytes(regions, opt.buffer_count), tier=host))
        # the first step finds no state on disk: the optimizer creates a sub-group's state in memory
        out.append(Item("transient", "optim", "a sub-group's state as the first step creates it",
                        max(region_bytes(g, states) for g in streamed), tier=host, phase="step"))
    notes.append(f"offload_optimizer nvme: {len(groups)} sub-groups, {len(streamed)} on disk "
                 f"({total_elems - kept_elems:,} of {total_elems:,} master elements)")
    return out
