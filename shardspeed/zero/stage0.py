"""Stage 0: every rank holds everything; gradients are averaged with bucketed all-reduce
overlapped with backward (what DDP does).

[Note: gradient buffers] Each trainable parameter's gradient lives in a flat bucket buffer of the
grad-accumulation dtype (fp32 by default; with a bf16/fp16 ``data_types.grad_accum_dtype`` the
optimizer gets an fp32 copy for the length of the step). In fp32 training ``param.grad`` IS a view into that
buffer, so autograd accumulates in place and nothing is copied. In bf16/fp16 training the module's
low-precision gradient is added into the fp32 view by the post-accumulate hook and then freed; the
fp32 master parameters (the optimizer's) point their ``.grad`` at the same views.

[Note: launch order] Buckets are reduced strictly in index order, the same on every rank, even if
a later bucket fills first: collectives must be issued in one order across ranks.

[Note: gradient hooks only where needed] A post-accumulate hook on every parameter costs a call
from autograd into Python per parameter and backward: on stage 0 of the pipeline benchmark's GPT at
P = 2 (D = 1, 16 micro-batches) 736 calls a step, 5 ms of Python alone (cProfile) plus autograd's
dispatch, on the path every micro-batch waits for. In fp32 training (gradients accumulate in place
in the bucket views, which ``param.grad`` is) the hooks have work only when a reduction overlaps
backward: the boundary micro-batch with more than one data-parallel rank. So they are registered
for such micro-batches alone; on the others, ``finish_backward`` links any gradient autograd made anew (a ``param.grad``
set to None by the user, say) into its view, as the hook would. Low-precision module gradients
(added into fp32 views and freed as backward goes) and ``sparse=True`` tables keep their hooks.
"""

from __future__ import annotations

import torch

from shardspeed.comm import Topology
from shardspeed.zero.buckets import GradBucket, plan_buckets
from shardspeed.zero.reducer import GradientReducer
from shardspeed.zero.sparse import SparseReducer, SparseTable, as_sparse, embedding_tables, table_buckets
from shardspeed.zero.strategy import OrderedReduction, Strategy, StrategyOptions


