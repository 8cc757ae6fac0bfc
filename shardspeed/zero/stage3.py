"""ZeRO stage 3: parameters, gradients and optimizer states all partitioned (per parameter, see
``param_shard.py``). A module's parameters exist in full only while it runs.

[Note: the life of a parameter]
- At rest a parameter's ``.data`` is an empty placeholder; this rank keeps its chunk in its unit's
  ``local`` buffer (compute dtype) and the fp32 master chunk (a view of ``local`` in fp32 training).
- A unit is the set of parameters first registered by one module. A forward pre-hook on every
  module that registers a unit's parameter (tied weights register in two) gathers the unit
  (all-gather, then one copy into each parameter's full tensor); the forward post-hook releases it
  when no running module needs it. Gathers are reference counted, so a module called twice or a
  parent holding its own parameters while children run is handled.
- For backward, the post-hook threads the module's outputs through an identity autograd function
  whose backward re-gathers the unit before the module's own backward runs. When every trainable
  parameter of a unit has accumulated its gradient (autograd sums all uses first), the unit is
  freed and its gradients are reduce-scattered into the fp32 gradient chunks (overlapping the rest
  of backward), in unit order so every rank issues the same collectives.
- Units at most ``stage3_param_persistence_threshold`` elements stay gathered.
- After the first step the order in which units were gathered is known; from then on the next
  units (up to ``stage3_prefetch_bucket_size`` elements, and never more than
  ``stage3_max_live_parameters`` gathered at once) are gathered asynchronously ahead of use,
  forward and backward.

[Note: optimizer in backward] With ``zero_optimization.optimizer_in_backward`` a unit's gradient
shard exists only from the launch of its reduce-scatter until the optimizer has stepped that unit's
master chunks, right after the reduction is retired, still inside backward. No rank then holds
gradient shards for the whole model: 12 bytes per parameter of model state instead of 16 with fp32
AdamW, which is what lets the largest models fit. The step is the same element-wise update, so
results equal the ordinary step; it needs what an ordinary step would know only after backward to
be absent: no clipping by the global norm, no fp16 overflow check, no gradient accumulation, and an
optimizer without whole-model reductions (LAMB/LARS); the engine checks these at initialize().
A parameter whose value is used after its own gradient is complete (a detached second use whose
backward comes later) would see the stepped value: such models need the ordinary step.
"""

from __future__ import annotations

from typing import Any

import torch

from shardspeed.comm import Handle, Topology, all_gather, all_reduce, reduce_scatter
from shardspeed.zero.param_shard import chunk_numel, local_chunk, valid_in_chunk
from shardspeed.zero.stage3_parts import (
    SavedParam,
    Stage3Options,
    register_external_parameter,
    unit_members,
    wrap_outputs,
)
from shardspeed.zero.strategy import OrderedReduction, Piece, Strategy, StrategyOptions

__all__ = ["Stage3Options", "Stage3Strategy", "register_external_parameter"]


