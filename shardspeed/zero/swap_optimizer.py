"""Optimizer state on disk: the optimizer steps sub-group by sub-group, each sub-group's state read
from the swap file just before its step and written back just after, reads and writes overlapping
the steps of other sub-groups. One swapper serves every ZeRO stage: it only sees the tensors the
optimizer updates (a stage's fp32 masters), never the stage's buckets or units.

[Note: optimizer state on disk] The swapper moves tensors *under* an unchanged optimizer:
- A sub-group is a run of the optimizer's parameters of at most ``sub_group_size`` elements (a
  larger parameter is a sub-group of its own), cut by the strategy (``Strategy.step_subgroups``:
  stages 1-2 in param-group order, stage 3 whole units, so a unit's masters publish together). Each parameter's
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
- Masters that are copies of the compute parameters (bf16/fp16 training; ``Strategy.master_copies``)
  are one more slot of the region: between steps the optimizer holds a one-element placeholder
  broadcast to the master's shape, and right after its sub-group steps each master is published
  into the compute parameters (``Strategy.publish_masters_of``), so ``after_step`` never reads a
  master. In fp32 training the masters are the compute parameters' own storage (stages 1-2) or the
  shard stage 3 gathers from, and stay where they are, except under ``offload_param`` (the shard is
  on disk, so stage 3 keeps the master as a copy: swap_params.py).

[Note: the ring] Sub-group i is read into ring buffer i mod R (R = ``buffer_count``, at least 2): the
reads of the next R - 1 sub-groups are in flight while sub-group i steps, and the write-back of i
goes on while i + 1 steps; the read into a buffer first waits for the write-back of the sub-group
that held it. Memory: R buffers of the largest region, besides the parameters and gradients.
The first R - 1 reads start at the beginning of the boundary micro-batch's backward (``prefetch``),
so they go on while backward computes; the write-backs of the last sub-groups are left in flight
when ``step()`` returns and go on while the next forward computes. Whatever reads or reuses a buffer
waits for the write-back it holds first (``_wait_write``), and ``all_resident`` (checkpoints), the
optimizer in backward and ``close`` settle everything in flight before they start.
With stage 3's optimizer in backward (``step_masters``) each unit is a sub-group stepped when its
gradients are reduced: the next unit's read starts as one steps, write-backs go on through the rest
of backward, and the engine drains them (``drain``) before the step ends.
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


MASTER = ""  # the slot key of the master itself (state keys are the optimizer's names)


@dataclass
class _Slot:
    param: torch.Tensor
    key: str  # a state key, or MASTER
    offset: int  # bytes from the start of the region
    dtype: torch.dtype


@dataclass
class SubGroup:
    params: list[torch.Tensor]
    numel: int
    on_tier: bool  # False: beyond offload_optimizer.ratio, its state stays in memory
    slots: list[_Slot] = field(default_factory=list)
    nbytes: int = 0  # region size; 0 until something of it was written
    file_offset: int = -1
    capacity: int = 0  # bytes reserved at file_offset: a later layout that fits stays there

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
    """Steps ``optimizer`` with its per-element state (and, where they are copies, its masters) on a
    ``SwapFile`` (Note: optimizer state on disk). ``strategy``: the ZeRO strategy whose masters the
    optimizer holds; it orders them into sub-groups and publishes stepped masters."""

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: Any, nvme_path: str, rank: int,
                 sub_group_size: int, buffer_count: int, ratio: float, aio: Any):
        self.optimizer = optimizer
        self.strategy = strategy
        self.file = SwapFile(nvme_path, "optimizer", rank, aio)
        self._finalizer = weakref.finalize(self, self.file.close)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.subgroups = self._split(strategy.step_subgroups(params, sub_group_size), ratio)
        self.ring_size = max(2, buffer_count)
        self._ring: list[torch.Tensor | None] = [None] * self.ring_size
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.masters_on_tier = strategy.master_copies()
        self._index = {id(p): i for i, g in enumerate(self.subgroups) for p in g.params}
        # optimizer in backward: sub-groups step one at a time as their units' gradients are reduced
        self._turn = 0  # the ring buffer the next one reads into
        self._ahead: tuple[int, int, IOHandle | None] | None = None  # (sub-group, buffer, read) read ahead
        self._writes: dict[int, IOHandle | None] = {}  # buffer -> its write-back in flight
        # step(): reads started during backward (prefetch), by index among the streamed sub-groups,
        # each into ring buffer index % R (its views already placed in the optimizer)
        self._early: dict[int, IOHandle | None] = {}

    def take_masters(self, states_per_element: int) -> None:
        """Masters that are copies of the compute parameters go to disk now (after the disk check);
        from here on the strategy leaves publishing them to the step (Note: optimizer state on disk)."""
        if not self.masters_on_tier:
            return
        self.strategy.master_tier = self
        for g in self.subgroups:
            if g.on_tier:
                per = 1 + states_per_element  # the master and the state to come, fp32 each
                handle = self._swap_out(g, -1, reserve=4 * g.numel * per + ALIGN_SLACK * len(g.params) * per)
                if handle is not None:
                    handle.wait()
        self.strategy.drop_master_storage([p for g in self.subgroups if g.on_tier for p in g.params])

    @staticmethod
    def _split(groups: list[list[torch.Tensor]], ratio: float) -> list[SubGroup]:
        out = [SubGroup(g, sum(p.numel() for p in g), True) for g in groups]
        total = sum(g.numel for g in out)
        # ratio: the first sub-groups, in step order, holding up to that fraction of the elements
        budget, seen = ratio * total, 0
        for i, g in enumerate(out):
            seen += g.numel
            g.on_tier = seen <= budget + 0.5 or i == 0
        return out

    # -- sizes, for checks and the planner -------------------------------------------------------
    def offloaded_numel(self) -> int:
        return sum(g.numel for g in self.subgroups if g.on_tier)

    def disk_bytes_needed(self, states_per_element: int) -> int:
        """Swap-file bytes for ``states_per_element`` fp32 tensors per offloaded element, plus the
        masters where they are copies (with alignment)."""
        per = states_per_element + (1 if self.strategy.master_copies() else 0)
        return sum(align_up(4 * g.numel * per + ALIGN_SLACK * len(g.params) * per)
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
        if self.masters_on_tier:
            self.strategy.publish_masters_of(g.params)

    def prefetch(self) -> None:
        """Start the first sub-groups' reads (R - 1 of them) now, at the beginning of the boundary
        backward, so they overlap its compute instead of opening the step (Note: the ring). Again
        before a step that consumed them (an fp16 overflow skipped it), it does nothing."""
        if self._early:
            return
        streamed = [g for g in self.subgroups if g.on_tier]
        for j in range(min(len(streamed), self.ring_size - 1)):
            self._wait_write(j)
            self._early[j] = self._swap_in(streamed[j], j)

    def _wait_write(self, k: int) -> None:
        """Ring buffer ``k``'s write-back must be on disk before the buffer is read over."""
        handle = self._writes.pop(k, None)
        if handle is not None:
            handle.wait()

    def _settle(self) -> None:
        """Nothing in flight: reads started ahead are waited for and their views taken back out of
        the optimizer (the state on disk is what counts), write-backs finished."""
        streamed = [g for g in self.subgroups if g.on_tier]
        early, self._early = self._early, {}
        for j, handle in early.items():
            if handle is not None:
                handle.wait()
            for s in streamed[j].slots:
                self._place(s, self._placeholder(s))
        for k in list(self._writes):
            self._wait_write(k)

    def _step_streamed(self, groups: list[SubGroup], grads: dict[int, torch.Tensor | None]) -> None:
        ring = self.ring_size
        reads: dict[int, IOHandle | None] = {}

        def launch_read(j: int) -> None:
            if j in self._early:  # started by prefetch() during backward
                reads[j] = self._early.pop(j)
                return
            self._wait_write(j % ring)  # the buffer's previous sub-group must be on disk first
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
                self._writes[i % ring] = self._swap_out(g, i % ring)
                if issued < len(groups):
                    launch_read(issued)
                    issued += 1
        finally:
            for h in reads.values():  # write-backs stay in flight into the next forward (Note: the ring)
                if h is not None:
                    h.wait()

    # -- moving one sub-group -------------------------------------------------------------------
    def _buffer(self, k: int, nbytes: int) -> torch.Tensor:
        if k < 0:
            return aligned_empty(nbytes)
        buf = self._ring[k]
        if buf is None or buf.numel() < nbytes:
            buf = self._ring[k] = aligned_empty(nbytes)
        return buf

    def _views(self, g: SubGroup, buf: torch.Tensor) -> Iterator[tuple[_Slot, torch.Tensor]]:
        for s in g.slots:
            n = s.param.numel() * s.dtype.itemsize
            yield s, buf[s.offset:s.offset + n].view(s.dtype).view(s.param.shape)

    def _place(self, s: _Slot, t: torch.Tensor) -> None:
        """Make ``t`` what the optimizer sees for slot ``s``."""
        if s.key == MASTER:
            s.param.data = t
        else:
            self.optimizer.state[s.param][s.key] = t

    def _current(self, s: _Slot) -> torch.Tensor:
        return s.param.data if s.key == MASTER else self.optimizer.state[s.param][s.key]

    def _swap_in(self, g: SubGroup, k: int, buf: torch.Tensor | None = None) -> IOHandle | None:
        """Start reading ``g``'s region into ring buffer ``k`` (or ``buf``); the optimizer sees the
        views at once, and the data once the returned handle was waited for."""
        if not g.laid_out:
            return None  # nothing written yet: the optimizer creates the state at this step
        buf = buf if buf is not None else self._buffer(k, g.nbytes)
        for s, view in self._views(g, buf):
            self._place(s, view)
        return self.file.read(g.file_offset, buf, g.nbytes)

    def _wanted_slots(self, g: SubGroup) -> list[tuple[torch.Tensor, str, torch.dtype]]:
        out = []
        for p in g.params:
            if p.numel() == 0:
                continue
            if self.masters_on_tier:
                out.append((p, MASTER, p.dtype))
            for key, v in sorted(self.optimizer.state.get(p, {}).items()):
                if torch.is_tensor(v) and v.shape == p.shape:
                    out.append((p, key, v.dtype))
        return out

    def _lay_out(self, g: SubGroup, wanted: list[tuple[torch.Tensor, str, torch.dtype]], reserve: int = 0) -> None:
        """Place ``wanted`` in ``g``'s region: the first write, or the optimizer created state since.
        The masters' first region reserves room for the state the optimizer is expected to create
        (``reserve``), so the layout with state usually stays in place; one that does not fit
        moves to a new region and leaves the old one unused."""
        g.slots, offset = [], 0
        for p, key, dtype in wanted:
            g.slots.append(_Slot(p, key, offset, dtype))
            offset = align_up(offset + p.numel() * dtype.itemsize, ALIGN_SLACK)
        g.nbytes = align_up(offset)
        if not g.nbytes or (g.laid_out and g.nbytes <= g.capacity):
            return
        g.capacity = max(g.nbytes, align_up(reserve))
        g.file_offset = self.file.allocate(g.capacity)

    def _swap_out(self, g: SubGroup, k: int, buf: torch.Tensor | None = None, reserve: int = 0) -> IOHandle | None:
        """Start writing ``g``'s region back; placeholders stay in the optimizer."""
        wanted = self._wanted_slots(g)
        if [(s.param, s.key) for s in g.slots] != [(p, key) for p, key, _ in wanted]:
            self._lay_out(g, wanted, reserve)
            buf = aligned_empty(g.nbytes) if g.nbytes else None  # fresh: the old views may still be read
            if buf is not None and k >= 0:
                self._ring[k] = buf
        if not g.laid_out:
            return None  # an optimizer without per-element state (SGD without momentum), masters in memory
        buf = buf if buf is not None else self._buffer(k, g.nbytes)
        for s, view in self._views(g, buf):
            current = self._current(s)
            if current.data_ptr() != view.data_ptr():  # first write, or a tensor given anew (a load)
                view.copy_(current)
            self._place(s, self._placeholder(s))
        return self.file.write(g.file_offset, buf, g.nbytes)

    def _placeholder(self, s: _Slot) -> torch.Tensor:
        """What stays in memory for an offloaded slot: an empty tensor for state; for a master, one
        element broadcast to its shape, so code that assigns the master's ``.grad`` (whose shape
        torch checks against the tensor's) keeps working while the values are on disk."""
        if s.dtype not in self._placeholders:
            self._placeholders[s.dtype] = torch.zeros((), dtype=s.dtype)  # shared by every slot of the dtype
        one = self._placeholders[s.dtype]
        return one.expand(s.param.shape) if s.key == MASTER else one.new_empty(0)

    @contextmanager
    def all_resident(self) -> Iterator[None]:
        """Every sub-group's state and masters as ordinary tensors inside the block (checkpoints save
        them from there, or load into them), written back to disk, masters published, when it ends."""
        self._settle()
        for g in self.subgroups:
            if g.on_tier and g.laid_out:
                buf = aligned_empty(g.nbytes)
                handle = self._swap_in(g, -1, buf)
                if handle is not None:
                    handle.wait()
                for s, view in self._views(g, buf):  # own memory: the block may keep or replace them
                    self._place(s, view.clone())
        try:
            yield
        finally:
            for g in self.subgroups:
                if g.on_tier:
                    if self.masters_on_tier:
                        self.strategy.publish_masters_of(g.params)
                    handle = self._swap_out(g, -1)
                    if handle is not None:
                        handle.wait()

    # -- one sub-group at a time (optimizer in backward) ------------------------------------------
    @torch.no_grad()
    def step_masters(self, masters: list[torch.Tensor]) -> None:
        """Step the sub-group holding ``masters`` (one stage-3 unit: the swapper was built with one
        unit per sub-group), whose gradients are attached and no others' are: its read was started
        ahead if it followed the previous one, the write-back goes on during the rest of backward,
        and the next sub-group's read starts now."""
        i = next(self._index[id(m)] for m in masters if id(m) in self._index)
        g = self.subgroups[i]
        if not g.on_tier:
            self.optimizer.step()
            if self.masters_on_tier:
                self.strategy.publish_masters_of(g.params)
            return
        k, handle = self._read_for(i)
        if handle is not None:
            handle.wait()
        self.optimizer.step()
        if self.masters_on_tier:
            self.strategy.publish_masters_of(g.params)
        self._writes[k] = self._swap_out(g, k)
        nxt = i + 1
        if nxt < len(self.subgroups) and self.subgroups[nxt].on_tier:
            k2 = self._next_buffer()
            self._ahead = (nxt, k2, self._swap_in(self.subgroups[nxt], k2))

    def _next_buffer(self) -> int:
        k = self._turn
        self._turn = (self._turn + 1) % self.ring_size
        write = self._writes.pop(k, None)
        if write is not None:  # the buffer's last sub-group must be on disk before it is read over
            write.wait()
        return k

    def _read_for(self, i: int) -> tuple[int, IOHandle | None]:
        if self._ahead is not None:
            j, k, handle = self._ahead
            self._ahead = None
            if j == i:
                return k, handle
            if handle is not None:  # read ahead for nothing: its views must not stay in the optimizer
                handle.wait()
            for s in self.subgroups[j].slots:
                self._place(s, self._placeholder(s))
        k = self._next_buffer()
        return k, self._swap_in(self.subgroups[i], k)

    def drain(self) -> None:
        """Finish what ``step_masters`` left in flight (at the end of backward's steps)."""
        if self._ahead is not None:
            j, _, handle = self._ahead
            self._ahead = None
            if handle is not None:
                handle.wait()
            for s in self.subgroups[j].slots:
                self._place(s, self._placeholder(s))
        for k in list(self._writes):
            write = self._writes.pop(k)
            if write is not None:
                write.wait()

    def close(self) -> None:
        self._settle()
        self._finalizer()


# per-tensor alignment inside a region: a view of any dtype starts on a cache line
ALIGN_SLACK = 64


def make_optimizer_swapper(cfg: ShardspeedConfig, optimizer: Any, strategy: Any, rank: int,
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
    path = str(check_directory(off.nvme_path or "", f"{KEY}.nvme_path"))
    # with the optimizer in backward each unit steps when its gradients are reduced: one unit per sub-group
    size = 0 if z.optimizer_in_backward else z.sub_group_size
    swapper = OptimizerSwapper(optimizer, strategy, path, rank, size, off.buffer_count, off.ratio, cfg.aio)
    if z.optimizer_in_backward:
        strategy.unit_stepper = swapper.step_masters
    # every rank's files go to the same kind of path; ranks on one machine share its disk, so the
    # check is against the sum (an overestimate across machines, never an under-one)
    states = per_element_states(optimizer)
    mine = swapper.disk_bytes_needed(states)  # before any state exists: the first step creates it
    total = torch.tensor([mine], dtype=torch.float64)
    all_reduce(total)
    check_free_space(path, int(total.item()), f"{KEY}.nvme_path",
                     f"the optimizer state ({states} fp32 values per element, all ranks; this rank {mine} bytes)")
    swapper.take_masters(states)
    return swapper
