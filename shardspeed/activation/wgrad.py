"""Weight gradients after input gradients: the split backward that lets a pipeline stage hand the
stage before it its gradient before computing its own weights' gradients (the B/W split of
zero-bubble pipelines, Qi et al. 2023). The schedule says which backwards split (pipe/schedule.py,
Note: early gradient sends); the pipeline engine runs them with a ``WeightGradQueue``.

[Note: deferred weight gradients]
In a linear layer's backward the input gradient (dY W) and the weight gradient (dY^T X) are two
independent matrix products, but autograd runs both in one node, so a stage's input gradient exists
only once every weight gradient above it is done. A forward run under ``WeightGradQueue.recording()``
routes ``F.linear(x, w, b)`` whose ``w`` (and ``b``, if any) are leaf tensors that require grad
through ``_InputGradFirst``: its backward returns the input's gradient only and queues
``(x, dY, w, b)``. ``compute()`` then runs the queued products and gives them to autograd on the
leaves (``torch.autograd.backward(weights, grads)``), so they accumulate exactly as autograd's own
would: into ``.grad`` (the engine's flat buffers), through each leaf's tensor hooks and its
AccumulateGrad with its post-accumulate hooks (the strategy's reduction hooks). A weight used twice
(tied within one stage) gets the sum of its products as one root. The graph itself has no edge to
the leaves (the function takes their detached values): autograd visits the AccumulateGrad of an
input whose gradient is None and still runs its post-accumulate hooks, which would tell a ZeRO
bucket the weight was done before ``compute()``.

Only the forward of a micro-batch that will split records, and ``compute()`` empties the queue in
the same backward, so nothing is deferred across micro-batches: a stage holds what 1F1B holds, plus,
between the two halves of one backward, its linear layers' output gradients.

[Note: recomputed regions]
Activation checkpointing runs a region's forward again inside backward, where no torch function
mode is active, and torch's non-reentrant checkpoint checks that the recomputation saves tensors of
the same shapes: a linear that recorded in forward must record again. ``shardspeed.checkpointing``
does that (its recomputation re-enters the queue that was recording, ``recording_queue()``). Inside
any other region that installs saved-tensor hooks (torch's own checkpoint called directly, as
Hugging Face models do, or ``save_on_cpu``), linears are left alone: correct, only not split. Which
regions are ours is told by the saved-tensor hooks on top when ``recording()`` was entered. Linear
layers written as other ops (``x @ w.T``, ``torch.addmm``: GPT-2's ``Conv1D``) keep autograd's
one-node backward too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_local = threading.local()  # .queues: the queues recording in this thread, innermost last


def _top_hooks() -> Any:
    """The pack function of the innermost saved-tensor hooks, or None."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return None if top is None else top[0]


class _InputGradFirst(torch.autograd.Function):
    """``F.linear`` whose backward computes the input gradient now and queues the weight's."""

    @staticmethod
    def forward(ctx: Any, queue: WeightGradQueue, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                leaves: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        ctx.queue, ctx.leaves = queue, leaves
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        gx = grad_out.matmul(w) if ctx.needs_input_grad[1] else None
        ctx.queue.defer(x, grad_out, *ctx.leaves)
        return None, gx, None, None, None


class _Recording(TorchFunctionMode):
    def __init__(self, queue: WeightGradQueue):
        super().__init__()
        self.queue = queue
        self.hooks = _top_hooks()  # the saved-tensor hooks of this region (Note: recomputed regions)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled() and _top_hooks() is self.hooks:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _leaf_param(w) and (b is None or _leaf_param(b)):
                return _InputGradFirst.apply(self.queue, x, w.detach(), None if b is None else b.detach(), (w, b))
        return func(*args, **kwargs)


def _leaf_param(t: Any) -> bool:
    return torch.is_tensor(t) and t.is_leaf and t.requires_grad


def recording_queue() -> WeightGradQueue | None:
    """The queue recording in this thread's forward, if any (``shardspeed.checkpointing`` replays it
    in the recomputation: Note: recomputed regions)."""
    queues = getattr(_local, "queues", None)
    return queues[-1] if queues else None


class WeightGradQueue:
    """The weight gradients of one split backward (Note: deferred weight gradients)."""

    def __init__(self) -> None:
        self._queued: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Linear layers run inside defer their weight gradients to ``compute()``."""
        queues = _local.__dict__.setdefault("queues", [])
        queues.append(self)
        try:
            with _Recording(self):
                yield
        finally:
            queues.pop()

    def defer(self, x: torch.Tensor, grad_out: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self._queued.append((x, grad_out, w, b))

    def __len__(self) -> int:
        return len(self._queued)

    def compute(self) -> None:
        """The queued weight (and bias) gradients, accumulated by autograd into their leaves."""
        queued, self._queued = self._queued, []
        grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(leaf) -> (leaf, summed gradient)

        def add(leaf: torch.Tensor, g: torch.Tensor) -> None:
            grads[id(leaf)] = (leaf, grads[id(leaf)][1] + g) if id(leaf) in grads else (leaf, g)

        for x, gy, w, b in queued:
            gy2 = gy.reshape(-1, gy.shape[-1])
            add(w, gy2.t().mm(x.reshape(-1, x.shape[-1])).view_as(w))
            if b is not None:
                add(b, gy2.sum(0).view_as(b))
        if grads:
            leaves, gs = zip(*grads.values(), strict=True)
            torch.autograd.backward(list(leaves), list(gs))