class Unit:
    def __init__(self, index: int, names: list[str], params: list[torch.nn.Parameter], rank: int, world: int,
                 opts: StrategyOptions, persistent_threshold: int, lazy_grads: bool = False):
        self.index, self.names, self.params = index, names, params
        self.world = world
        self.shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in params]
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.chunks = [chunk_numel(n, world) for n in self.numels]
        self.offsets = [sum(self.chunks[:i]) for i in range(len(params))]
        self.shard_numel = sum(self.chunks)
        self.valid = [valid_in_chunk(n, world, rank) for n in self.numels]
        pieces = []
        for p in params:
            pre = getattr(p, "ds_chunk", None)  # built under zero.Init: only the chunk exists
            pieces.append(pre.float() if pre is not None else local_chunk(p.data.float(), rank, world))
        fp32 = torch.cat(pieces) if pieces else torch.zeros(0)
        self.master_is_view = opts.compute_dtype == torch.float32
        self.local = fp32 if self.master_is_view else fp32.to(opts.compute_dtype)
        self.master = fp32 if self.master_is_view else fp32.clone()
        self.master_chunks = [self.master[o:o + c] for o, c in zip(self.offsets, self.chunks, strict=True)]
        # optimizer in backward: a shard only between reduction and step (Note: optimizer in backward)
        self.grad_shard: torch.Tensor | None = None
        if not lazy_grads:
            self.attach_grads(torch.zeros(self.shard_numel, dtype=torch.float32, device=self.local.device))
        self.trainable = sum(1 for p in params if p.requires_grad)
        self.persistent = sum(self.numels) <= persistent_threshold
        self.refs = 0
        self.in_backward = False
        self.gathered = False
        self.pending: tuple[torch.Tensor, Handle] | None = None
        self.grad_in: torch.Tensor | None = None
        self.written: list[bool] = []  # which parameters' gradients are in grad_in this backward
        self.accumulated = 0
        self.launched = False
        self.shard_fresh = True
        for p in params:
            for attr in ("ds_chunk",):
                if hasattr(p, attr):
                    delattr(p, attr)


    def attach_grads(self, shard: torch.Tensor) -> None:
        """``shard`` becomes this unit's gradient shard, seen by the optimizer through its master chunks."""
        self.grad_shard = shard
        for m, o, c in zip(self.master_chunks, self.offsets, self.chunks, strict=True):
            m.grad = shard[o:o + c]

    def detach_grads(self) -> None:
        self.grad_shard = None
        for m in self.master_chunks:
            m.grad = None

    def complete(self) -> bool:
        """Every trainable parameter has accumulated its gradient in this backward."""
        return self.accumulated >= self.trainable


class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs; its backward gathers the module's units first."""

    @staticmethod
    def forward(ctx: Any, strategy: Stage3Strategy, units: tuple[int, ...], *tensors: torch.Tensor) -> Any:
        ctx.strategy, ctx.units = strategy, units
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.strategy._pre_backward(ctx.units)
        return (None, None, *grads)


