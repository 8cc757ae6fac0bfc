"""Where offload puts each piece of a plan, and the buffers it adds: every offload term of the
planner is in this file, so it follows the offload tier in one place.

[Note: offload placement] The strategy decides what a shard is; the tier decides where it lives
(ARCHITECTURE.md). So a plan is first made as if nothing were offloaded, then:
- ``offload_optimizer: cpu`` moves fp32 masters, optimizer state and fp32 gradient shards to host
  memory. Where the device is the CPU that is where they already are: nothing changes.
- ``offload_optimizer: nvme`` (zero/swap_optimizer.py) moves the optimizer's per-element state to a
  file under ``nvme_path``; masters and gradients stay in memory. The optimizer's tensors (a
  stage's masters, in step order) are cut into sub-groups of at most ``sub_group_size`` elements (a
  larger tensor alone); the first ones up to ``ratio`` of the elements go to disk, the rest stay.
  A step streams the on-disk sub-groups through a ring of ``max(2, buffer_count)`` host buffers,
  each as large as the largest region that passed through it, kept between steps.
- ``offload_param`` (stage 3) moves the parameter shards; with ``nvme`` they come back through
  ``buffer_count`` buffers of ``buffer_size`` elements in the compute dtype (DeepSpeed's meaning of
  the two keys; provisional until the parameter tier lands). Gathered units stay where they are. A
  master that was a view of the shard (fp32) stays in memory as a copy of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from shardspeed.config.schema import OffloadConfig
from shardspeed.zero.planner.items import Item
from shardspeed.zero.planner.settings import PlanSettings

OPTIMIZER_ROLES = ("master", "optim", "grad_shard")
DISK_ALIGN = 4096  # swap regions start and end on O_DIRECT blocks (zero/swap_io.py)
SLOT_ALIGN = 64  # each state tensor inside a region starts on a cache line


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def sub_groups(sizes: Sequence[int], sub_group_size: int) -> list[list[int]]:
    """The optimizer's tensors (element counts, step order) cut into runs of at most ``sub_group_size``
    elements; a tensor larger than that is a run of its own."""
    groups: list[list[int]] = []
    cur: list[int] = []
    for n in sizes:
        if cur and sum(cur) + n > sub_group_size:
            groups.append(cur)
            cur = []
        cur.append(n)
    if cur:
        groups.append(cur)
    return groups


def on_tier(groups: list[list[int]], ratio: float) -> list[bool]:
    """Which sub-groups go to disk: the first ones, in step order, up to ``ratio`` of the elements
    (the first always)."""
    total = sum(sum(g) for g in groups)
    seen, out = 0, []
    for i, g in enumerate(groups):
        seen += sum(g)
        out.append(i == 0 or seen <= ratio * total + 0.5)
    return out


def region_bytes(group: list[int], state_bytes: int) -> int:
    """A sub-group's bytes in the swap file (and in a ring buffer): each tensor's state, aligned."""
    states = state_bytes // 4  # fp32 tensors per element (Adam: exp_avg, exp_avg_sq)
    return _align(sum(_align(n * 4, SLOT_ALIGN) * states for n in group if n), DISK_ALIGN)


def ring_bytes(regions: list[int], buffer_count: int) -> int:
    """Host bytes of the ring once every region passed through it: region i uses buffer i mod R."""
    ring = max(2, buffer_count)
    return sum(max(regions[k::ring]) for k in range(min(ring, len(regions))))


def apply_offload(items: list[Item], master_sizes: Sequence[int], s: PlanSettings) -> tuple[list[Item], list[str]]:
    """``items`` with offloaded pieces moved to their tier, plus the offload buffers; and notes."""
    notes: list[str] = []
    host = "device" if s.device_type == "cpu" else "host"  # on a CPU machine device memory is host memory
    out = list(items)
    if s.offload_optimizer is not None:
        out = _offload_optimizer(out, master_sizes, s, s.offload_optimizer, host, notes)
    if s.offload_param is not None:
        out = _offload_params(out, s, s.offload_param, host, notes)
    return out, notes


def _offload_optimizer(items: list[Item], master_sizes: Sequence[int], s: PlanSettings, opt: OffloadConfig,
                       host: str, notes: list[str]) -> list[Item]:
    if opt.device == "cpu":
        if host == "device":
            notes.append("offload_optimizer cpu: the device is the CPU, so masters and optimizer state stay where "
                         "they are")
        out = [replace(i, tier=host) if i.role in OPTIMIZER_ROLES else i for i in items]
        if host != "device":  # a master that was a view of the device's parameters becomes a host copy
            out = [replace(i, what="fp32 masters (this rank's shard, on the host)", nbytes=sum(master_sizes) * 4)
                   if i.role == "master" and i.group == "model states" and i.nbytes == 0 else i for i in out]
        return out
    groups = sub_groups(master_sizes, s.sub_group_size)
    tier = on_tier(groups, opt.ratio)
    regions = [region_bytes(g, s.optimizer.state_bytes) for g, t in zip(groups, tier, strict=True) if t]
    disk_elems = sum(sum(g) for g, t in zip(groups, tier, strict=True) if t)
    out = []
    for i in items:
        if i.role == "optim" and i.group == "model states":
            kept = sum(sum(g) for g, t in zip(groups, tier, strict=True) if not t) * s.optimizer.state_bytes
            out.append(replace(i, what=i.what + ": in its swap file", nbytes=sum(regions), tier="disk"))
            if kept:
                out.append(replace(i, what=f"optimizer state beyond ratio {opt.ratio} (kept in memory)", nbytes=kept))
        else:
            out.append(i)
    if regions:
        # the first step finds no state on disk: the optimizer creates a sub-group's state in memory,
        # which is copied into the ring and dropped before the next sub-group steps
        out.append(Item("transient", "optim", "a sub-group's optimizer state as the first step creates it",
                        max(regions), tier=host, phase="step"))
        out.append(Item("buffers", "swap", f"optimizer swap ring ({min(max(2, opt.buffer_count), len(regions))} "
                        f"buffers of sub-groups <= {s.sub_group_size:,} elements)",
                        ring_bytes(regions, opt.buffer_count), tier=host))
    notes.append(f"offload_optimizer nvme: {len(groups)} sub-groups, {sum(tier)} on disk "
                 f"({disk_elems:,} of {sum(master_sizes):,} master elements)")
    return out


def _offload_params(items: list[Item], s: PlanSettings, par: OffloadConfig, host: str, notes: list[str]) -> list[Item]:
    if par.device == "cpu":
        if host == "device":
            notes.append("offload_param cpu: the device is the CPU, so parameter shards stay where they are")
        return [replace(i, tier=host) if i.role == "param_shard" and i.group == "model states" else i for i in items]
    shard_bytes = sum(i.nbytes for i in items if i.role == "param_shard" and i.group == "model states")
    out = []
    for i in items:
        if i.role == "param_shard" and i.group == "model states":
            out.append(replace(i, tier="disk"))
        elif i.role == "master" and i.group == "model states" and s.compute == "fp32":
            # the master was the shard itself; the shard is now a file, the master stays in memory
            out.append(replace(i, what="fp32 masters (this rank's shard, kept in memory)", nbytes=shard_bytes))
        else:
            out.append(i)
    swap = min(par.buffer_count * par.buffer_size * s.compute_bytes, shard_bytes)
    out.append(Item("buffers", "swap", f"parameter swap buffers ({par.buffer_count} x {par.buffer_size:,} elements)",
                    swap, tier=host))
    notes.append("offload_param nvme: buffers as DeepSpeed sizes them (buffer_count x buffer_size); provisional "
                 "until shardspeed's parameter tier lands")
    return out
