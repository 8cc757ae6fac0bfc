"""The disk tier: large aligned reads and writes of host tensors to one file per rank, served by a
thread pool. No compiled op (DeepSpeed's NVMe path needs a JIT-built libaio extension).

[Note: the swap file] Each rank opens one file under ``nvme_path``
(``shardspeed-swap-<pid>-rank<r>/<name>.swp``) and unlinks it (and its directory) at once: the open
descriptor keeps the data, and the kernel frees the blocks when the process exits, however it exits
(a normal end, an exception, the OOM killer), so no run leaves swap files behind. Regions are
appended at ``ALIGN``-byte offsets and never move; a transfer covers whole ``ALIGN``-byte blocks from
an ``ALIGN``-aligned host buffer (``aligned_empty``), which is what ``O_DIRECT`` demands. Whether the
filesystem takes ``O_DIRECT`` is probed once per directory (tmpfs and some overlay filesystems
refuse it): with it, transfers bypass the page cache, so reads cost disk time and the cache does
not fill memory; without it, they go through the page cache.

A transfer is cut into requests of ``aio.block_size * aio.queue_depth`` bytes, each one
``pread``/``pwrite`` call (which releases the GIL) on one of ``aio.intra_op_parallelism`` threads.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from shardspeed.config import ConfigError
from shardspeed.config.schema import AioConfig

ALIGN = 4096  # bytes: the largest logical block size O_DIRECT asks for on common disks

_direct_ok: dict[str, bool] = {}
_probe_lock = threading.Lock()


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_empty(nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """An uninitialised uint8 host tensor of ``nbytes`` (rounded up to ``align``) whose first byte
    sits on an ``align``-byte boundary (torch's allocator only promises 64)."""
    nbytes = align_up(max(nbytes, 1), align)
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % align
    return raw[skip:skip + nbytes]


def _buffer(t: torch.Tensor, start: int, length: int) -> ctypes.Array:
    """A writable buffer object over bytes [start, start + length) of the contiguous host tensor ``t``."""
    return (ctypes.c_char * length).from_address(t.data_ptr() + start)


def check_directory(path: str, key: str) -> Path:
    """``path`` exists, is a directory and takes new files; else a ConfigError naming ``key``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key} '{path}' does not exist: create the directory (on a local disk with room for "
                          "the offloaded state) or point the key at one that exists")
    if not p.is_dir():
        raise ConfigError(f"{key} '{path}' is not a directory: point it at a directory on a local disk")
    probe = p / f".shardspeed-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key} '{path}' is not writable by this process ({e.strerror}): choose a directory "
                          "this user may create files in") from None
    return p


def check_free_space(path: str, need: int, key: str, who: str) -> None:
    """Refuse to start when the filesystem of ``path`` has less than ``need`` bytes free."""
    free = shutil.disk_usage(path).free
    if need > free:
        raise ConfigError(f"{key} '{path}' has {free} bytes free ({free / 2**30:.2f} GiB) but {who} needs "
                          f"{need} bytes ({need / 2**30:.2f} GiB): free space there, point {key} at a larger "
                          "disk, or spread the state over more ranks")


def direct_io_works(directory: Path) -> bool:
    """Whether files in ``directory`` accept O_DIRECT reads and writes (probed once per directory)."""
    key = str(directory.resolve())
    with _probe_lock:
        if key in _direct_ok:
            return _direct_ok[key]
        ok = False
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            path = directory / f".shardspeed-direct-probe-{os.getpid()}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flag, 0o600)
                try:
                    buf = aligned_empty(ALIGN)
                    buf.fill_(7)
                    ok = (os.pwrite(fd, _buffer(buf, 0, ALIGN), 0) == ALIGN
                          and os.preadv(fd, [_buffer(buf, 0, ALIGN)], 0) == ALIGN)
                finally:
                    os.close(fd)
            except OSError:
                ok = False
            finally:
                path.unlink(missing_ok=True)
        _direct_ok[key] = ok
        return ok


class IOHandle:
    """The requests of one transfer; ``wait()`` blocks until all are done and re-raises a failure."""

    def __init__(self, futures: list[Future]):
        self._futures = futures

    def wait(self) -> None:
        for f in self._futures:
            f.result()
        self._futures = []

    def done(self) -> bool:
        return all(f.done() for f in self._futures)


class SwapFile:
    """One rank's swap file (Note: the swap file): ``allocate`` a region, then ``write``/``read``
    whole regions asynchronously from/to aligned host tensors."""

    def __init__(self, directory: str, name: str, rank: int, aio: AioConfig):
        root = Path(directory)
        self.direct = direct_io_works(root)
        folder = root / f"shardspeed-swap-{os.getpid()}-rank{rank}"
        folder.mkdir(exist_ok=True)
        self.path = folder / f"{name}.swp"
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)
        self.fd = os.open(self.path, flags, 0o600)
        self.path.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass  # another swap file of this rank is still being created in it
        self.request_bytes = aio.block_size * aio.queue_depth
        self._pool = ThreadPoolExecutor(max_workers=aio.intra_op_parallelism, thread_name_prefix="shardspeed-swap")
        self.size = 0  # bytes allocated (the file grows as regions are first written)
        self.bytes_read = 0
        self.bytes_written = 0
        self._closed = False

    def allocate(self, nbytes: int) -> int:
        """A new region of ``nbytes`` (rounded up to ALIGN); returns its offset in the file."""
        offset = self.size
        self.size += align_up(nbytes)
        return offset

    def _requests(self, offset: int, buf: torch.Tensor, nbytes: int, write: bool) -> IOHandle:
        if self._closed:
            raise RuntimeError(f"swap file {self.path} is closed")
        if buf.dtype != torch.uint8 or not buf.is_contiguous() or buf.device.type != "cpu":
            raise ValueError("swap transfers take contiguous uint8 host tensors (aligned_empty)")
        nbytes = align_up(nbytes)
        if nbytes > buf.numel():
            raise ValueError(f"transfer of {nbytes} bytes from a buffer of {buf.numel()}")
        if self.direct and (buf.data_ptr() % ALIGN or offset % ALIGN):
            raise ValueError("direct I/O needs ALIGN-aligned buffers and offsets (use aligned_empty)")
        futures = []
        for start in range(0, nbytes, self.request_bytes):
            length = min(self.request_bytes, nbytes - start)
            futures.append(self._pool.submit(self._one, offset + start, buf, start, length, write))
        if write:
            self.bytes_written += nbytes
        else:
            self.bytes_read += nbytes
        return IOHandle(futures)

    def _one(self, pos: int, buf: torch.Tensor, start: int, length: int, write: bool) -> None:
        done = 0
        while done < length:  # a short transfer (a signal, a full pipe of the kernel) continues where it stopped
            view = _buffer(buf, start + done, length - done)
            n = os.pwrite(self.fd, view, pos + done) if write else os.preadv(self.fd, [view], pos + done)
            if n <= 0:
                raise OSError(f"{'write to' if write else 'read from'} swap file {self.path} at byte {pos + done} "
                              f"moved {n} bytes (disk full or file truncated?)")
            done += n

    def write(self, offset: int, buf: torch.Tensor, nbytes: int) -> IOHandle:
        """Write the first ``nbytes`` of ``buf`` (rounded up to ALIGN) at ``offset``."""
        return self._requests(offset, buf, nbytes, write=True)

    def read(self, offset: int, buf: torch.Tensor, nbytes: int) -> IOHandle:
        """Read ``nbytes`` (rounded up to ALIGN) at ``offset`` into the start of ``buf``."""
        return self._requests(offset, buf, nbytes, write=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self.fd)
