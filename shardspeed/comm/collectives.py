"""Collectives with observer hooks: every byte the library sends goes through here, so the comm
log and the profiler attach without touching callers.

Observers receive (op, bytes, seconds, group size) when a collective completes; for an async op
"completes" is when its handle is waited on, so the time includes overlap with compute.

[Note: flat collectives on gloo]
gloo has no native reduce-scatter or all-gather into one tensor: torch runs them through a
full-size temporary (measured, 2 ranks, 25 MB fp32: reduce_scatter_tensor +25.8 MB resident and
51 ms, all_gather_into_tensor +23.8 MB and 27 ms), while an in-place all_reduce adds 2 MB in 30 ms
and one in-place broadcast per rank adds nothing in 14 ms. ZeRO's memory bound counts every buffer
in flight, so on gloo:
- ``reduce_scatter(..., scratch=True)`` (the caller owns ``input`` and needs nothing of it
  afterwards but this rank's chunk) all-reduces ``input`` in place and copies this rank's chunk
  into ``output`` when the handle is waited on (nothing to copy when ``output`` is that chunk);
- ``all_gather`` broadcasts each rank's chunk in place into its slice of ``output``.
Same results and bytes on the wire as the flat collectives; NCCL keeps the flat ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from shardspeed.comm import health
from shardspeed.comm.backend import ProcessGroup, get_world_size
from shardspeed.comm.backend import get_rank as get_rank_in

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
    """An in-flight collective; ``wait()`` blocks until it is done and reports it to observers.
    ``work`` is one torch Work or a list of them (a collective made of several); ``then`` runs once
    they are all done (the copy that finishes a collective built from others)."""

    def __init__(self, op: str, nbytes: int, size: int, work: Any | None, start: float, group: Any = None,
                 then: Callable[[], None] | None = None):
        self.op, self.nbytes, self.size, self._start = op, nbytes, size, start
        self._works = [] if work is None else list(work) if isinstance(work, list) else [work]
        self.group, self._then = group, then
        self.done = not self._works
        if self.done and then is not None:
            then()

    def wait(self) -> None:
        if self.done:
            return
        try:
            for w in self._works:
                w.wait()
        except RuntimeError as e:
            if health.is_comm_failure(e):
                raise health.explain(self.op, self.nbytes, self.group, e) from e
            raise
        self.done = True
        if self._then is not None:
            self._then()
        _notify(self.op, self.nbytes, time.perf_counter() - self._start, self.size)


def _notify(op: str, nbytes: int, seconds: float, size: int) -> None:
    for fn in _observers:
        fn(op, nbytes, seconds, size)


def report(op: str, nbytes: int, seconds: float, size: int) -> None:
    """Tell the observers about communication the comm layer ran without a Handle (p2p.py)."""
    _notify(op, nbytes, seconds, size)


def _run(op: str, nbytes: int, group: ProcessGroup | None, async_op: bool,
         launch: Callable[[], Any], then: Callable[[], None] | None = None) -> Handle:
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
    if async_op:
        return Handle(op, nbytes, size, work, start, group, then)
    if then is not None:
        then()
    _notify(op, nbytes, time.perf_counter() - start, size)
    return Handle(op, nbytes, size, None, start, group)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup | None = None,
               async_op: bool = False) -> Handle:
    nbytes = tensor.numel() * tensor.element_size()
    return _run("all_reduce", nbytes, group, async_op,
                lambda: dist.all_reduce(tensor, op=_OPS[op], group=group, async_op=async_op))


def _on_gloo(group: ProcessGroup | None, t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and dist.get_backend(group) == "gloo"


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup | None = None,
                   async_op: bool = False, scratch: bool = False) -> Handle:
    """Sum ``input`` (world_size equal chunks) across ranks; rank r receives chunk r in ``output``.
    ``scratch``: the caller needs nothing of ``input`` afterwards but chunk r, which lets gloo reduce
    in place (Note: flat collectives on gloo); ``input`` then holds sums."""
    size = get_world_size(group)
    if size == 1 and output.data_ptr() != input.data_ptr():
        output.copy_(input)
    nbytes = input.numel() * input.element_size()
    if scratch and size > 1 and _on_gloo(group, input) and output.dtype == input.dtype:
        mine = input.view(size, -1)[get_rank_in(group)]
        then = None if mine.data_ptr() == output.data_ptr() else (lambda: output.view(-1).copy_(mine))
        return _run("reduce_scatter", nbytes, group, async_op,
                    lambda: dist.all_reduce(input, group=group, async_op=async_op), then)
    return _run("reduce_scatter", nbytes, group, async_op,
                lambda: _reduce_scatter_flat(output, input, group=group, async_op=async_op))


def all_gather(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup | None = None,
               async_op: bool = False) -> Handle:
    """Concatenate every rank's ``input`` into ``output`` in rank order."""
    return _all_gather("all_gather", output, input, group, async_op)


