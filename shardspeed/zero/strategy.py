"""The contract between the engine and a ZeRO stage.

[Note: who does what] The engine owns the training loop: loss scaling, clipping coefficient,
optimizer.step(), scheduler, counters. A strategy owns where gradients and parameter copies live:
it installs gradient hooks, reduces gradients (overlapped with backward), hands the optimizer its
fp32 parameters, reports the gradient norm and overflow, and publishes updated parameters back to
the module. The engine never branches on the stage; it calls these methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from shardspeed.accelerator import get_accelerator
from shardspeed.comm import Topology, all_reduce


@dataclass(frozen=True)
class Piece:
    """A contiguous range of one parameter's flat form that this rank owns: elements
    [start, start + length) of parameter ``name`` live in ``master.view(-1)[offset:offset + length]``
    (and in the same range of each of the optimizer's per-element states for ``master``)."""

    name: str
    start: int
    length: int
    master: torch.Tensor
    offset: int


@dataclass(frozen=True)
class StrategyOptions:
    compute_dtype: torch.dtype
    grad_accum_dtype: torch.dtype
    reduce_dtype: torch.dtype
    bucket_numel: int
    prescale: bool = False
    predivide_factor: float = 1.0
    overlap: bool = True
    # stages 1-2: leave the parameter all-gathers in flight after step() until each module's
    # forward needs them; only when the user asked for overlap_comm: true, since until then code
    # that reads parameters directly after step() (an EMA, say) would see some stale shards
    overlap_param_gather: bool = False
    reduce_scatter: bool = True  # False: all-reduce whole buckets and keep this rank's shard
    allgather_partitions: bool = True  # False: each rank broadcasts its shard instead
    allgather_numel: int = 500_000_000  # cap on parameter elements being gathered at once
    sparse_gradients: bool = False  # embedding tables reduced as index slices (zero/sparse.py)


def is_sliced(param: torch.Tensor) -> bool:
    """A tensor-parallel slice: marked by a tensor-parallel layer (``tensor_model_parallel``) or with
    DeepSpeed's older ``model_parallel`` attribute."""
    return bool(getattr(param, "model_parallel", False) or getattr(param, "tensor_model_parallel", False))


def is_pipe_replica(param: torch.Tensor) -> bool:
    """A tied parameter's copy on a pipe stage other than its owner (DeepSpeed's attribute name): its
    gradient equals the owner's after the tied reduction, so norms count it there only."""
    return bool(getattr(param, "ds_pipe_replicated", False))


class Strategy(ABC):
    def __init__(self, module: torch.nn.Module, topo: Topology, opts: StrategyOptions):
        self.module = module
        self.topo = topo
        self.opts = opts
        self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # where norms and overflow flags are reduced: NCCL cannot all-reduce a host tensor
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else get_accelerator().current_device()
        self.reduce_enabled = True  # false inside no_sync() and on non-boundary micro-batches
        self._no_sync = False
        # true when backward already ran the optimizer (stage 3's optimizer_in_backward): the engine's
        # step then only finishes the reductions, publishes parameters and moves the schedule
        self.steps_in_backward = False

    def begin_backward(self, boundary: bool) -> None:
        """Called before autograd runs; ``boundary``: this micro-batch ends an accumulation cycle.
        Stages that keep full gradients reduce only at the boundary (like DDP's no_sync)."""
        self.reduce_enabled = boundary and not self._no_sync

    def attach_optimizer(self, optimizer: Any) -> None:
        """Called once the optimizer over this strategy's masters exists. Per-parameter optimizers
        (LAMB) under tensor slicing need whole-parameter norms (Note: per-parameter norms)."""
        if not hasattr(optimizer, "set_partition") or self.topo.tp_world_size == 1:
            return
        index = {id(p): i for i, (_, p) in enumerate(self.named_params)}
        segments = {id(self.master_for(p)): [(index[id(p)], 0, p.numel())] for _, p in self.named_params}
        optimizer.set_partition(segments, len(self.named_params), self._norm_reducer(over_dp=False))

    def _norm_reducer(self, over_dp: bool) -> Any:
        """[Note: per-parameter norms] LAMB's trust ratio needs each whole parameter's norm
        (optim/lamb.py): vectors of squared norms, one entry per trainable parameter in
        ``named_params`` order (the same list on every rank of the data- and tensor-parallel
        groups), are summed over the data-parallel group (``over_dp``: ZeRO partitions the
        parameters) and over the tensor-parallel group, where a replicated parameter's entry comes
        from tensor-parallel rank 0 only (every rank holds all of it). Not over pipe stages: they
        hold other parameters under the same indices."""
        topo = self.topo
        units = len(self.named_params)
        repeated = torch.tensor([not is_sliced(p) for _, p in self.named_params], dtype=torch.bool,
                                device=self.device)

        def reduce_sum(v: torch.Tensor) -> torch.Tensor:
            if over_dp:
                all_reduce(v, group=topo.dp_group)
            if topo.tp_world_size > 1:
                if topo.tp_rank != 0:
                    v.view(-1, units).masked_fill_(repeated, 0.0)
                all_reduce(v, group=topo.tp_group)
            return v

        return reduce_sum

    @abstractmethod
    def master_for(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 tensor the optimizer updates in place of ``param``."""

    def forward_context(self) -> Any:
        """Entered around the module's forward (stage 3 decides what autograd may keep)."""
        return nullcontext()

    @abstractmethod
    def finish_backward(self) -> None:
        """Called after autograd returns: start any reduction the hooks have not started."""

    @abstractmethod
    def wait_reductions(self) -> None:
        """Block until every gradient reduction of this step is done (and averaged)."""

    @abstractmethod
    def grad_norm_sq(self) -> torch.Tensor:
        """Squared global L2 norm of the (still loss-scaled) gradients the optimizer will see, as a
        0-dim fp32 tensor, agreed across ranks. Non-finite means an fp16 overflow somewhere."""

    @abstractmethod
    def scale_grads(self, factor: float) -> None:
        """Multiply the gradients the optimizer will see by ``factor`` (unscale and clip at once)."""

    def link_grads(self) -> None:
        """Point each master's ``.grad`` at the gradient the strategy reduced, right before the
        optimizer steps. [Note: zero_grad by the user] Hugging Face and Lightning loops call
        ``optimizer.zero_grad()`` on the optimizer ``initialize()`` returned, which (set_to_none)
        cuts the links made at start-up: without this, later steps would silently skip those
        parameters. The base (gradients in ``param.grad``, the parameter its own master) has none."""
        return None

    def grad_pieces(self) -> list[tuple[str, int, torch.Tensor]]:
        """After ``wait_reductions()``: this rank's reduced gradients as (parameter name, flat start,
        1-D view) over ``named_params``; the views may be written (the pipeline engine sums tied
        parameters' gradients over the stages holding them through them). A replicated strategy
        gives whole parameters; a partitioned one its shard's segments (disjoint across the
        data-parallel group, together covering every parameter)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its reduced gradients")

    def sparse_grad_masters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, master) of the parameters whose gradients reach the optimizer as sparse tensors:
        ``sparse=True`` embeddings under sparse_gradients (zero/sparse.py)."""
        return []

    @abstractmethod
    def after_step(self) -> None:
        """Publish the updated fp32 parameters to the module's (possibly lower precision) parameters."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Forget this step's gradients."""

    def _model_parallel_norm_sq(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Squared norm over (gradient piece, its parameter) pairs under model parallelism, summed
        over the data- and model-parallel groups.

        [Note: replicated parameters in the norm] A sliced parameter (``model_parallel`` /
        ``tensor_model_parallel`` attribute) counts on every tensor-parallel rank; a replicated one
        counts only on tensor-parallel rank 0 (pipe stages hold different parameters: each counts
        its own), and a tied parameter only on the first pipe stage holding it (the others carry
        ``ds_pipe_replicated``, set by the pipeline engine). The ranks that do not count a gradient
        still add 0 x its squared norm: zero when finite, NaN when that rank's copy overflowed, so
        an fp16 overflow on any rank, even in a gradient it does not count, makes every rank skip
        the step (each rank steps its own replica, and one stepping with inf would leave the
        replicas apart for good)."""
        counted, uncounted = [], []
        for grad, param in pieces:
            once = (is_sliced(param) or self.topo.tp_rank == 0) and not is_pipe_replica(param)
            (counted if once else uncounted).append(grad)
        total = self.zero_norm()
        for grad in counted:
            total += torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
        for grad in uncounted:
            total += 0.0 * torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
        all_reduce(total, group=self.topo.dp_group)
        all_reduce(total, group=self.topo.mp_group)
        return total

    def zero_norm(self) -> torch.Tensor:
        """A 0-dim fp32 zero on the gradients' device: the norm of no gradients, and what a rank
        holding none contributes to the all-reduce (a host tensor would fail under NCCL)."""
        return torch.zeros((), dtype=torch.float32, device=self.device)

    #: every rank holds every piece (stage 0): one rank writes them to checkpoints
    replicated = True

    def owned_pieces(self) -> list[Piece]:
        """This rank's pieces of the fp32 training state, in a world-size-free coordinate system
        (parameter name + flat range): what checkpoints save and reload at any world size."""
        out = []
        for name, p in self.named_params:
            m = self.master_for(p)
            out.append(Piece(name, 0, p.numel(), m, 0))
        return out

    def checkpointed_names(self) -> set[str]:
        """Parameters whose values travel as pieces (the others, frozen ones, are saved whole)."""
        return {n for n, _ in self.named_params}

    def publish_masters(self) -> None:
        """After the masters were overwritten (checkpoint load): make the module's parameters match."""
        self.after_step()

    def state_bytes(self) -> dict[str, int]:
        """Bytes held by this rank for parameters, gradients and the strategy's own buffers."""
        return {}

    @contextmanager
    def no_sync(self) -> Any:
        prev, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = prev

    # -- for a tier that keeps the masters elsewhere (zero/swap_optimizer.py) ---------------------
    #: set once such a tier holds the masters: it copies each stepped master into the compute
    #: parameters itself (``publish_masters_of``), so ``after_step`` must not read masters, and code
    #: that writes masters between steps does so inside ``master_tier.all_resident()``
    master_tier: Any = None

    #: set by a tier that must step masters itself: stage 3's optimizer in backward calls it with a
    #: unit's masters (gradients attached) instead of ``optimizer.step()``
    unit_stepper: Any = None

    @property
    def masters_published_elsewhere(self) -> bool:
        return self.master_tier is not None

    def drop_master_storage(self, masters: list[torch.Tensor]) -> None:
        """The tier took ``masters`` (its values now on disk, a placeholder as each one's ``.data``):
        free any memory still holding them beside the optimizer's tensors (stages 1-2 hold none: each
        bucket's master is a clone, never a view, so the optimizer's tensor is its only holder)."""
        return None

    def master_copies(self) -> bool:
        """Whether the optimizer's masters are copies of the compute parameters (which a tier may
        move away), rather than the compute parameters' own storage."""
        return False

    def step_subgroups(self, masters: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
        """The optimizer's masters cut into sub-groups of at most ``size`` elements (one larger
        master alone), in the order they step; every master in exactly one."""
        groups: list[list[torch.Tensor]] = []
        n = 0
        for m in masters:
            if not groups or (n + m.numel() > size and groups[-1]):
                groups.append([])
                n = 0
            groups[-1].append(m)
            n += m.numel()
        return groups

    def publish_masters_of(self, masters: list[torch.Tensor]) -> None:
        """Copy these just-stepped masters into the compute parameters (``master_copies()`` only)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no master copies")

    def map_param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace the module's parameters in optimizer param groups by their masters."""
        return [{**g, "params": [self.master_for(p) for p in g["params"]]} for g in groups]


class OrderedReduction:
    """Gradient reductions issued bucket by bucket in index order, the same on every rank.

    [Note: launch order] Collectives must be issued in one order across ranks, so a bucket whose
    gradients are complete waits until every earlier bucket was launched, even if it filled first.
    Users provide ``_reduction_units()`` (objects with ``complete()``), ``_launch(unit)`` and
    ``_drain()`` (wait for what was launched, finish the averaging, reset); ``_pending`` says a
    backward produced gradients since the last wait.
    """

    _next = 0
    _pending = False

    def _reduction_units(self) -> list[Any]:
        raise NotImplementedError

    def _launch(self, unit: Any) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        raise NotImplementedError

    def _launch_ready(self, flush: bool = False) -> None:
        units = self._reduction_units()
        while self._next < len(units):
            if not flush and not units[self._next].complete():
                return
            self._launch(units[self._next])
            self._next += 1

    def _drain_all(self) -> None:
        self._drain()
        self._pending = False
        self._next = 0

    def wait_reductions(self) -> None:
        if not self._pending:  # nothing produced since the last wait: reducing again would be wrong
            return
        self._launch_ready(flush=True)
        self._drain_all()
