"""Collectives with observer hooks: every byte the library sends goes through here, so the comm
log and the profiler attach without touching callers.

Observers receive (op, bytes, seconds, group size) when a collective completes; for an async op
"completes" is when its handle is waited on, so the time includes overlap with compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from shardspeed.comm import health
from shardspeed.comm.backend import ProcessGroup, get_world_size

Observer = Callable[[str, int, float, int], None]
_observers: list[Observer] = []

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT}

# torch 2.13 renames the *_tensor collectives; prefer the new names where this torch has them.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def add_observer(fn: Observer) -> None:
    _observers.append(fn)


def remove_observer(fn: Observer) -> None:
    if fn in _observers:
        _observers.remove(fn)


class Handle:
    """An in-flight collective; ``wait()`` blocks until it is done and reports it to observers."""

    def __init__(self, op: str, nbytes: int, size: int, work: Any | None, start: float, group: Any = None):
        self.op, self.nbytes, self.size, self._work, self._start = op, nbytes, size, work, start
        self.group = group
        self.done = work is None

    def wait(self) -> None:
        if self.done:
            return
        try:
            self._work.wait()
        except RuntimeError as e:
            if health.is_comm_failure(e):
                raise health.explain(self.op, self.nbytes, self.group, e) from e
            raise
        self.done = True
        _notify(self.op, self.nbytes, time.perf_counter() - self._start, self.size)


def _notify(op: str, nbytes: int, seconds: float, size: int) -> None:
    for fn in _observers:
        fn(op, nbytes, seconds, size)


def _run(op: str, nbytes: int, group: ProcessGroup | None, async_op: bool,
         launch: Callable[[], Any]) -> Handle:
    size = get_world_size(group)
    start = time.perf_counter()
    if size == 1:  # nothing to exchange (see backend.py, [Note: single process])
        return Handle(op, nbytes, size, None, start)
    health.count_issued()
    try:
        work = launch()
    except RuntimeError as e:
        if health.is_comm_failure(e):
            raise health.explain(op, nbytes, group, e) from e
        raise
    handle = Handle(op, nbytes, size, work if async_op else None, start, group)
    if not async_op:
        _notify(op, nbytes, time.perf_counter() - start, size)
    return handle


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup | None = None,
               async_op: bool = False) -> Handle:
    nbytes = tensor.numel() * tensor.element_size()
    return _run("all_reduce", nbytes, group, async_op,
                lambda: dist.all_reduce(tensor, op=_OPS[op], group=group, async_op=async_op))


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup | None = None,
                   async_op: bool = False) -> Handle:
    """Sum ``input`` (world_size equal chunks) across ranks; rank r receives chunk r in ``output``."""
    if get_world_size(group) == 1 and output.data_ptr() != input.data_ptr():
        output.copy_(input)
    nbytes = input.numel() * input.element_size()
    return _run("reduce_scatter", nbytes, group, async_op,
                lambda: _reduce_scatter_flat(output, input, group=group, async_op=async_op))


def all_gather(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup | None = None,
               async_op: bool = False) -> Handle:
    """Concatenate every rank's ``input`` into ``output`` in rank order."""
    if get_world_size(group) == 1 and output.data_ptr() != input.data_ptr():
        output.copy_(input)
    nbytes = output.numel() * output.element_size()
    return _run("all_gather", nbytes, group, async_op,
                lambda: _all_gather_flat(output, input, group=group, async_op=async_op))


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroup | None = None,
              async_op: bool = False) -> Handle:
    """``src`` is a global rank, as in torch.distributed."""
    nbytes = tensor.numel() * tensor.element_size()
    return _run("broadcast", nbytes, group, async_op,
                lambda: dist.broadcast(tensor, src=src, group=group, async_op=async_op))


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup | None = None) -> Any:
    if get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    size = get_world_size(group)
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out