class Stage3Strategy(OrderedReduction, Strategy):
    def __init__(self, module: torch.nn.Module, topo: Topology, opts: StrategyOptions,
                 groups: list[list[torch.nn.Parameter]], z3: Stage3Options):
        super().__init__(module, topo, opts)
        self.z3 = z3
        self.world, self.rank, self.group = topo.dp_world_size, topo.dp_rank, topo.dp_group
        self.groups = groups
        self.units: list[Unit] = []
        self.unit_of: dict[int, tuple[int, int]] = {}  # id(param) -> (unit, position)
        self.module_units: dict[int, tuple[int, ...]] = {}
        self._by_storage: dict[int, list[torch.nn.Parameter]] = {}  # gathered parameters by storage
        self._peak_transient = 0
        # kept up to date at each gather, release and buffer allocation, so the hot path never walks
        # every unit: elements gathered or in flight, and bytes beyond the shards by kind
        self._live = 0
        self._held = {"parameters": 0, "in_flight": 0, "gradient_buffers": 0, "gradient_shards": 0}
        self.steps_in_backward = z3.optimizer_in_backward
        self._optimizer: Any = None
        self._grad_pool: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        created = unit_members(module, z3)
        # reverse registration order: roughly the order backward finishes units in
        root_unit: dict[int, int] = {}
        for root, members in reversed(created):
            u = Unit(len(self.units), [n for n, _ in members], [p for _, p in members], self.rank, self.world,
                     opts, z3.persistence_threshold, lazy_grads=z3.optimizer_in_backward)
            for pos, (_, p) in enumerate(members):
                self.unit_of[id(p)] = (u.index, pos)
                p._shardspeed_z3 = (self, u.index)  # for GatheredParameters
            root_unit[id(root)] = u.index
            self.units.append(u)
        for m in module.modules():
            used = list(m.parameters(recurse=False)) + list(getattr(m, "_shardspeed_external", []))
            ids = sorted({self.unit_of[id(p)][0] for p in used} | ({root_unit[id(m)]} if id(m) in root_unit else set()))
            if ids:
                self.module_units[id(m)] = tuple(ids)
                m.register_forward_pre_hook(self._pre_forward)
                m.register_forward_hook(self._post_forward)
        self._placeholder = torch.empty(0, dtype=opts.compute_dtype, device=self.units[0].local.device
                                        if self.units else None)
        for u in self.units:
            if u.persistent:
                self._gather_now(u)
            else:
                self._free(u)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in self.named_params]
        # state_dict() gives full tensors, never placeholders: gather everything around it (a collective)
        self._sd_units: list[Unit] = []
        module.register_state_dict_pre_hook(self._state_dict_pre)
        # torch tags the hook object it is given, which a bound method cannot carry: wrap it
        module.register_state_dict_post_hook(lambda *a: self._state_dict_post(*a))
        self._inflight: list[tuple[Unit, Handle, torch.Tensor]] = []
        self._boundary = True
        self._trace: list[int] = []
        self._trace_done = False
        self._after_in_trace: list[int] = []  # parameters gathered after each trace position
        self._position: dict[int, int] = {}
        self._deferred: list[Unit] = []

    # -- what autograd keeps ----------------------------------------------------------------------
    def forward_context(self) -> Any:
        """[Note: saved parameters] Autograd saves the weights a backward needs (``weight.t()``
        for a Linear): a view that would keep the full gathered tensor alive after the unit is
        released, i.e. the whole model resident by the end of forward. Inside this context a
        saved tensor that aliases a gathered parameter is kept as a recipe (the parameter and the
        view's geometry) and rebuilt from the re-gathered parameter when backward unpacks it."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._by_storage or t.layout != torch.strided:
            return t
        ptr = t.untyped_storage().data_ptr()
        owners = self._by_storage.get(ptr)
        if not owners:
            return t
        for p in owners:
            start = p.data.storage_offset()
            if (p.data.untyped_storage().data_ptr() == ptr and p.data.dtype == t.dtype
                    and start <= t.storage_offset() < start + max(p.data.numel(), 1)):
                return SavedParam(p, tuple(t.shape), t.stride(), t.storage_offset() - start)
        return t

    def _unpack(self, x: Any) -> torch.Tensor:
        if not isinstance(x, SavedParam):
            return x
        p = x.param
        if p.data.numel() == 0:  # not gathered (a backward outside the usual order): gather its unit
            self._gather_now(self.units[self.unit_of[id(p)][0]])
        return p.data.as_strided(x.shape, x.stride, p.data.storage_offset() + x.offset)

    # -- gather / free ----------------------------------------------------------------------------
    def _start_gather(self, u: Unit) -> None:
        if u.gathered or u.pending is not None:
            return
        buf = torch.empty(self.world * u.shard_numel, dtype=u.local.dtype, device=u.local.device)
        u.pending = (buf, all_gather(buf, u.local, group=self.group, async_op=True))
        self._live += sum(u.numels)
        self._held["in_flight"] += buf.numel() * buf.element_size()
        self._note_peak()

    def _gather_now(self, u: Unit) -> None:
        if u.gathered:
            return
        self._start_gather(u)
        buf, handle = u.pending
        handle.wait()
        u.pending = None
        self._held["in_flight"] -= buf.numel() * buf.element_size()
        if not u.persistent:
            self._held["parameters"] += sum(u.numels) * buf.element_size()
        rows = buf.view(self.world, u.shard_numel)
        with torch.no_grad():
            for p, o, c, n, shape in zip(u.params, u.offsets, u.chunks, u.numels, u.shapes, strict=True):
                # the column block is strided, so reshape copies it out once; the gather buffer is then freed
                self._forget_storage(p)  # a persistent unit refreshed after step() replaces live data
                p.data = rows[:, o:o + c].reshape(-1)[:n].view(shape) if self.world > 1 else buf[o:o + n].view(shape)
                self._by_storage.setdefault(p.data.untyped_storage().data_ptr(), []).append(p)
        u.gathered = True
        # while the copies out of it exist the gather buffer is still alive
        copied = buf.numel() * buf.element_size() if self.world > 1 and len(u.params) > 1 else 0
        self._peak_transient = max(self._peak_transient, self._transient_bytes() + copied)

    def _forget_storage(self, p: torch.nn.Parameter) -> None:
        ptr = p.data.untyped_storage().data_ptr()
        owners = [q for q in self._by_storage.get(ptr, []) if q is not p]
        if owners:
            self._by_storage[ptr] = owners
        else:
            self._by_storage.pop(ptr, None)

    def _free(self, u: Unit) -> None:
        if u.pending is not None:  # a prefetch nobody used: finish it so collectives stay matched
            buf, handle = u.pending
            handle.wait()
            u.pending = None
            self._held["in_flight"] -= buf.numel() * buf.element_size()
            self._live -= sum(u.numels)
        if u.gathered:
            self._live -= sum(u.numels)
            if not u.persistent:
                self._held["parameters"] -= sum(u.numels) * u.local.element_size()
        with torch.no_grad():
            for p in u.params:
                self._forget_storage(p)
                p.data = self._placeholder
        u.gathered = False

    def _live_numel(self) -> int:
        return self._live

    def _prefetch(self, after: int, step: int) -> None:
        """Start gathering the units that follow trace position ``after`` (step +1 forward, -1 backward)."""
        if not self._trace_done:
            return
        budget = self.z3.prefetch_numel
        i = after + step
        while 0 <= i < len(self._trace) and budget > 0:
            u = self.units[self._trace[i]]
            if not u.gathered and u.pending is None:
                if self._live_numel() + sum(u.numels) > self.z3.max_live_numel:
                    return
                self._start_gather(u)
            budget -= sum(u.numels)
            i += step

    # -- forward ----------------------------------------------------------------------------------
    def _release_deferred(self, keep: tuple[int, ...] = ()) -> None:
        for u in self._deferred:
            if u.index not in keep and u.gathered and u.refs == 0 and not u.persistent and not u.in_backward:
                self._free(u)
        self._deferred = []

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        self._release_deferred(keep=self.module_units[id(module)])
        for i in self.module_units[id(module)]:
            u = self.units[i]
            u.refs += 1
            if not self._trace_done and i not in self._position:
                self._position[i] = len(self._trace)
                self._trace.append(i)
            self._gather_now(u)
            if i in self._position:
                self._prefetch(self._position[i], +1)

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        ids = self.module_units[id(module)]
        grad = torch.is_grad_enabled()
        for i in ids:
            u = self.units[i]
            u.refs -= 1
            if u.refs == 0 and not u.persistent and not u.in_backward:
                # [Note: deferred release] with autograd on, the unit released last in forward is
                # the first backward needs: keep it until the next module starts (usually one
                # more unit of memory for no time at all) so backward does not gather it again
                if grad and self._reused_soon(u):
                    continue  # stays gathered for its backward (Note: reuse distance)
                if grad:
                    self._deferred.append(u)
                else:
                    self._free(u)
        if grad:
            return wrap_outputs(output, lambda ts: _PreBackward.apply(self, ids, *ts))
        return output

    def _reused_soon(self, u: Unit) -> bool:
        """[Note: reuse distance] Backward needs a unit again after the units that follow it in
        forward: if those hold at most ``stage3_max_reuse_distance`` parameters (as recorded in
        the first step's trace), releasing it now would only make backward gather it again. Kept
        units count against ``stage3_max_live_parameters``."""
        if not self._trace_done or u.index not in self._position or self.z3.max_reuse_distance <= 0:
            return False
        if self._after_in_trace[self._position[u.index]] > self.z3.max_reuse_distance:
            return False
        return self._live_numel() <= self.z3.max_live_numel

    # -- backward ---------------------------------------------------------------------------------
    def begin_backward(self, boundary: bool) -> None:
        if self._no_sync:
            raise RuntimeError("no_sync() is not supported with ZeRO stage 3: gradients are partitioned, so every "
                               "micro-batch is reduced into this rank's shard; use stage 0 or 1 for no_sync()")
        self._boundary = boundary
        self._pending = True
        self.reduce_enabled = True

    def _pre_backward(self, ids: tuple[int, ...]) -> None:
        self._deferred = []  # backward owns them now: freed when their gradients are complete
        for i in ids:
            u = self.units[i]
            u.in_backward = True
            self._gather_now(u)
        if ids and ids[0] in self._position:
            self._prefetch(min(self._position.get(i, 0) for i in ids), -1)

    def _on_grad(self, p: torch.Tensor) -> None:
        ui, pos = self.unit_of[id(p)]
        u = self.units[ui]
        if u.grad_in is None:
            u.grad_in = self._grad_buffer(u)
            u.written = [False] * len(u.params)
            self._note_peak()
        rows = u.grad_in.view(self.world, u.shard_numel)
        flat, c, o = p.grad.reshape(-1), u.chunks[pos], u.offsets[pos]
        first = not u.written[pos]
        u.written[pos] = True
        for r in range(self.world):
            lo, hi = r * c, min((r + 1) * c, flat.numel())
            if hi > lo:
                # the buffer comes uninitialised from the pool: the first gradient is copied in and
                # the padding zeroed, which is cheaper than zero-filling everything and adding
                (rows[r, o:o + hi - lo].copy_ if first else rows[r, o:o + hi - lo].add_)(flat[lo:hi])
            if first and hi - lo < c:
                rows[r, o + max(hi - lo, 0):o + c].zero_()
        p.grad = None
        if u.launched:
            raise RuntimeError(f"parameter '{u.names[pos]}' received a second gradient in one backward after its "
                               "unit was reduced; with activation checkpointing use the non-reentrant form")
        u.accumulated += 1
        if u.complete():
            u.in_backward = False
            if u.refs == 0 and not u.persistent:
                self._free(u)
            self._launch_ready()

    def _grad_buffer(self, u: Unit) -> torch.Tensor:
        """A full-size gradient buffer for ``u``, uninitialised (see _on_grad)."""
        key = (self.world * u.shard_numel, self.opts.grad_accum_dtype)
        free = self._grad_pool.get(key)
        if free:
            return free.pop()
        self._held["gradient_buffers"] += key[0] * torch.tensor([], dtype=key[1]).element_size()
        return torch.empty(key[0], dtype=key[1], device=u.local.device)

    def _reduction_units(self) -> list[Unit]:
        return self.units

    def _launch(self, u: Unit) -> None:
        if not u.trainable:  # frozen parameters only: nothing to reduce
            return
        u.launched = True
        o = self.opts
        if u.grad_in is None:  # no gradient reached it: still join the collective, with zeros
            u.grad_in = self._grad_buffer(u)
            u.written = [False] * len(u.params)
        rows = u.grad_in.view(self.world, u.shard_numel)
        for pos, done in enumerate(u.written):
            if not done:  # a parameter that got no gradient this backward contributes zeros
                rows[:, u.offsets[pos]:u.offsets[pos] + u.chunks[pos]].zero_()
        wire = u.grad_in if o.reduce_dtype == u.grad_in.dtype else u.grad_in.to(o.reduce_dtype)
        if o.prescale and o.predivide_factor != 1.0:
            wire.div_(o.predivide_factor)
        if u.grad_shard is None:  # optimizer in backward: this unit's shard lives until its step
            fp32 = wire.dtype == torch.float32  # written whole by the reduce-scatter, else summed into
            shard = (torch.empty if fp32 else torch.zeros)(u.shard_numel, dtype=torch.float32, device=wire.device)
            u.grad_shard, u.shard_fresh = shard, True
            self._held["gradient_shards"] += shard.numel() * 4
        direct = u.shard_fresh and wire.dtype == torch.float32
        out = u.grad_shard if direct else wire.new_empty(u.shard_numel)
        self._inflight.append((u, reduce_scatter(out, wire, group=self.group, async_op=o.overlap), out))
        # [Note: bounded reduction memory] each launched unit holds a full-size gradient buffer
        # until its reduce-scatter is done; retire the oldest once more than reduce_bucket_size
        # elements are in flight, or every unit's full gradients would be alive at the end of
        # backward (4 bytes per parameter of the whole model, not of this rank's shard)
        while len(self._inflight) > 1 and sum(e[2].numel() * self.world for e in self._inflight) > o.bucket_numel:
            self._retire(self._inflight.pop(0))

    def finish_backward(self) -> None:
        self._launch_ready(flush=True)
        for u in self.units:
            u.in_backward = False
            if u.gathered and u.refs == 0 and not u.persistent:
                self._free(u)
        if not self._trace_done and self._trace:
            self._trace_done = True
            sizes = [sum(self.units[i].numels) for i in self._trace]
            self._after_in_trace = [sum(sizes[k + 1:]) for k in range(len(sizes))]
        if not self._boundary:
            self._drain_all()

    def _retire(self, entry: tuple[Unit, Handle, torch.Tensor]) -> None:
        """Wait for one unit's reduce-scatter, average into its gradient shard, drop the buffer."""
        u, handle, out = entry
        o = self.opts
        post = self.world / (o.predivide_factor if o.prescale else 1.0)
        handle.wait()
        if out is u.grad_shard:
            out.div_(post)
        else:
            u.grad_shard.add_(out.to(torch.float32), alpha=1.0 / post)
        u.shard_fresh = False
        # reused by the next unit of this size in this backward; the pool is emptied by step()
        self._grad_pool.setdefault((u.grad_in.numel(), u.grad_in.dtype), []).append(u.grad_in)
        u.grad_in = None
        if self.steps_in_backward:
            self._step_unit(u)

    @torch.no_grad()
    def _step_unit(self, u: Unit) -> None:
        """Step ``u``'s master chunks now and drop its gradient shard. Only this unit's chunks carry
        gradients while the optimizer runs (others get theirs here, in turn), so a torch optimizer,
        which skips parameters without one, updates exactly these."""
        if self._optimizer is None:
            raise RuntimeError("zero_optimization.optimizer_in_backward needs the optimizer at initialize(): "
                               "pass optimizer=... or add an 'optimizer' section to the config")
        shard = u.grad_shard
        u.attach_grads(shard)
        self._optimizer.step()
        u.detach_grads()
        u.shard_fresh = True
        self._held["gradient_shards"] -= shard.numel() * 4

    def _drain(self) -> None:
        for entry in self._inflight:
            self._retire(entry)
        self._inflight.clear()
        for u in self.units:
            u.accumulated = 0
            u.launched = False

    replicated = False

    def checkpointed_names(self) -> set[str]:
        return {n for u in self.units for n in u.names}

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: shape for u in self.units for n, shape in zip(u.names, u.shapes, strict=True)}

    def owned_pieces(self) -> list[Piece]:
        """Frozen parameters too: under stage 3 they exist only as chunks."""
        out = []
        for u in self.units:
            for name, m, c, valid in zip(u.names, u.master_chunks, u.chunks, u.valid, strict=True):
                if valid:
                    out.append(Piece(name, self.rank * c, valid, m, 0))
        return out

    # -- optimizer and step -----------------------------------------------------------------------
    def master_for(self, param: torch.nn.Parameter) -> torch.Tensor:
        ui, pos = self.unit_of[id(param)]
        return self.units[ui].master_chunks[pos]

    def attach_optimizer(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        if not hasattr(optimizer, "set_partition"):
            return
        index = {id(p): i for i, (_, p) in enumerate(self.named_params)}
        segments = {}
        for u in self.units:
            for p, m, valid in zip(u.params, u.master_chunks, u.valid, strict=True):
                if id(p) in index:
                    segments[id(m)] = [(index[id(p)], 0, valid)] if valid else []
        group = self.group

        def reduce_sum(v: torch.Tensor) -> torch.Tensor:
            all_reduce(v, group=group)
            return v

        optimizer.set_partition(segments, len(self.named_params), reduce_sum)

    def grad_norm_sq(self) -> torch.Tensor:
        if self.topo.mp_world_size > 1:
            return self._model_parallel_norm_sq([(m.grad, p) for u in self.units
                                                 for p, m in zip(u.params, u.master_chunks, strict=True)])
        sq = [torch.linalg.vector_norm(u.grad_shard, dtype=torch.float32) ** 2 for u in self.units
              if u.grad_shard is not None]
        total = torch.stack(sq).sum() if sq else torch.zeros(())
        all_reduce(total, group=self.group)  # one collective: the global norm, and any overflow
        return total

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        for u in self.units:
            if u.grad_shard is not None:
                u.grad_shard.mul_(factor)

    @torch.no_grad()
    def after_step(self) -> None:
        self._release_deferred()
        # at rest stage 3 holds shards only (every buffer is back in the pool once reductions drained)
        self._held["gradient_buffers"] -= sum(t.numel() * t.element_size() for ts in self._grad_pool.values()
                                              for t in ts)
        self._grad_pool.clear()
        for u in self.units:
            if not u.master_is_view:
                u.local.copy_(u.master)
            if u.gathered and u.refs == 0 and not u.persistent:  # would hold pre-step values
                self._free(u)
            if u.persistent:  # kept whole: refresh from the updated chunks now
                self._free(u)
                self._gather_now(u)

    def zero_grad(self) -> None:
        for u in self.units:
            if u.grad_shard is not None:
                u.grad_shard.zero_()
            u.shard_fresh = True
        for _, p in self.named_params:
            p.grad = None

    def _transient_bytes(self) -> int:
        """Bytes held beyond the shards right now: gathered parameters (persistent ones excluded),
        gathers in flight, full-size gradient buffers (in use or pooled)."""
        return sum(self._held.values())

    def _note_peak(self) -> None:
        self._peak_transient = max(self._peak_transient, self._transient_bytes())

    def state_bytes(self) -> dict[str, int]:
        out = {"parameters": 0, "gradients": 0, "master_parameters": 0}
        for u in self.units:
            out["parameters"] += u.local.numel() * u.local.element_size()
            out["gradients"] += 0 if u.grad_shard is None else u.grad_shard.numel() * 4
            out["master_parameters"] += 0 if u.master_is_view else u.master.numel() * 4
        out["peak_transient"] = self._peak_transient  # not model state at rest: the high-water mark
        out["transient"] = self._transient_bytes()  # now; 0 at rest between steps
        return out

    # -- full parameters on demand ----------------------------------------------------------------
    def _state_dict_pre(self, module: Any, prefix: str, keep_vars: bool) -> None:
        self._sd_units = self.acquire([p for u in self.units for p in u.params])

    def _state_dict_post(self, module: Any, state_dict: Any, prefix: str, local_metadata: Any) -> None:
        units, self._sd_units = self._sd_units, []
        self.release(units, modified=False)

    def acquire(self, params: list[torch.nn.Parameter]) -> list[Unit]:
        units = sorted({self.unit_of[id(p)][0] for p in params})
        for i in units:
            self.units[i].refs += 1
            self._gather_now(self.units[i])
        return [self.units[i] for i in units]

    def release(self, units: list[Unit], modified: bool) -> None:
        """Drop a hold on ``units``; ``modified``: their full values changed and are re-partitioned."""
        with torch.no_grad():
            for u in units:
                if modified:
                    fresh = torch.cat([local_chunk(p.data.float(), self.rank, self.world) for p in u.params])
                    u.master.copy_(fresh)
                    if not u.master_is_view:
                        u.local.copy_(fresh)
                u.refs -= 1
                if u.refs == 0 and not u.persistent:
                    self._free(u)
