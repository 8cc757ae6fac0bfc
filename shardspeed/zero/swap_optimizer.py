"""Optimizer state on disk: the optimizer steps sub-group by sub-group, each sub-group's state read
from the swap file just before its step and written back just after, reads and writes overlapping
the steps of other sub-groups. One swapper serves every ZeRO stage: it only sees the tensors the
optimizer updates (a stage's fp32 masters), never the stage's buckets or units.

[Note: optimizer state on disk] The swapper moves tensors *under* an unchanged optimizer:
- A sub-group is a run of the optimizer's parameters (its param groups in order) of at most
  ``sub_group_size`` elements (a larger parameter is a sub-group of its own). Each parameter's
  per-element state tensors (those shaped like it: Adam's ``exp_avg``/``exp_avg_sq``, SGD's momentum
  buffer) have a place in the sub-group's region of the swap file; other state (Adam's ``step``)
  stays in memory.
- Between steps such a state tensor is an empty placeholder in ``optimizer.state``, so memory holds
  no per-element state of an offloaded sub-group. During a step it is a view into one of the ring
  buffers the region was read into, so the optimizer's in-place update lands in the buffer that is
  written back.
- The optimizer is called once per sub-group with ``.grad`` set on that sub-group's parameters only
  (a torch optimizer skips parameters without a gradient), on the reduced gradient shards where the
  strategy keeps them. Every element then goes through the same arithmetic, in the same order, as in
  one ``optimizer.step()`` over everything (CPU optimizers update each tensor on its own), so a run
  with the state on disk equals the run without, bit for bit. An optimizer whose step reduces over
  all its parameters at once (LAMB's ``set_partition``) cannot be split so and is refused.
- The first step finds no state on disk: the optimizer creates it; the swapper lays out the region
  from what was created and writes it. Anything that reads or writes the state as tensors
  (checkpoints) does so inside ``all_resident()``.
- The masters themselves stay in memory: in fp32 training they are the parameters' own storage
  (stages 1-2) or the shard stage 3 gathers from; parameters on disk are ``offload_param``'s job.

[Note: the ring] Sub-group i is read into ring buffer i mod R (R = ``buffer_count``, at least 2): the
reads of the next R - 1 sub-groups are in flight while sub-group i steps, and the write-back of i
goes on while i + 1 steps; the read into a buffer first waits for the write-back of the sub-group
that held it. Memory: R buffers of the largest region, besides the parameters and gradients.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from shardspeed.comm import all_reduce
from shardspeed.config import ConfigError, ShardspeedConfig
from shardspeed.zero.swap_io import IOHandle, SwapFile, align_up, aligned_empty, check_directory, check_free_space

log = logging.getLogger("shardspeed")

KEY = "zero_optimization.offload_optimizer"


@dataclass
class _Slot:
    param: torch.Tensor
    key: str
    offset: int  # bytes from the start of the region
    dtype: torch.dtype


@dataclass
class SubGroup:
    params: list[torch.Tensor]
    numel: int
    on_tier: bool  # False: beyond offload_optimizer.ratio, its state stays in memory
    slots: list[_Slot] = field(default_factory=list)
    nbytes: int = 0  # region size; 0 until its state first existed
    file_offset: int = -1

    @property
    def laid_out(self) -> bool:
        return self.file_offset >= 0


def per_element_states(optimizer: torch.optim.Optimizer) -> int:
    """How many tensors shaped like each parameter ``optimizer`` keeps, for the disk check before the
    first step (the region layout itself comes from the state the first step creates)."""
    g = optimizer.param_groups[0] if optimizer.param_groups else {}
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 if g.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if g.get("momentum", 0) else 0
    if isinstance(optimizer, torch.optim.Adagrad):
        return 1
    if isinstance(optimizer, torch.optim.RMSprop):
        return 1 + bool(g.get("momentum", 0)) + bool(g.get("centered"))
    return 2


class OptimizerSwapper:
    """Steps ``optimizer`` with its per-element state on a ``SwapFile`` (Note: optimizer state on disk)."""

    def __init__(self, optimizer: torch.optim.Optimizer, nvme_path: str, rank: int, sub_group_size: int,
                 buffer_count: int, ratio: float, aio: Any):
        self.optimizer = optimizer
        self.file = SwapFile(nvme_path, "optimizer", rank, aio)
        self._finalizer = weakref.finalize(self, self.file.close)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.subgroups = self._split(params, sub_group_size, ratio)
        self.ring_size = max(2, buffer_count)
        self._ring: list[torch.Tensor | None] = [None] * self.ring_size
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}

    @staticmethod
    def _split(params: list[torch.Tensor], size: int, ratio: float) -> list[SubGroup]:
        groups: list[SubGroup] = []
        cur: list[torch.Tensor] = []
        n = 0
        for p in params:
            if cur and n + p.numel() > size:
                groups.append(SubGroup(cur, n, True))
                cur, n = [], 0
            cur.append(p)
            n += p.numel()
        if cur:
            groups.append(SubGroup(cur, n, True))
        total = sum(g.numel for g in groups)
        # ratio: the first sub-groups, in step order, holding up to that fraction of the elements
        budget, seen = ratio * total, 0
        for g in groups:
            seen += g.numel
            g.on_tier = seen <= budget + 0.5 or g is groups[0]
        return groups

    # -- sizes, for checks and the planner -------------------------------------------------------
    def offloaded_numel(self) -> int:
        return sum(g.numel for g in self.subgroups if g.on_tier)

    def disk_bytes_needed(self, states_per_element: int) -> int:
        """Swap-file bytes for ``states_per_element`` fp32 tensors per offloaded element (with alignment)."""
        return sum(align_up(4 * g.numel * states_per_element) + ALIGN_SLACK * len(g.params)
                   for g in self.subgroups if g.on_tier)

    def buffer_bytes(self) -> int:
        """Host bytes of the ring buffers now (Note: the ring)."""
        return sum(b.numel() for b in self._ring if b is not None)

    def disk_bytes(self) -> int:
        return self.file.size

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One ``optimizer.step()``, sub-group by sub-group, on the gradients now linked to the masters."""
        grads = {id(p): p.grad for g in self.subgroups for p in g.params}
        for g in self.subgroups:
            for p in g.params:
                p.grad = None
        try:
            for g in self.subgroups:
                if not g.on_tier:
                    self._step_group(g, grads)
            self._step_streamed([g for g in self.subgroups if g.on_tier], grads)
        finally:
            for g in self.subgroups:
                for p in g.params:
                    p.grad = grads[id(p)]

    def _step_group(self, g: SubGroup, grads: dict[int, torch.Tensor | None]) -> None:
        for p in g.params:
            p.grad = grads[id(p)]
        self.optimizer.step()
        for p in g.params:
            p.grad = None

    def _step_streamed(self, groups: list[SubGroup], grads: dict[int, torch.Tensor | None]) -> None:
        ring = self.ring_size
        reads: dict[int, IOHandle | None] = {}
        writes: dict[int, IOHandle] = {}

        def launch_read(j: int) -> None:
            if j - ring in writes:  # the buffer's previous sub-group must be on disk first
                writes.pop(j - ring).wait()
            reads[j] = self._swap_in(groups[j], j % ring)

        issued = 0
        try:
            while issued < min(len(groups), ring - 1):
                launch_read(issued)
                issued += 1
            for i, g in enumerate(groups):
                handle = reads.pop(i)
                if handle is not None:
                    handle.wait()
                self._step_group(g, grads)
                writes[i] = self._swap_out(g, i % ring)
                if issued < len(groups):
                    launch_read(issued)
                    issued += 1
        finally:
            for h in list(reads.values()) + list(writes.values()):
                if h is not None:
                    h.wait()

    # -- moving one sub-group -------------------------------------------------------------------
    def _buffer(self, k: int, nbytes: int) -> torch.Tensor:
        buf = self._ring[k]
        if buf is None or buf.numel() < nbytes:
            buf = self._ring[k] = aligned_empty(nbytes)
        return buf

    def _views(self, g: SubGroup, buf: torch.Tensor) -> Iterator[tuple[_Slot, torch.Tensor]]:
        for s in g.slots:
            n = s.param.numel() * s.dtype.itemsize
            yield s, buf[s.offset:s.offset + n].view(s.dtype).view(s.param.shape)

    def _swap_in(self, g: SubGroup, k: int, buf: torch.Tensor | None = None) -> IOHandle | None:
        """Start reading ``g``'s state into ring buffer ``k`` (or ``buf``); the optimizer sees the views
        at once, and the data once the returned handle was waited for."""
        if not g.laid_out:
            return None  # no state yet: the optimizer creates it at this step
        buf = buf if buf is not None else self._buffer(k, g.nbytes)
        for s, view in self._views(g, buf):
            self.optimizer.state[s.param][s.key] = view
        return self.file.read(g.file_offset, buf, g.nbytes)

    def _lay_out(self, g: SubGroup) -> None:
        """Place each per-element state tensor ``g``'s parameters now have (Note: optimizer state on disk)."""
        offset = 0
        for p in g.params:
            for key, v in sorted(self.optimizer.state.get(p, {}).items()):
                if torch.is_tensor(v) and v.shape == p.shape and p.numel() > 0:
                    g.slots.append(_Slot(p, key, offset, v.dtype))
                    offset = align_up(offset + v.numel() * v.element_size(), ALIGN_SLACK)
        g.nbytes = align_up(offset)
        if g.nbytes:
            g.file_offset = self.file.allocate(g.nbytes)

    def _swap_out(self, g: SubGroup, k: int, buf: torch.Tensor | None = None) -> IOHandle | None:
        """Start writing ``g``'s state back and leave placeholders in the optimizer."""
        if not g.laid_out:
            self._lay_out(g)
            if not g.laid_out:
                return None  # an optimizer without per-element state (SGD without momentum)
        buf = buf if buf is not None else self._buffer(k, g.nbytes)
        for s, view in self._views(g, buf):
            state = self.optimizer.state[s.param]
            current = state[s.key]
            if current.data_ptr() != view.data_ptr():  # first write, or a tensor the state was given anew
                view.copy_(current)
            state[s.key] = self._placeholder(s.dtype)
        return self.file.write(g.file_offset, buf, g.nbytes)

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype)
        return self._placeholders[dtype]

    @contextmanager
    def all_resident(self) -> Iterator[None]:
        """Every sub-group's state as ordinary tensors in ``optimizer.state`` inside the block (for
        checkpoints: saved from, or loaded into, there), written back to disk when it ends."""
        bufs = {}
        for i, g in enumerate(self.subgroups):
            if g.on_tier and g.laid_out:
                bufs[i] = aligned_empty(g.nbytes)
                handle = self._swap_in(g, -1, bufs[i])
                if handle is not None:
                    handle.wait()
                for s, view in self._views(g, bufs[i]):  # own memory: the block may keep or replace them
                    self.optimizer.state[s.param][s.key] = view.clone()
        try:
            yield
        finally:
            for i, g in enumerate(self.subgroups):
                if g.on_tier:
                    if not g.laid_out:
                        self._lay_out(g)
                    if g.laid_out:
                        handle = self._swap_out(g, -1, bufs.get(i) if i in bufs else aligned_empty(g.nbytes))
                        if handle is not None:
                            handle.wait()

    def close(self) -> None:
        self._finalizer()


