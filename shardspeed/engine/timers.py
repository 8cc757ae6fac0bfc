"""Wall-clock timers for the forward / backward / step breakdown."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Timers:
    def __init__(self, enabled: bool, synchronize: Callable[[], None] = lambda: None):
        self.enabled = enabled
        self.synchronize = synchronize
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.totals[name] += time.perf_counter() - start
            self.counts[name] += 1

    def summary_ms(self, reset: bool = True) -> dict[str, float]:
        """Mean milliseconds per call since the last reset."""
        out = {k: 1e3 * self.totals[k] / max(self.counts[k], 1) for k in self.totals}
        if reset:
            self.totals.clear()
            self.counts.clear()
        return out