def _all_gather(op: str, output: torch.Tensor, input: torch.Tensor, group: ProcessGroup | None,
                async_op: bool) -> Handle:
    size = get_world_size(group)
    if size == 1 and output.data_ptr() != input.data_ptr():
        output.copy_(input)
    nbytes = output.numel() * output.element_size()
    if size > 1 and _on_gloo(group, output) and output.is_contiguous():
        chunks = output.view(size, -1)
        mine = chunks[get_rank_in(group)]
        if mine.data_ptr() != input.data_ptr():
            mine.copy_(input.reshape(-1))

        def launch() -> Any:
            works = [dist.broadcast(chunks[r], src=dist.get_global_rank(group or dist.group.WORLD, r), group=group,
                                    async_op=async_op) for r in range(size)]
            return works if async_op else None

        return _run(op, nbytes, group, async_op, launch)
    return _run(op, nbytes, group, async_op,
                lambda: _all_gather_flat(output, input, group=group, async_op=async_op))


def all_gather_sizes(n: int, group: ProcessGroup | None = None, device: torch.device | None = None) -> list[int]:
    """Every rank's ``n``, in rank order (one small all-gather; logged as ``sparse_sizes``)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = mine.new_empty(get_world_size(group))
    _all_gather("sparse_sizes", out, mine, group, async_op=False)
    return out.tolist()


def all_gather_slices(rows: torch.Tensor, values: torch.Tensor, count: int, capacity: int,
                      group: ProcessGroup | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Every rank's ``count`` and first ``capacity`` index slices, in one all-gather whose size every
    rank knows beforehand: each rank packs its count (int64; any value, -1 included, passes through),
    ``rows[:capacity]`` (int64 [n]) and ``values[:capacity]`` ([n, *row_shape], any dtype) into one
    byte buffer of ``capacity`` slots (zero/sparse.py, Note: one gather per step). Returns every rank's
    count, in rank order, and the gathered rows [world, capacity] and values [world, capacity,
    *row_shape]: rank r's slots past ``min(counts[r], capacity)`` are padding. A rank whose count is
    above ``capacity`` sent only the first ``capacity`` slices; the caller sees it in ``counts``.
    Logged as ``sparse_all_gather``: the comm log counts the index-slice traffic of sparse gradients
    apart from dense reductions."""
    size = get_world_size(group)
    row_shape = tuple(values.shape[1:])
    row_bytes = values.element_size()
    for d in row_shape:
        row_bytes *= d
    # [count | rows | values], every part at a multiple of 8 bytes, so each views as its own dtype
    vals_at = 8 + 8 * capacity
    slot = vals_at + -(-capacity * row_bytes // 8) * 8
    mine = torch.zeros(slot, dtype=torch.uint8, device=rows.device)
    n = max(0, min(count, capacity))
    mine[:8].view(torch.int64)[0] = count
    mine[8:vals_at].view(torch.int64)[:n] = rows[:n]
    if n:
        mine[vals_at:vals_at + n * row_bytes].view(values.dtype).view(n, *row_shape).copy_(values[:n])
    out = mine.new_empty(size * slot)
    _all_gather("sparse_all_gather", out, mine, group, async_op=False)
    packed = out.view(size, slot)
    counts = packed[:, :8].view(torch.int64).view(-1).tolist()
    got_rows = packed[:, 8:vals_at].view(torch.int64).view(size, capacity)
    got_values = (packed[:, vals_at:vals_at + capacity * row_bytes].view(values.dtype)
                  .view(size, capacity, *row_shape))
    return counts, got_rows, got_values


def all_reduce_rows(rows: torch.Tensor, group: ProcessGroup | None = None) -> Handle:
    """Sum ``rows`` (some rows of a table, the same rows on every rank) across ranks, in place;
    logged as ``sparse_param_rows``, with the other sparse traffic (zero/sharded.py publishes the
    rows a lazy update changed this way)."""
    nbytes = rows.numel() * rows.element_size()
    return _run("sparse_param_rows", nbytes, group, False, lambda: dist.all_reduce(rows, group=group))


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