# per-tensor alignment inside a region: a view of any dtype starts on a cache line
ALIGN_SLACK = 64


def make_optimizer_swapper(cfg: ShardspeedConfig, optimizer: Any, rank: int,
                           device: torch.device) -> OptimizerSwapper | None:
    """The swapper ``zero_optimization.offload_optimizer`` asks for, or None where state stays put."""
    z = cfg.zero_optimization
    off = z.offload_optimizer
    if off is None or off.device == "none" or optimizer is None:
        return None
    if device.type != "cpu":
        raise ConfigError(f"{KEY}.device '{off.device}' is not supported yet with a {device.type} training device: "
                          "offload is implemented for CPU training (the state moves between host memory and disk); "
                          "set \"device\": \"none\"")
    if off.device == "cpu":
        if rank == 0:
            log.info("%s.device 'cpu': training runs on the CPU, so the optimizer state is already in host memory; "
                     "nothing moves", KEY)
        return None
    if hasattr(optimizer, "set_partition"):
        raise ConfigError(f"{KEY}.device 'nvme' steps the optimizer one sub-group at a time; "
                          f"{type(optimizer).__name__} reduces norms over all parameters at once in its step: use an "
                          "element-wise optimizer (Adam, AdamW, SGD, ...) or \"device\": \"none\"")
    if z.optimizer_in_backward:
        raise ConfigError(f"{KEY}.device 'nvme' is not supported yet with zero_optimization.optimizer_in_backward "
                          "(the step would read each unit's state from disk during backward); turn one of them off")
    path = str(check_directory(off.nvme_path or "", f"{KEY}.nvme_path"))
    swapper = OptimizerSwapper(optimizer, path, rank, z.sub_group_size, off.buffer_count, off.ratio, cfg.aio)
    # every rank's files go to the same kind of path; ranks on one machine share its disk, so the
    # check is against the sum (an overestimate across machines, never an under-one)
    states = per_element_states(optimizer)
    mine = swapper.disk_bytes_needed(states)
    total = torch.tensor([mine], dtype=torch.float64)
    all_reduce(total)
    check_free_space(path, int(total.item()), f"{KEY}.nvme_path",
                     f"the optimizer state ({states} fp32 values per element, all ranks; this rank {mine} bytes)")
    return swapper
