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
AccumulateGrad with its post-accumulate hooks (the strategy's reduction hooks). A weight used by two
recorded linears gets the sum of its products as one root. The graph itself has no edge to the
leaves (the function takes their detached values): autograd visits the AccumulateGrad of an input
whose gradient is None and still runs its post-accumulate hooks, which would tell a ZeRO bucket the
weight was done before ``compute()``.

[Note: other uses]
A weight's gradient must reach its AccumulateGrad once per backward (a ZeRO bucket counts the
calls), so a weight is deferred only if every use of it in the forward is a recorded linear. The
recording sees every torch function the forward calls: a parameter passed to anything else (an
embedding lookup with the same table, ``x @ w.T``, a penalty in the loss, a linear it may not split)
is "used otherwise" and keeps autograd's backward, and so do linears whose input carries no gradient
(nothing to split, and the weight would get nothing), weights that are not ``nn.Parameter`` (a
received activation used as a weight goes back with the input gradient), and complex, 1-D or
frozen ones. A use that comes *after* the weight was deferred cannot be undone: the forward raises,
naming the operation, with the config switch that turns splitting off. So does a backward run inside
the forward (``autograd.grad`` in the model), whose weight products would land in the queue, and a
double backward through a split linear.

Only the forward of a micro-batch that will split records, and ``compute()`` empties the queue in
the same backward, so nothing is deferred across micro-batches: a stage holds what 1F1B holds, plus,
between the two halves of one backward, its linear layers' output gradients.

[Note: one product at a time]
``compute()`` hands each linear's products to autograd as soon as they are made, and drops that
linear's input and output gradient before the next, as autograd's own backward would. Making all
products first and giving them to autograd in one call held every weight's gradient at once on top
of the queued activations: megabytes freed together at the end, which the C allocator returned to
the kernel and faulted back in on the next split backward (two GPT blocks, hidden 256, 256 tokens: 1,650-
1,850 page faults and ~4 ms of system time per micro-batch, 11 % over the whole backward; now 450-600
faults and 1 ms, against 200-450 for a whole backward, and 6-8 % over it, mostly the recording's
Python and the products no longer finding their operands in cache).
A weight used by several recorded linears waits until its last product and goes as one root, the
sum (Note: deferred weight gradients).

[Note: in place where nothing watches]
Autograd accumulates a product it is given by making it whole and adding it to ``.grad`` (or taking
it as ``.grad`` when there is none), then runs the leaf's post-accumulate hooks. When a leaf already
has a dense ``.grad`` of the products' dtype and no hooks of either kind (tensor hooks, which may
change the gradient, or post-accumulate hooks, which a ZeRO bucket counts on), nothing can tell that
path from ``grad.addmm_(dY^T, X)`` (``grad += dY^T X`` in one product), which skips a temporary the
size of the weight and a second pass over it: on two GPT blocks the weight half costs 9.5 ms instead
of 11.1, less than autograd's own weight products inside a whole backward. That is the common case
in a pipeline stage: gradients in the engine's flat buffers, and hooks only where a reduction
overlaps the backward (zero/stage0.py). A shared weight then takes each product as it comes. Leaves
with hooks, without ``.grad`` yet, or under autocast (bf16 products for fp32 weights) go through
autograd as before; the sum differs from autograd's only in rounding (one addition inside the
product instead of after it). What cannot be seen from the tensor is a hook on its AccumulateGrad
node itself (``grad_fn.next_functions``, how DDP's reducer and Megatron-style wrappers hook
accumulation): the in-place path would skip it. So it is off unless the queue's owner says
``in_place=True``: the pipeline engine does, since it owns its parameters' gradient accumulation.

