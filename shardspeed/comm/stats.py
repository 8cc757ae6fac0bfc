"""Counts calls, bytes and time per collective (the comm log): an observer on collectives.py."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

from shardspeed.comm import collectives

#: the ops sparse traffic is logged under: a sparse gradient reduction (collectives.all_gather_sizes /
#: all_gather_slices) and, at ZeRO 1/2, the rows a lazy update changed (collectives.all_reduce_rows)
SPARSE_OPS = ("sparse_sizes", "sparse_all_gather", "sparse_param_rows")


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    verbose: bool = False
    ops: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, op: str, nbytes: int, seconds: float, size: int) -> None:
        with self._lock:
            s = self.ops[op]
            s.calls += 1
            s.bytes += nbytes
            s.seconds += seconds
        if self.verbose:
            print(f"comm: {op} {nbytes / 2**20:.2f} MiB in {seconds * 1e3:.2f} ms over {size} ranks")

    def reset(self) -> None:
        with self._lock:
            self.ops.clear()

    def bytes_of(self, *ops: str) -> int:
        """Bytes counted so far for the named ops (the comm log's ``bytes`` column, summed)."""
        with self._lock:
            return sum(self.ops[op].bytes for op in ops if op in self.ops)

    def sparse_bytes(self) -> int:
        """Bytes of sparse (index-slice) traffic: size exchanges and padded all-gathers of row
        indices and values (zero/sparse.py), and the changed parameter rows at ZeRO 1/2."""
        return self.bytes_of(*SPARSE_OPS)

    def summary(self) -> str:
        rows = [f"{'op':<16}{'calls':>8}{'MiB':>12}{'seconds':>10}"]
        for op, s in sorted(self.ops.items()):
            rows.append(f"{op:<16}{s.calls:>8}{s.bytes / 2**20:>12.2f}{s.seconds:>10.3f}")
        return "\n".join(rows)


_global: CommStats | None = None


def enable_comm_log(verbose: bool = False) -> CommStats:
    """Start (or return) the process-wide comm log."""
    global _global
    if _global is None:
        _global = CommStats(verbose=verbose)
        collectives.add_observer(_global)
    return _global


def log_summary() -> str:
    """The comm log's table (empty when it was never enabled), printed and returned."""
    text = _global.summary() if _global is not None else "comm log is not enabled (comms_logger.enabled)"
    print(text)
    return text
