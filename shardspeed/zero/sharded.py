"""ZeRO stages 1 and 2: optimizer states (stage 1) and gradients too (stage 2) partitioned across
the data-parallel group. Layout: see ``partition.py`` [Note: layout].

[Note: what each rank holds] Module parameters are views into one full flat buffer per bucket
(compute dtype); the all-gather after the step rebuilds it in place. The fp32 master of this
rank's shard is a view of that buffer in fp32 training (no second copy) and an fp32 copy otherwise.
Stage 1 keeps a full gradient buffer per bucket (autograd accumulates into it across micro-batches;
one reduce-scatter at the boundary, in place, leaves this rank's averaged shard at [lo, hi)).
Stage 2 keeps only the fp32 gradient shard: each micro-batch's gradients are gathered into a
temporary full bucket borrowed from a pool, reduce-scattered as soon as the bucket is complete
(overlapping backward), added to the shard, and the bucket given back; the pool keeps at most
``reduce_bucket_size`` elements and is emptied at ``step()`` (reducer.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from shardspeed.comm import Handle, Topology, all_gather, all_reduce, all_reduce_rows, broadcast, get_global_rank
from shardspeed.zero.partition import ShardedBucketPlan, plan_sharded_buckets, shard_segments
from shardspeed.zero.reducer import BufferPool, GradientReducer, zero_unwritten
from shardspeed.zero.sparse import SparseReducer, embedding_tables, shard_of, table_buckets
from shardspeed.zero.strategy import OrderedReduction, Piece, Strategy, StrategyOptions


class ShardedBucket:
    def __init__(self, splan: ShardedBucketPlan, params: list[torch.nn.Parameter], rank: int,
                 opts: StrategyOptions, keep_full_grads: bool, pool: BufferPool, own_master: bool = False):
        self.splan = splan
        self.params = params  # in slot order
        self.lo, self.hi = splan.shard_range(rank)
        device = params[0].device
        flat = torch.zeros(splan.padded, dtype=torch.float32, device=device)
        for slot, p in zip(splan.plan.slots, params, strict=True):
            flat[slot.offset:slot.offset + slot.numel].copy_(p.detach().reshape(-1))
        # own_master: a sparse=True table's master takes sparse updates (Note: sparse updates need own storage)
        self.master_is_view = opts.compute_dtype == torch.float32 and not own_master
        if self.master_is_view:
            self.param_buffer = flat
            self.master = flat[self.lo:self.hi]  # fp32 training: the shard IS the parameters
        else:
            self.master = flat[self.lo:self.hi].clone()
            self.param_buffer = flat if opts.compute_dtype == torch.float32 else flat.to(opts.compute_dtype)
        self.param_views = [self.param_buffer[s.offset:s.offset + s.numel].view(s.shape) for s in splan.plan.slots]
        with torch.no_grad():
            for p, view in zip(params, self.param_views, strict=True):
                p.data = view
        self.accum_dtype = opts.grad_accum_dtype
        self.keep_full_grads = keep_full_grads
        self.pool = pool
        # stage 2: which slots of the temporary bucket this backward wrote (the first write copies,
        # so the bucket needs no zeroing; what nobody wrote is zeroed just before the reduction)
        self.written: list[bool] | None = None
        self.grad_full: torch.Tensor | None = None
        if keep_full_grads:  # stage 1: persistent, zeroed by zero_grad, always accumulated into
            self.grad_full = torch.zeros(splan.padded, dtype=self.accum_dtype, device=device)
        # stage 1 in fp32: the reduce-scatter writes the averaged shard in place, into [lo, hi)
        self.shard_in_full = keep_full_grads and self.accum_dtype == torch.float32
        self.grad_shard = (self.grad_full[self.lo:self.hi] if self.shard_in_full
                           else torch.zeros(splan.shard, dtype=torch.float32, device=device))
        self.master.grad = self.grad_shard
        self.shard_fresh = True  # grad_shard holds no reduced gradient yet this step
        self.ready = 0
        self.launched = False

    def ensure_full(self) -> torch.Tensor:
        """The full gradient bucket (stage 2 borrows it from a pool for the length of one backward)."""
        if self.grad_full is None:
            self.grad_full = self.pool.take(self.splan.padded, self.accum_dtype, self.param_buffer.device)
            self.written = [False] * len(self.params)
        return self.grad_full

    def zero_unwritten(self) -> None:
        if self.written is None:
            return
        slots = self.splan.plan.slots
        zero_unwritten(self.ensure_full(), [(s.offset, s.offset + s.numel) for s in slots], self.written,
                       [(self.splan.plan.numel, self.splan.padded)])

    def release_full(self) -> None:
        """Stage 2: give the temporary bucket back to the pool (reused by the next backward)."""
        self.pool.give(self.grad_full)
        self.grad_full, self.written = None, None

    def full_grad_view(self, slot_index: int) -> torch.Tensor:
        s = self.splan.plan.slots[slot_index]
        return self.ensure_full()[s.offset:s.offset + s.numel].view(s.shape)

    def complete(self) -> bool:
        return self.ready == len(self.params)


class ShardedStrategy(OrderedReduction, Strategy):
    keep_full_grads = True  # stage 1

    def __init__(self, module: torch.nn.Module, topo: Topology, opts: StrategyOptions,
                 groups: list[list[torch.nn.Parameter]]):
        super().__init__(module, topo, opts)
        name_of = {id(p): n for n, p in self.named_params}
        in_groups = {id(p) for g in groups for p in g}
        # trainable parameters no optimizer group holds are still reduced, in a group of their own
        rest = [p for _, p in self.named_params if id(p) not in in_groups]
        self.groups = [list(g) for g in groups] + ([rest] if rest else [])
        for g in self.groups:
            for p in g:
                if id(p) not in name_of:
                    raise ValueError("the optimizer holds a parameter that is not a trainable parameter of the model")
        tables = embedding_tables(module) if opts.sparse_gradients else {}
        plans = plan_sharded_buckets([[name_of[id(p)] for p in g] for g in self.groups],
                                     [[tuple(p.shape) for p in g] for g in self.groups],
                                     opts.bucket_numel, topo.dp_world_size,
                                     alone={n for n, p in self.named_params if id(p) in tables})
        by_name = {n: p for n, p in self.named_params}
        self._reducer = GradientReducer(opts, topo.dp_group, topo.dp_world_size, bound=opts.bucket_numel)
        self._pool = BufferPool(cap_numel=opts.bucket_numel, before_take=self._reducer.make_room)
        sparse_tables = {n for n, p in self.named_params if tables.get(id(p))}
        # a sparse=True table's gradient never lands in a full bucket (stage 1 would hold a table-sized one)
        self.buckets = [ShardedBucket(sp, [by_name[s.name] for s in sp.plan.slots], topo.dp_rank, opts,
                                      self.keep_full_grads and sp.plan.slots[0].name not in sparse_tables, self._pool,
                                      own_master=sp.plan.slots[0].name in sparse_tables) for sp in plans]
        self._where = {id(p): (b, s) for b, bk in enumerate(self.buckets) for s, p in enumerate(bk.params)}
        # embedding tables, each alone in its bucket and partitioned like any (zero/sparse.py, Note: one
        # bucket per table): id(bucket) of dense-gradient tables, and SparseTables of sparse=True ones.
        # [Note: sparse updates need own storage] torch 2.13 adds a sparse tensor into a dense *view*
        # with a storage offset at the wrong place (rank r > 0's shard: silently wrong values, or heap
        # corruption), so a sparse=True table's fp32 master shard is its own tensor, copied into the
        # parameter buffer before the all-gather, as in bf16 training.
        self._dense_tables, self._sparse_tables = table_buckets(
            self.named_params, tables, {pid: self.buckets[b] for pid, (b, _) in self._where.items()})
        self._sparse = SparseReducer(topo.dp_group, topo.dp_world_size, opts.reduce_dtype)
        self._lazy_rows = False  # set by attach_optimizer (Note: lazy updates publish their rows)
        self.grads_in_module = self.keep_full_grads and opts.compute_dtype == opts.grad_accum_dtype
        if self.grads_in_module:
            for bucket in self.buckets:
                for s, p in enumerate(bucket.params):
                    if id(bucket) not in self._sparse_tables:
                        p.grad = bucket.full_grad_view(s)
        self._boundary = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in self.named_params]
        self._gathers: dict[int, list[Handle]] = {}  # bucket -> parameter gathers still in flight
        self._module_buckets: dict[int, list[int]] = {}
        for m in module.modules():
            used = list(m.parameters(recurse=False)) + list(getattr(m, "_shardspeed_external", []))
            ids = sorted({self._where[id(p)][0] for p in used if id(p) in self._where})
            if ids:
                self._module_buckets[id(m)] = ids
                m.register_forward_pre_hook(self._pre_forward)
        module.register_forward_hook(self._root_post_forward)
        module.register_state_dict_pre_hook(lambda *a: self.wait_params())

    # -- optimizer wiring -------------------------------------------------------------------------
    def master_for(self, param: torch.nn.Parameter) -> torch.Tensor:
        raise ValueError("with ZeRO the optimizer holds flat shards; use map_param_groups")

    def map_param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, g in enumerate(groups):
            if [id(p) for p in g["params"]] != [id(p) for p in self.groups[i]]:
                raise ValueError(f"optimizer param group {i} differs from the one the ZeRO partitions were planned for")
            out.append({**g, "params": [b.master for b in self.buckets if b.splan.group == i]})
        return out

    def attach_optimizer(self, optimizer: Any) -> None:
        """Per-parameter optimizers (LAMB) need full-parameter norms of their shards (lamb.py's note)."""
        self._lazy_rows = _moves_touched_rows_only(optimizer)
        if not hasattr(optimizer, "set_partition"):
            return
        index = {name: i for i, (name, _) in enumerate(self.named_params)}
        segments = {id(b.master): [(index[s.slot.name], s.shard_offset, s.length)
                                   for s in shard_segments(b.splan, self.topo.dp_rank)] for b in self.buckets}
        optimizer.set_partition(segments, len(self.named_params), self._norm_reducer(over_dp=True))

    replicated = False

    def owned_pieces(self) -> list[Piece]:
        return [Piece(s.slot.name, s.param_offset, s.length, b.master, s.shard_offset)
                for b in self.buckets for s in shard_segments(b.splan, self.topo.dp_rank)]

    def publish_masters(self) -> None:
        self.after_step()
        self.wait_params()

    def master_copies(self) -> bool:
        return any(not b.master_is_view for b in self.buckets)

    @torch.no_grad()
    def publish_masters_of(self, masters: list[torch.Tensor]) -> None:
        wanted = {id(m) for m in masters}
        for b in self.buckets:
            if id(b.master) in wanted and not b.master_is_view:
                b.param_buffer[b.lo:b.hi].copy_(b.master)

    # -- backward ---------------------------------------------------------------------------------
    def begin_backward(self, boundary: bool) -> None:
        self._boundary = boundary
        super().begin_backward(boundary)
        # stage 1 reduces only at the boundary: a micro-batch inside the window leaves nothing to wait
        # for, so a wait_reductions() there (save_checkpoint) must not reduce partial gradients
        self._pending = self._pending or self.reduce_enabled

    def _on_grad(self, p: torch.Tensor) -> None:
        b, s = self._where[id(p)]
        bucket = self.buckets[b]
        table = self._sparse_tables.get(id(bucket))
        if table is not None:  # kept sparse, one part per micro-batch, reduced at the boundary
            table.take(p.grad)
            p.grad = None
            view = None
        else:
            view = bucket.full_grad_view(s)
        if view is not None and p.grad is not view:
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                if bucket.written is not None and not bucket.written[s]:
                    view.copy_(p.grad)
                else:
                    view.add_(p.grad)
            p.grad = view if self.grads_in_module else None
        if bucket.written is not None:
            bucket.written[s] = True
        if not self.reduce_enabled:
            return
        if bucket.launched:
            raise RuntimeError(
                f"parameter '{bucket.splan.plan.slots[s].name}' received a second gradient in one backward after "
                "its bucket was reduced; with activation checkpointing use the non-reentrant form")
        bucket.ready += 1
        if bucket.complete():
            self._launch_ready()

    def _reduction_units(self) -> list[ShardedBucket]:
        return self.buckets

    def _launch(self, bucket: ShardedBucket) -> None:
        bucket.launched = True
        table = self._sparse_tables.get(id(bucket))
        if table is not None:
            # stage 2 reduces each micro-batch; a sparse table's parts are small, so they wait for the
            # boundary and travel once per step, as at stages 0 and 1
            if self._boundary:
                reduced = self._sparse.reduce_sparse(table.local(), table.shape[0], table.used(), table.name)
                table.parts.clear()
                # None: no rank looked the table up; it has no gradient and no rows to publish
                # (zero/sparse.py, Note: an unused table has no gradient)
                table.grad = None if reduced is None else shard_of(reduced, bucket.lo, bucket.hi)
                table.rows = None if reduced is None else reduced.rows
                table.unused = reduced is None
            return
        full = bucket.ensure_full()  # even if no gradient reached it: every rank joins every collective
        if id(bucket) in self._dense_tables:
            bucket.zero_unwritten()
            slot = bucket.splan.plan.slots[0]
            self._sparse.reduce_dense(full[:slot.numel].view(slot.shape), slot.name)  # in place; the padding stays 0
            if not bucket.shard_in_full:  # stage 1 in fp32: the shard is that part of the full buffer
                bucket.grad_shard.add_(full[bucket.lo:bucket.hi].to(bucket.grad_shard.dtype))
            self._reduced(bucket)
            return
        bucket.zero_unwritten()
        self._reducer.add_shard(full, bucket.grad_shard, bucket.lo, bucket.shard_fresh,
                                on_done=lambda: self._reduced(bucket))

    @staticmethod
    def _reduced(bucket: ShardedBucket) -> None:
        bucket.shard_fresh = False
        if not bucket.keep_full_grads:
            bucket.release_full()  # stage 2: the borrowed bucket goes back to the pool

    def finish_backward(self) -> None:
        if self.reduce_enabled:
            self._launch_ready(flush=True)

    def _drain(self) -> None:
        self._reducer.drain()
        for bucket in self.buckets:
            bucket.ready = 0
            bucket.launched = False

    # -- step -------------------------------------------------------------------------------------
    def grad_norm_sq(self) -> torch.Tensor:
        if self.topo.mp_world_size > 1:
            by_name = dict(self.named_params)
            pieces = []
            for b in self.buckets:
                for s in shard_segments(b.splan, self.topo.dp_rank):
                    grad = self._shard_grad(b)  # a sparse table's values: its bucket holds one segment
                    if id(b) not in self._sparse_tables:
                        grad = grad[s.shard_offset:s.shard_offset + s.length]
                    pieces.append((grad, by_name[s.slot.name]))
            return self._model_parallel_norm_sq(pieces)
        sq = [torch.linalg.vector_norm(self._shard_grad(b), dtype=torch.float32) ** 2 for b in self.buckets]
        total = torch.stack(sq).sum() if sq else self.zero_norm()
        all_reduce(total, group=self.topo.dp_group)  # one collective: the global norm, and any overflow
        return total

    def sparse_grad_masters(self) -> list[tuple[str, torch.Tensor]]:
        return [(t.name, b.master) for b in self.buckets if (t := self._sparse_tables.get(id(b))) is not None]

    def _shard_grad(self, b: ShardedBucket) -> torch.Tensor:
        """This rank's reduced gradient elements of bucket ``b`` (a sparse table's stored values)."""
        table = self._sparse_tables.get(id(b))
        return b.grad_shard if table is None else table.values()

    def grad_pieces(self) -> list[tuple[str, int, torch.Tensor]]:
        for t in self._sparse_tables.values():
            raise NotImplementedError(f"embedding '{t.name}' (sparse=True) has a sparse gradient; the pipeline "
                                      "engine needs dense ones: build it with sparse=False")
        return [(s.slot.name, s.param_offset, b.grad_shard[s.shard_offset:s.shard_offset + s.length])
                for b in self.buckets for s in shard_segments(b.splan, self.topo.dp_rank)]

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        for b in self.buckets:
            b.grad_shard.mul_(factor)
        for t in self._sparse_tables.values():
            t.values().mul_(factor)

    def link_grads(self) -> None:
        for b in self.buckets:
            table = self._sparse_tables.get(id(b))
            b.master.grad = b.grad_shard if table is None else table.grad

    @torch.no_grad()
    def after_step(self) -> None:
        """Rebuild every rank's full parameters from the updated shards, in place. Stage 2's pool of
        temporary buckets is emptied: at rest a rank holds its shards and the parameters only.

        [Note: gathers overlap the next forward] With ``overlap_comm: true`` the all-gathers are
        started here, first-used bucket first, and each module's forward pre-hook waits only for
        the buckets holding its own parameters (and those declared with
        ``register_external_parameter``); the root's forward post-hook and ``state_dict()`` wait
        for all of them. Otherwise they complete before ``step()`` returns."""
        self.wait_params()
        self._pool.clear()
        in_flight = 0
        world, group = self.topo.dp_world_size, self.topo.dp_group
        for i in reversed(range(len(self.buckets))):  # buckets run in reverse registration order
            b = self.buckets[i]
            shard = b.param_buffer[b.lo:b.hi]
            if not b.master_is_view and not self.masters_published_elsewhere:
                shard.copy_(b.master)
            table = self._sparse_tables.get(id(b))
            if table is not None and table.unused:
                continue  # no rank's table had a gradient: the optimizer skipped it, nothing changed
            if table is not None and table.rows is not None and self._lazy_rows:
                self._publish_rows(b, table.rows)
                continue
            if in_flight + b.splan.padded > self.opts.allgather_numel and self._gathers:
                self.wait_params()  # bound what is in flight (allgather_bucket_size)
                in_flight = 0
            if self.opts.allgather_partitions:
                handles = [all_gather(b.param_buffer, shard, group=group, async_op=True)]
            else:  # DeepSpeed's allgather_partitions: false: every rank broadcasts its own shard
                handles = [broadcast(b.param_buffer[slice(*b.splan.shard_range(r))], src=get_global_rank(group, r),
                                     group=group, async_op=True) for r in range(world)]
            self._gathers[i] = handles
            in_flight += b.splan.padded
        if not self.opts.overlap_param_gather:
            self.wait_params()

    @torch.no_grad()
    def _publish_rows(self, b: ShardedBucket, rows: torch.Tensor) -> None:
        """[Note: lazy updates publish their rows] A sparse=True table stepped lazily changed only
        the rows of its reduced gradient, which every rank knows: rather than all-gathering the
        whole table, each rank contributes its shard's elements of those rows (zeros elsewhere) to
        one all-reduce of rows x width, and every rank writes the sums back. x + 0 is exact, and the
        other rows are equal on every rank already (all were gathered or published before)."""
        slot = b.splan.plan.slots[0]
        table = b.param_buffer[:slot.numel].view(slot.shape[0], -1)
        width = table.shape[1]
        elems = rows.view(-1, 1) * width + torch.arange(width, device=rows.device)
        mine = (elems >= b.lo) & (elems < b.hi)
        # where, not a product: a non-finite value in another rank's copy of an element this rank
        # does not own would turn 0 * inf into NaN and poison the sum
        values = torch.where(mine, table.index_select(0, rows), 0.0)
        all_reduce_rows(values, group=self.topo.dp_group)
        table.index_copy_(0, rows, values)

    def wait_params(self, buckets: Iterable[int] | None = None) -> None:
        """Finish the parameter gathers of ``buckets`` (default: all)."""
        for i in list(self._gathers) if buckets is None else buckets:
            for h in self._gathers.pop(i, ()):
                h.wait()

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._gathers:
            self.wait_params(self._module_buckets[id(module)])

    def _root_post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.wait_params()

    def zero_grad(self) -> None:
        for t in self._sparse_tables.values():
            t.clear()
        for b in self.buckets:
            if id(b) in self._sparse_tables:
                b.master.grad = None
                continue
            if b.keep_full_grads:
                b.ensure_full().zero_()
            if not b.shard_in_full:
                b.grad_shard.zero_()
            b.shard_fresh = True
            for s, p in enumerate(b.params):
                p.grad = b.full_grad_view(s) if self.grads_in_module else None

    def state_bytes(self) -> dict[str, int]:
        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        out = {"parameters": 0, "gradients": 0, "master_parameters": 0}
        for b in self.buckets:
            out["parameters"] += nbytes(b.param_buffer)
            out["gradients"] += nbytes(b.grad_full) if b.keep_full_grads else 0
            out["gradients"] += 0 if b.shard_in_full else nbytes(b.grad_shard)
            out["master_parameters"] += 0 if b.master_is_view or self.masters_published_elsewhere else nbytes(b.master)
        # stage 2's reusable gradient buckets: at most reduce_bucket_size elements (BufferPool), 0 at rest
        out["temporary_buffers"] = self._pool.pooled_bytes()
        return out


def _moves_touched_rows_only(optimizer: Any) -> bool:
    """Whether a step from a sparse gradient changes only the rows it holds (Note: lazy updates
    publish their rows): Adam's sparse path (SparseAdam's update, optim/adam.py), SparseAdam,
    Adagrad, and SGD without momentum or weight decay (momentum would move rows seen before)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.SparseAdam, torch.optim.Adagrad)):
        return True
    if isinstance(optimizer, torch.optim.SGD):
        return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in optimizer.param_groups)
    return False


class Stage2Strategy(ShardedStrategy):
    keep_full_grads = False

    def begin_backward(self, boundary: bool) -> None:
        if self._no_sync:
            raise RuntimeError("no_sync() is not supported with ZeRO stage 2: gradients are partitioned, so every "
                               "micro-batch is reduced into this rank's shard; use stage 0 or 1 for no_sync()")
        self._boundary = boundary
        self._pending = True
        self.reduce_enabled = True  # every micro-batch: no rank keeps full gradients to accumulate into

    def finish_backward(self) -> None:
        self._launch_ready(flush=True)
        if not self._boundary:
            self._drain_all()  # free the temporary buckets before the next micro-batch

