"""Stage 3's parameter shards on disk (``offload_param.device: nvme``): a unit's shard of the flat
form (compute dtype) is read into a bounded pool of buffers just ahead of its all-gather, along the
order stage 3 recorded in its first step, and written back when its masters were stepped.

[Note: parameter shards on disk] A unit whose shard is on the tier has a zero-element placeholder as
``Unit.local`` at rest. ``fetch`` starts a read into a free pool buffer (read-ahead, never more than
``buffer_count`` buffers); ``acquire`` returns the shard for an all-gather, reading it now if no
read-ahead did; ``release`` gives the buffer back once that all-gather has completed (gloo reads the
input until then). ``store`` writes a new shard, assembled from the unit's masters right after they
stepped (Stage3Strategy._publish), and a later read of that unit first waits for the write.
The masters of such a unit are a separate fp32 copy even in fp32 training (where otherwise the
shard is the master), so the optimizer never steps a tensor that lives on disk: either they stay in
memory or ``offload_optimizer`` puts them in its own swap file with the optimizer state.
Persistent units (at most ``stage3_param_persistence_threshold`` elements) stay gathered in memory
and keep their shard.

Buffers: ``buffer_count`` buffers of the largest shard, lent for read-ahead only while one stays
free for a demand read. A demand read when none is free reclaims a finished write-back, then a
read-ahead nobody uses yet; only when every buffer feeds an all-gather in flight does the pool grow
(``peak_buffers`` says by how much: stage 3's prefetch window, in units, bounds it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from shardspeed.comm import all_reduce
from shardspeed.config import ConfigError
from shardspeed.zero.swap_io import IOHandle, SwapFile, align_up, aligned_empty, check_directory, check_free_space

KEY = "zero_optimization.offload_param"


class ParamTier:
    def __init__(self, nvme_path: str, rank: int, buffer_count: int, buffer_size: int, dtype: torch.dtype,
                 aio: Any):
        self.units: dict[int, Any] = {}
        self.dtype = dtype
        self.buffer_size = buffer_size
        self.buffer_bytes = 0  # the largest shard, aligned: what one pool buffer holds
        self.buffer_count = max(1, buffer_count)
        self.file = SwapFile(nvme_path, "params", rank, aio)
        self.offset: dict[int, int] = {}
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self.peak_buffers = 0
        self._ahead: OrderedDict[int, tuple[torch.Tensor, IOHandle]] = OrderedDict()  # read-ahead, not used yet
        self._in_use: dict[int, torch.Tensor] = {}  # feeding an all-gather
        self._writes: OrderedDict[int, tuple[torch.Tensor, IOHandle]] = OrderedDict()
        self._placeholder = torch.empty(0, dtype=dtype)

    def add(self, u: Any) -> None:
        """Put ``u``'s shard on disk now (as units are built, so no rank ever holds every shard in
        memory at once) and leave a placeholder as ``u.local``."""
        if u.shard_numel > self.buffer_size:
            raise ConfigError(f"{KEY}.buffer_size {self.buffer_size} is smaller than the largest shard this rank "
                              f"reads at once: {u.shard_numel} elements (the unit holding '{u.names[0]}'); set it "
                              f"to {u.shard_numel} or more")
        nbytes = u.shard_numel * self.dtype.itemsize
        if self._allocated:
            raise RuntimeError("ParamTier.add after the first read: buffers are sized by then")
        self.buffer_bytes = max(self.buffer_bytes, align_up(nbytes))
        self.units[u.index] = u
        self.offset[u.index] = self.file.allocate(nbytes)
        buf = aligned_empty(nbytes)  # the pool is sized once every unit is known
        buf[:nbytes].view(self.dtype).copy_(u.local)
        self.file.write(self.offset[u.index], buf, nbytes).wait()
        u.local = self._placeholder

    # -- buffers ---------------------------------------------------------------------------------
    def _new_buffer(self) -> torch.Tensor:
        self._allocated += 1
        self.peak_buffers = max(self.peak_buffers, self._allocated)
        return aligned_empty(self.buffer_bytes)

    def _take(self, demand: bool) -> torch.Tensor | None:
        if self._free and (demand or len(self._free) > 1):
            return self._free.pop()
        if self._allocated < self.buffer_count and (demand or self._allocated + 1 < self.buffer_count):
            return self._new_buffer()
        if not demand:
            return None
        if self._writes:  # the oldest write-back's buffer
            index, (buf, handle) = self._writes.popitem(last=False)
            handle.wait()
            return buf
        if self._ahead:  # the read-ahead furthest ahead: the last to be needed
            index, (buf, handle) = self._ahead.popitem(last=True)
            handle.wait()
            return buf
        return self._new_buffer()  # every buffer feeds a gather in flight

    def _give(self, buf: torch.Tensor) -> None:
        if self._allocated > self.buffer_count:  # a buffer grown past the pool: let it go
            self._allocated -= 1
            return
        self._free.append(buf)

    def _view(self, buf: torch.Tensor, u: Any) -> torch.Tensor:
        return buf[:u.shard_numel * self.dtype.itemsize].view(self.dtype)

    # -- reads -----------------------------------------------------------------------------------
    def _wait_write(self, index: int) -> None:
        if index in self._writes:
            buf, handle = self._writes.pop(index)
            handle.wait()
            self._give(buf)

    def _read(self, u: Any, buf: torch.Tensor) -> IOHandle:
        self._wait_write(u.index)
        return self.file.read(self.offset[u.index], buf, u.shard_numel * self.dtype.itemsize)

    def fetch(self, u: Any) -> bool:
        """Start reading ``u``'s shard ahead of its gather; False when no buffer is free for it."""
        if u.index not in self.units or u.index in self._ahead or u.index in self._in_use:
            return True
        buf = self._take(demand=False)
        if buf is None:
            return False
        self._ahead[u.index] = (buf, self._read(u, buf))
        return True

    def acquire(self, u: Any) -> torch.Tensor:
        """``u``'s shard in memory, to all-gather from, until ``release(u)``."""
        if u.index in self._in_use:
            return self._view(self._in_use[u.index], u)
        if u.index in self._ahead:
            buf, handle = self._ahead.pop(u.index)
        else:
            buf = self._take(demand=True)
            handle = self._read(u, buf)
        handle.wait()
        self._in_use[u.index] = buf
        return self._view(buf, u)

    def release(self, u: Any) -> None:
        buf = self._in_use.pop(u.index, None)
        if buf is not None:
            self._give(buf)

    # -- writes ----------------------------------------------------------------------------------
    def store(self, u: Any, pieces: list[tuple[int, torch.Tensor]]) -> None:
        """Write ``u``'s new shard: zeros (alignment and padding) with each (offset, values) piece in place."""
        self._wait_write(u.index)
        if u.index in self._ahead:  # a read-ahead of the old values: useless now
            buf, handle = self._ahead.pop(u.index)
            handle.wait()
            self._give(buf)
        buf = self._take(demand=True)
        shard = self._view(buf, u)
        shard.zero_()
        for at, values in pieces:
            shard[at:at + values.numel()].copy_(values)
        self._write(u, buf)

    def _write(self, u: Any, buf: torch.Tensor) -> None:
        self._writes[u.index] = (buf, self.file.write(self.offset[u.index], buf, u.shard_numel * self.dtype.itemsize))

    def _drain_writes(self) -> None:
        while self._writes:
            self._wait_write(next(iter(self._writes)))

    def finish_step(self) -> None:
        """Every write-back of this step on disk, its buffers back in the pool."""
        self._drain_writes()

    # -- sizes -----------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        return self._allocated * self.buffer_bytes

    def disk_bytes(self) -> int:
        return self.file.size

    def close(self) -> None:
        self.file.close()


def make_param_tier(numel: int, dtype: torch.dtype, world: int, opts: Any) -> ParamTier:
    """The tier ``opts`` (ParamOffload) asks for, after checking the directory and that the shards
    of ``numel`` parameter elements cut over ``world`` ranks fit on the disk (every rank's: ranks of
    one machine share it). Units are added as they are built (``ParamTier.add``)."""
    path = str(check_directory(opts.nvme_path, f"{KEY}.nvme_path"))
    mine = align_up(-(-numel // world) * dtype.itemsize)
    total = torch.tensor([mine], dtype=torch.float64)
    all_reduce(total)
    check_free_space(path, int(total.item()), f"{KEY}.nvme_path",
                     f"the parameter shards (all ranks; this rank about {mine} bytes)")
    return ParamTier(path, opts.rank, opts.buffer_count, opts.buffer_size, dtype, opts.aio)