[Note: recomputed regions]
Activation checkpointing runs a region's forward again inside backward, where no torch function
mode is active, and torch's non-reentrant checkpoint checks that the recomputation saves tensors of
the same shapes: a linear that recorded in forward must record again. ``shardspeed.checkpointing``
does that (its recomputation re-enters the queue that was recording, ``recording_queue()``). Inside
any other region that installs saved-tensor hooks (torch's own checkpoint called directly, as
Hugging Face models do, or ``save_on_cpu``), linears are left alone, as other uses (Note: other
uses). Which regions are ours is told by the saved-tensor hooks on top when ``recording()`` was
entered. A recomputation decides per weight as its forward did (it shares the forward's decisions),
so it saves the same tensors even when the region alone would decide otherwise. Linear
layers written as other ops (``x @ w.T``, ``torch.addmm``: GPT-2's ``Conv1D``) keep autograd's
one-node backward too.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_local = threading.local()  # .sessions: the recordings open in this thread, innermost last

_EARLY_GRADS_OFF = 'set "pipeline": {"early_grads": false} in the config to keep every backward whole'


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
        return F.linear(x, w, b)  # under the caller's autocast, if any: the product's dtype is grad_out's

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError("a double backward (create_graph=True) through a linear layer whose weight gradient "
                               f"was deferred (activation/wgrad.py) is not supported; {_EARLY_GRADS_OFF}")
        x, w = ctx.saved_tensors
        gx = grad_out.matmul(w.to(grad_out.dtype)).to(x.dtype)
        ctx.queue.defer(x, grad_out, *ctx.leaves)
        return None, gx, None, None, None


def _is_param(a: Any) -> bool:
    # ``isinstance(a, Parameter)`` runs Python (Parameter's metaclass) for every object: a plain tensor or
    # a number is answered without it, as the recording asks for every argument of every torch call
    t = type(a)
    return t is torch.nn.Parameter or (t is not torch.Tensor and isinstance(a, torch.Tensor)
                                       and isinstance(a, torch.nn.Parameter))


def _params_in(args: Any) -> Iterator[torch.nn.Parameter]:
    for a in args:
        if _is_param(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if _is_param(t))


class _Recording(TorchFunctionMode):
    """One forward's recording. ``decided`` maps a parameter (by id) to whether its linear uses are
    deferred; a recomputation shares it, so it decides as the forward did (Note: recomputed regions)."""

    def __init__(self, queue: WeightGradQueue, decided: dict[int, bool] | None = None):
        super().__init__()
        self.queue = queue
        self.hooks = _top_hooks()  # the saved-tensor hooks of this region (Note: recomputed regions)
        self.decided: dict[int, bool] = {} if decided is None else decided
        self.conflict: str | None = None  # a deferred weight used otherwise afterwards, and by what
        self.conflict_op = ""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled() and _top_hooks() is self.hooks:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            # checks and detach() with torch function handling off: an outer recording (this one's forward,
            # around a checkpointed region) would take them for uses of the weight
            with torch._C.DisableTorchFunction():
                split = (_splittable(x, w, b) and self.decided.setdefault(id(w), True)
                         and (b is None or self.decided.setdefault(id(b), True)))
                detached = (w.detach(), None if b is None else b.detach()) if split else None
            if detached is not None:
                return _InputGradFirst.apply(self.queue, x, *detached, (w, b))
        if getattr(func, "__name__", "") != "__get__":  # reading .shape or .requires_grad is not a use
            for p in _params_in((*args, *kwargs.values())):
                # any other use keeps the parameter's gradient in autograd's backward (Note: other uses)
                if self.decided.setdefault(id(p), False) and self.conflict is None:
                    self.conflict = f"a {tuple(p.shape)} parameter"
                    self.conflict_op = getattr(func, "__qualname__", str(func))
        return func(*args, **kwargs)


def _splittable(x: Any, w: Any, b: Any) -> bool:
    """Module weights of a real floating dtype, on an input that carries a gradient (else there is no
    backward to split, and the weight's gradient would be lost)."""
    return (torch.is_tensor(x) and x.requires_grad and _is_param(w) and w.requires_grad
            and w.dim() == 2 and w.is_floating_point()
            and (b is None or (_is_param(b) and b.requires_grad and b.dim() == 1)))


def recording_session() -> Any:
    """The recording open in this thread's forward, if any (``shardspeed.checkpointing`` replays it in
    the recomputation: Note: recomputed regions)."""
    sessions = getattr(_local, "sessions", None)
    return sessions[-1] if sessions else None


class WeightGradQueue:
    """The weight gradients of one split backward (Note: deferred weight gradients)."""

    def __init__(self, in_place: bool = False) -> None:
        self._queued: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.in_place = in_place  # Note: in place where nothing watches (the pipeline engine turns it on)

    @contextlib.contextmanager
    def recording(self, replay: Any = None) -> Iterator[None]:
        """Linear layers run inside defer their weight gradients to ``compute()``. ``replay``: a
        forward's session, whose decisions a recomputation of part of it repeats."""
        session = _Recording(self, None if replay is None else replay.decided)
        sessions = _local.__dict__.setdefault("sessions", [])
        sessions.append(session)
        queued = len(self._queued)
        try:
            with session:
                yield
        finally:
            sessions.pop()
        if len(self._queued) != queued:  # a backward ran inside this forward (autograd.grad in the model)
            self._queued = self._queued[:queued]
            raise RuntimeError("a backward ran inside a forward whose linear layers defer their weight gradients "
                               f"(autograd.grad in the model or loss?): those gradients would be misplaced; "
                               f"{_EARLY_GRADS_OFF}")
        if session.conflict is not None:
            raise RuntimeError(f"{session.conflict} was used by F.linear, which deferred its weight gradient "
                               f"(activation/wgrad.py), and later in the same forward by {session.conflict_op}: "
                               f"its gradient would be counted twice by the engine's hooks; {_EARLY_GRADS_OFF}")

    def defer(self, x: torch.Tensor, grad_out: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self._queued.append((x, grad_out, w, b))

    def __len__(self) -> int:
        return len(self._queued)

    def clear(self) -> None:
        """Drop what is queued (a backward that failed half-way)."""
        self._queued = []

    def compute(self) -> None:
        """The queued weight (and bias) gradients, one linear at a time (Note: one product at a time):
        added in place into a ``.grad`` nothing watches, else accumulated by autograd into their
        leaves (Note: in place where nothing watches)."""
        queued, self._queued = self._queued, []
        queued.reverse()  # popped from the end: backward order, the order the reduction buckets fill
        # the leaves autograd accumulates (the rest: Note: in place where nothing watches), and how many
        # products are still to come for each (comprehensions: a loop variable would keep the last entry's
        # tensors alive)
        by_autograd = {id(leaf) for x, gy, *ls in queued for leaf in ls
                       if leaf is not None and not (self.in_place and _in_place(leaf, x, gy))}
        uses = collections.Counter(id(leaf) for entry in queued for leaf in entry[2:] if id(leaf) in by_autograd)
        partial: dict[int, torch.Tensor] = {}  # id(leaf) -> the sum of its products so far (a shared weight)
        while queued:  # each linear's tensors go once its products are made
            x, gy, w, b = queued.pop()
            roots, grads = [], []
            with torch.no_grad():  # the products are gradients, not part of any graph
                gy2 = gy.reshape(-1, gy.shape[-1])
                x2 = x.reshape(-1, x.shape[-1])
                del x, gy
                for leaf in (w, b):
                    if leaf is None:
                        continue
                    if id(leaf) not in by_autograd:
                        if leaf is w:
                            leaf.grad.addmm_(gy2.t(), x2)
                        else:
                            leaf.grad.add_(gy2.sum(0))
                        continue
                    g = gy2.t().mm(x2.to(gy2.dtype)).to(w.dtype) if leaf is w else gy2.sum(0).to(leaf.dtype)
                    if id(leaf) in partial:
                        g = partial.pop(id(leaf)) + g
                    uses[id(leaf)] -= 1
                    if uses[id(leaf)]:
                        partial[id(leaf)] = g  # more products of this weight follow: one root, once they are summed
                    else:
                        roots.append(leaf)
                        grads.append(g)
                del gy2, x2
            if roots:
                torch.autograd.backward(roots, grads)


def _in_place(leaf: torch.Tensor, x: torch.Tensor, gy: torch.Tensor) -> bool:
    """Whether ``leaf``'s products can go straight into its ``.grad`` (Note: in place where nothing watches)."""
    grad = leaf.grad
    return (grad is not None and grad.layout == torch.strided and grad.dtype == gy.dtype == x.dtype == leaf.dtype
            and grad.device == gy.device and not leaf._backward_hooks
            and not getattr(leaf, "_post_accumulate_grad_hooks", None))
