"""What a pipeline stage holds between a micro-batch's forward and its backward, counted per batch.

[Note: what counts as held]
A micro-batch is *held* on a stage from the end of its forward until its backward has run: its
autograd graph keeps the tensors the stage's ops saved for backward, and the engine keeps its
received input and its output. Bytes are the storages autograd saved during that forward (through
``saved_tensors_hooks``, so exactly what backward will read), each storage once per micro-batch,
leaving out the stage's parameters (held anyway, whatever the schedule). With activation
checkpointing the recomputed regions save only their inputs, and the count shows it.
The peak is taken after every forward, where the number held only grows: 1F1B keeps it at
p - s on stage s, GPipe at m (the schedules' ``max_in_flight``), which the tests check.

[Note: bytes on request] Micro-batches are counted always (the engine knows when each forward and
backward runs). Bytes need a Python hook on every tensor autograd saves and on every read of it in
backward: at P = 2 with the benchmark's GPT, stage 0's forward + backward took 30 ms (2.4 %) a step
longer with them (1.008-1.03x torch's 1F1B with them, 0.996x without), so they are counted only when
the config asks
(``"pipeline": {"activation_stats": true}``); ``peak_bytes`` is None otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class ActivationLedger:
    """Per ``train_batch``: micro-batches held awaiting backward and the bytes saved for them."""

    def __init__(self, count_bytes: bool = False) -> None:
        self.count_bytes = count_bytes  # Note: bytes on request
        self._held: dict[int, int] = {}  # micro-batch -> bytes saved for its backward
        self._skip: set[int] = set()
        self.peak_micro_batches = 0
        self.peak_bytes: int | None = 0 if count_bytes else None

    def start_batch(self, params: Iterator[torch.nn.Parameter]) -> None:
        assert not self._held, "micro-batches held across batches"
        self.peak_micro_batches = 0
        if not self.count_bytes:
            return
        # parameters' storages are read at every step (their .data may move between batches: look again)
        self._skip = {p.untyped_storage().data_ptr() for p in params}
        self.peak_bytes = 0

    @contextlib.contextmanager
    def forward(self, mb: int) -> Iterator[None]:
        """Around micro-batch ``mb``'s forward: record what autograd saves for its backward."""
        if not self.count_bytes:
            yield
            self._held[mb] = 0
            self.peak_micro_batches = max(self.peak_micro_batches, len(self._held))
            return
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._skip and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _same):
            yield
        self._held[mb] = total
        self.peak_micro_batches = max(self.peak_micro_batches, len(self._held))
        self.peak_bytes = max(self.peak_bytes or 0, sum(self._held.values()))

    def backward_done(self, mb: int) -> None:
        self._held.pop(mb, None)


def _same(t: Any) -> Any:
    return t