class DataParallelStrategy(OrderedReduction, Strategy):
    def __init__(self, module: torch.nn.Module, topo: Topology, opts: StrategyOptions):
        super().__init__(module, topo, opts)
        params = [p for _, p in self.named_params]
        self.params = params
        device = params[0].device if params else torch.device("cpu")
        tables = embedding_tables(module) if opts.sparse_gradients else {}
        plans = plan_buckets([n for n, _ in self.named_params], [tuple(p.shape) for p in params],
                             opts.bucket_numel, alone={n for n, p in self.named_params if id(p) in tables})
        self.buckets = [GradBucket(plan, opts.grad_accum_dtype, device) for plan in plans]
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, slot)
        for b, bucket in enumerate(self.buckets):
            for s, pid in enumerate(bucket.plan.param_ids):
                self._where[id(params[pid])] = (b, s)
        # embedding tables, each alone in its bucket (zero/sparse.py, Note: one bucket per table):
        # id(bucket) -> the table's slot for dense-gradient tables, or its SparseTable for sparse=True ones
        self._dense_tables, self._sparse_tables = table_buckets(
            self.named_params, tables, {pid: self.buckets[b] for pid, (b, _) in self._where.items()})
        for bucket in self.buckets:
            if id(bucket) in self._sparse_tables:
                # its gradient never lands in the bucket: no table-sized buffer to hold, zero and scale
                bucket.buffer = bucket.buffer.new_zeros(0)
                bucket.views = [bucket.buffer.new_zeros(()).expand(self._sparse_tables[id(bucket)].shape)]
        self._sparse = SparseReducer(topo.dp_group, topo.dp_world_size, opts.reduce_dtype)
        self.grads_in_module = opts.compute_dtype == opts.grad_accum_dtype
        self.masters: dict[int, torch.Tensor] = {}
        for p in params:
            view = self._view(p)
            if self.grads_in_module and p.dtype == torch.float32:
                master = p  # fp32 training: the parameter is its own master (no copy)
            else:
                master = p.detach().to(torch.float32).clone()
            if self._table(p) is not None:  # its gradient stays sparse, linked at each step (link_grads)
                pass
            elif view.dtype == master.dtype:
                master.grad = view  # else an fp32 copy at each step (link_grads)
            if self.grads_in_module and p.dtype == view.dtype and self._table(p) is None:
                p.grad = view  # else (weights not yet cast to bf16/fp16) the first backward's hook links it
            self.masters[id(p)] = master
        self._reducer = GradientReducer(opts, topo.dp_group, topo.dp_world_size, bound=None)
        # Note: gradient hooks only where needed
        self._always_hooked = not self.grads_in_module or bool(self._sparse_tables)
        self._links = [(p, self._view(p)) for p in params]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._set_hooks(self._always_hooked)

    def _set_hooks(self, on: bool) -> None:
        if on and not self._hooks:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        elif not on and self._hooks:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _link_module_grads(self) -> None:
        """What the hooks do in fp32 training, after backward (Note: gradient hooks only where needed)."""
        for p, view in self._links:
            if p.grad is not view:
                self._into_view(p, view)

    def _into_view(self, p: torch.Tensor, view: torch.Tensor) -> None:
        """A module gradient autograd made anew (not accumulated in place into ``view``) added into its
        view; ``param.grad`` then is the view (fp32) or None (bf16/fp16: the view is the fp32 copy)."""
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            view.add_(p.grad)
        p.grad = view if self.grads_in_module else None

    def _view(self, p: torch.Tensor) -> torch.Tensor:
        b, s = self._where[id(p)]
        return self.buckets[b].views[s]

    def _table(self, p: torch.Tensor) -> SparseTable | None:
        """The SparseTable of a ``sparse=True`` embedding weight under sparse_gradients, else None."""
        return self._sparse_tables.get(id(self.buckets[self._where[id(p)][0]]))

    def sparse_grad_masters(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, self.masters[id(p)]) for n, p in self.named_params if self._table(p) is not None]

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        """The reduced gradient's elements the optimizer will see (a sparse table's stored values)."""
        table = self._table(p)
        return self._view(p) if table is None else table.values()

    def master_for(self, param: torch.nn.Parameter) -> torch.Tensor:
        try:
            return self.masters[id(param)]
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not a trainable parameter of the model "
                             "(requires_grad=False, or from another module)") from None

    # -- backward ---------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        b, s = self._where[id(p)]
        bucket = self.buckets[b]
        view = bucket.views[s]
        table = self._sparse_tables.get(id(bucket))
        if table is not None:  # kept sparse, one part per micro-batch, reduced at the boundary
            table.take(p.grad)
            p.grad = None
        elif p.grad is not view:
            self._into_view(p, view)
        if not self.reduce_enabled:
            return
        if bucket.launched:
            raise RuntimeError(
                f"parameter '{bucket.plan.slots[s].name}' received a second gradient in one backward after "
                "its bucket was reduced; with activation checkpointing use the non-reentrant form "
                "(shardspeed.checkpointing.checkpoint or torch.utils.checkpoint(use_reentrant=False))")
        bucket.ready += 1
        if bucket.complete():
            self._launch_ready()

    def _reduction_units(self) -> list[GradBucket]:
        return self.buckets

    def _launch(self, bucket: GradBucket) -> None:
        bucket.launched = True
        table = self._sparse_tables.get(id(bucket))
        if table is not None:
            reduced = self._sparse.reduce_sparse(table.local(), table.shape[0], table.used(), table.name)
            # None: no rank looked the table up, so it has no gradient (zero/sparse.py, Note: an unused
            # table has no gradient)
            table.grad = None if reduced is None else as_sparse(reduced, table.shape)
            table.parts.clear()
        elif id(bucket) in self._dense_tables:
            self._sparse.reduce_dense(bucket.views[0], bucket.plan.slots[0].name)
        else:
            self._reducer.average(bucket.buffer)

    def finish_backward(self) -> None:
        if not self._hooks:
            self._link_module_grads()
        if self.reduce_enabled:
            self._launch_ready(flush=True)

    def begin_backward(self, boundary: bool) -> None:
        super().begin_backward(boundary)
        self._pending = self._pending or self.reduce_enabled
        self._set_hooks(self._always_hooked or (self.reduce_enabled and self.topo.dp_world_size > 1))

    def _drain(self) -> None:
        self._reducer.drain()
        for bucket in self.buckets:
            bucket.reset()

    # -- step -------------------------------------------------------------------------------------
    def grad_norm_sq(self) -> torch.Tensor:
        if self.topo.mp_world_size == 1:
            # a sparse=True table's bucket buffer is empty: its gradient is its table's values
            grads = [b.buffer for b in self.buckets] + [t.values() for t in self._sparse_tables.values()]
            sq = [torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]
            return torch.stack(sq).sum() if sq else self.zero_norm()
        # gradients are already averaged: summing them over the data-parallel group too would count
        # each one N times, so fold the dp reduction out
        total = self._model_parallel_norm_sq([(self._grad(p), p) for p in self.params])
        return total / self.topo.dp_world_size

    def grad_pieces(self) -> list[tuple[str, int, torch.Tensor]]:
        for t in self._sparse_tables.values():
            raise NotImplementedError(f"embedding '{t.name}' (sparse=True) has a sparse gradient; the pipeline "
                                      "engine needs dense ones: build it with sparse=False")
        return [(n, 0, self._view(p).view(-1)) for n, p in self.named_params]

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        for b in self.buckets:
            b.buffer.mul_(factor)
        for t in self._sparse_tables.values():
            t.values().mul_(factor)

    def link_grads(self) -> None:
        # a bf16/fp16 grad_accum_dtype: torch optimizers want gradients in the master's dtype, so the
        # reduced low-precision buffer is widened for the step and the copy dropped by zero_grad()
        for p in self.params:
            master, view, table = self.masters[id(p)], self._view(p), self._table(p)
            if table is not None:
                master.grad = table.grad
                continue
            master.grad = view if view.dtype == master.dtype else view.to(master.dtype)

    @torch.no_grad()
    def after_step(self) -> None:
        lowp = [p for p in self.params if self.masters[id(p)] is not p]
        if lowp:
            torch._foreach_copy_(lowp, [self.masters[id(p)] for p in lowp])

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()
        for t in self._sparse_tables.values():
            t.clear()
        if self.opts.grad_accum_dtype != torch.float32:
            for m in self.masters.values():
                m.grad = None
        for p in self.params:
            if self._table(p) is not None:
                self.masters[id(p)].grad = None
            elif self.grads_in_module:
                p.grad = self._view(p)

    def state_bytes(self) -> dict[str, int]:
        params = sum(p.numel() * p.element_size() for p in self.params)
        masters = sum(m.numel() * m.element_size() for p in self.params
                      if (m := self.masters[id(p)]) is not p)
        grads = sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)
        return {"parameters": params, "gradients": grads, "master_parameters": masters}
