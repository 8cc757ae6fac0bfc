"""ZeRO stage 3: parameters, gradients and optimizer states all partitioned (per unit, see
``unit_layout.py``). A module's parameters exist in full only while it runs.

[Note: the life of a parameter]
- At rest a parameter's ``.data`` is an empty placeholder; this rank keeps its shard of the unit's
  flat form in the unit's ``local`` buffer (compute dtype), and the fp32 master (the same tensor in
  fp32 training, where its piece of each parameter is a view of it; a separate tensor per piece
  otherwise: Note: master chunks own their storage).
- A unit is the set of parameters first registered by one module (or one entry of a ModuleList).
  A forward pre-hook on every module that registers a unit's parameter (tied weights register in
  two) gathers the unit: one all-gather, whose output buffer every parameter then views (no copy);
  the forward post-hook releases it when no running module needs it. Gathers are reference
  counted (a module called twice, a parent holding its own parameters while children run); a
  module whose units a running forward holds skips both hooks (Note: nested modules).
- For backward, the post-hook registers a gradient hook on the module's outputs that re-gathers
  the unit before the module's own backward runs (Note: pre-backward without touching outputs).
  When every trainable parameter of a unit has accumulated its gradient (autograd sums all uses
  first), the unit is freed and its gradients (copied end to end into one flat buffer) are
  reduce-scattered into the fp32 gradient shard (overlapping the rest of backward), in unit order
  so every rank issues the same collectives.
- Units at most ``stage3_param_persistence_threshold`` elements stay gathered.
- After the first step the order in which units were gathered is known; from then on the next
  units (up to the prefetch window, ``stage3_prefetch_bucket_size`` or, unset, an eighth of the
  model: Note: default windows; never more than ``stage3_max_live_parameters`` gathered at once)
  are gathered asynchronously ahead of use, forward and backward.

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

from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from shardspeed.comm import Topology, all_gather, all_reduce
from shardspeed.zero.init_touch import gather_chunks
from shardspeed.zero.reducer import BufferPool, GradientReducer, zero_unwritten
from shardspeed.zero.stage3_parts import (
    Stage3Options,
    grad_tensors,
    register_external_parameter,
    unit_members,
)
from shardspeed.zero.stage3_saved import SavedUnits
from shardspeed.zero.stage3_unit import Unit, mark_masters_on_tier, unit_subgroups, units_state_bytes
from shardspeed.zero.strategy import OrderedReduction, Piece, Strategy, StrategyOptions
from shardspeed.zero.swap_params import ParamTier, make_param_tier

__all__ = ["Stage3Options", "Stage3Strategy", "register_external_parameter"]


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
        self._own: dict[int, tuple[torch.nn.Parameter, ...]] = {}  # a hooked module's own parameters
        self._saved = SavedUnits(self._gather_now)  # what autograd keeps of gathered parameters
        self._peak_transient = 0
        self._peak_gathered = 0  # the most parameter bytes gathered or being gathered at once
        # kept up to date at each gather, release and buffer allocation, so the hot path never walks
        # every unit: elements gathered or in flight, and bytes beyond the shards by kind
        self._live = 0
        self._held = {"parameters": 0, "in_flight": 0, "gradient_buffers": 0, "gradient_shards": 0}
        self.steps_in_backward = z3.optimizer_in_backward
        self._optimizer: Any = None
        # full-size gradient buffers, one per unit between being filled and reduced
        self._reducer = GradientReducer(opts, topo.dp_group, topo.dp_world_size, bound=opts.bucket_numel)
        self._pool = BufferPool(cap_numel=opts.bucket_numel, before_take=self._reducer.make_room)
        created = unit_members(module, z3)
        # offload_param: non-persistent shards go to disk as their units are built (swap_params.py,
        # Note: parameter shards on disk)
        self.param_tier: ParamTier | None = None
        if z3.param_offload is not None:
            numel = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for _, ms in created for _, p in ms)
            self.param_tier = make_param_tier(numel, opts.compute_dtype, self.world, z3.param_offload)
        # reverse registration order: roughly the order backward finishes units in
        root_unit: dict[int, int] = {}
        for root, members in reversed(created):
            u = Unit(len(self.units), [n for n, _ in members], [p for _, p in members], self.rank, self.world,
                     opts, z3.persistence_threshold, self._full_flat, lazy_grads=z3.optimizer_in_backward,
                     separate_master=z3.param_offload is not None)
            for pos, (_, p) in enumerate(members):
                self.unit_of[id(p)] = (u.index, pos)
                p._shardspeed_z3 = (self, u.index)  # for GatheredParameters
            root_unit[id(root)] = u.index
            self.units.append(u)
            if self.param_tier is not None and not u.persistent:
                self.param_tier.add(u)
        for m in module.modules():
            used = list(m.parameters(recurse=False)) + list(getattr(m, "_shardspeed_external", []))
            ids = sorted({self.unit_of[id(p)][0] for p in used} | ({root_unit[id(m)]} if id(m) in root_unit else set()))
            if ids:
                self.module_units[id(m)] = tuple(ids)
                self._own[id(m)] = tuple(m.parameters(recurse=False))
                # first among the module's pre-hooks (another's may read the parameters, or raise: ours
                # has pushed its frame by then); always_call: a forward that raises still releases
                m.register_forward_pre_hook(self._pre_forward, prepend=True)
                m.register_forward_hook(self._post_forward, always_call=True)
        # per running hooked forward: (module, nested, units it took) (Note: nested modules)
        self._frames: list[tuple[int, bool, list[int]]] = []
        # [Note: default windows] DeepSpeed's default prefetch window (5e7 elements) is sized for models
        # of billions of parameters; on a 50M-parameter model it is the whole model, gathered at once.
        # Unset, the window is an eighth of the model (at least its largest unit, at most 5e7): a few
        # units ahead, never the model. The reuse distance defaults to the window (Note: reuse distance).
        sizes = [sum(u.numels) for u in self.units] or [0]
        self.prefetch_numel = (z3.prefetch_numel if z3.prefetch_numel is not None
                               else min(50_000_000, max(max(sizes), sum(sizes) // 8)))
        self.reuse_distance = z3.max_reuse_distance if z3.max_reuse_distance is not None else self.prefetch_numel
        self._placeholder = torch.empty(0, dtype=opts.compute_dtype, device=self.units[0].local.device
                                        if self.units else None)
        for u in self.units:
            if u.persistent:
                self._gather_now(u)
            else:
                self._free(u)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in self.named_params]
        # a gradient's unit gathered even where no module hook saw it coming (Note: nested modules)
        self._hooks += [p.register_hook(partial(self._before_grad, self.unit_of[id(p)][0]))
                        for _, p in self.named_params]
        # state_dict() gives full tensors, never placeholders: gather everything around it (a collective)
        self._sd_units: list[Unit] = []
        module.register_state_dict_pre_hook(self._state_dict_pre)
        # torch tags the hook object it is given, which a bound method cannot carry: wrap it
        module.register_state_dict_post_hook(lambda *a: self._state_dict_post(*a))
        self._boundary = True
        self._trace: list[int] = []
        self._trace_done = False
        self._after_in_trace: list[int] = []  # parameters gathered after each trace position
        self._position: dict[int, int] = {}
        self._deferred: list[Unit] = []

    @torch.no_grad()
    def _full_flat(self, p: torch.nn.Parameter) -> torch.Tensor:
        """``p`` whole and flat, in fp32; under zero.Init gathered once from its chunks (param_shard.py)
        on the engine's device, where the placeholders are (a model built with remote_device="cpu")."""
        if getattr(p, "ds_chunk", None) is None:
            return p.data.reshape(-1).float()
        return gather_chunks(p, self.group, self.world, p.device).reshape(-1).float()

    def forward_context(self) -> Any:
        return self._saved.context()  # Note: saved parameters (stage3_saved.py)

    # -- gather / free ----------------------------------------------------------------------------
    def _start_gather(self, u: Unit) -> None:
        if u.gathered or u.pending is not None:
            return
        buf = torch.empty(self.world * u.shard_numel, dtype=u.local.dtype, device=u.local.device)
        local = self.param_tier.acquire(u) if self._tiered(u) else u.local
        u.pending = (buf, all_gather(buf, local, group=self.group, async_op=True))
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
        if self._tiered(u):
            self.param_tier.release(u)
        self._held["in_flight"] -= buf.numel() * buf.element_size()
        if not u.persistent:
            self._held["parameters"] += buf.numel() * buf.element_size()
        with torch.no_grad():
            for p, o, n, shape in zip(u.params, u.layout.offsets, u.numels, u.shapes, strict=True):
                # the gather buffer is the flat form (Note: flat units): parameters are views of it
                p.data = buf[o:o + n].view(shape)
        u.buffer = buf
        self._saved.add(u)
        u.gathered = True
        self._note_peak()

    def _free(self, u: Unit) -> None:
        if u.pending is not None:  # a prefetch nobody used: finish it so collectives stay matched
            buf, handle = u.pending
            handle.wait()
            u.pending = None
            if self._tiered(u):
                self.param_tier.release(u)
            self._held["in_flight"] -= buf.numel() * buf.element_size()
            self._live -= sum(u.numels)
        if u.gathered:
            self._live -= sum(u.numels)
            if not u.persistent:
                self._held["parameters"] -= u.full_numel * u.local.element_size()
        if u.buffer is not None:
            self._saved.remove(u)
            u.buffer = None
        with torch.no_grad():
            for p in u.params:
                p.data = self._placeholder
        u.gathered = False

    def _live_numel(self) -> int:
        return self._live

    def _tiered(self, u: Unit) -> bool:
        return self.param_tier is not None and u.index in self.param_tier.units

    def _prefetch(self, after: int, step: int) -> None:
        """Start gathering the units that follow trace position ``after`` (step +1 forward, -1 backward)."""
        if not self._trace_done:
            return
        budget = self.prefetch_numel
        i = after + step
        while 0 <= i < len(self._trace) and budget > 0:
            u = self.units[self._trace[i]]
            if not u.gathered and u.pending is None:
                if self._live_numel() + sum(u.numels) > self.z3.max_live_numel:
                    break
                self._start_gather(u)
            budget -= sum(u.numels)
            i += step
        if self.param_tier is not None:  # disk reads run further ahead than the gathers
            while 0 <= i < len(self._trace):
                u = self.units[self._trace[i]]
                if not u.gathered and u.pending is None and not self.param_tier.fetch(u):
                    break
                i += step

    # -- forward ----------------------------------------------------------------------------------
    def _release_deferred(self, keep: tuple[int, ...] = ()) -> None:
        for u in self._deferred:
            if u.index not in keep and u.gathered and u.refs == 0 and not u.persistent and not u.in_backward:
                self._free(u)
        self._deferred = []

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        ids = self.module_units[id(module)]
        # [Note: nested modules] A module whose units are all held by a running forward (a Block's
        # Linear and LayerNorm children, inside the Block's unit) has nothing to gather, prefetch or
        # trace, and the holder's pre-backward hook covers its backward: one hooked call per unit, not
        # per module (GPT-2 small: 16 units, 88 modules), each ~0.1 ms of host time a GPU waits on. If
        # its output bypasses the holder's (an auxiliary output kept aside), backward still gathers the
        # unit when it unpacks a saved parameter (SavedUnits) and before a gradient reaches a parameter
        # (_before_grad: autograd checks it against the full shape). A module with a frozen parameter
        # is never nested: its backward may come after the unit's gradients are complete and the unit
        # released (a frozen base before trainable adapters). Not covered: an aside output whose
        # backward reads a trainable weight kept outside saved tensors (``ctx.w = w``).
        nested = all(self.units[i].refs > 0 for i in ids) and all(p.requires_grad for p in self._own[id(module)])
        taken: list[int] = []
        self._frames.append((id(module), nested, taken))
        if nested:
            if self._deferred:
                self._release_deferred(keep=ids)
            return
        self._release_deferred(keep=ids)
        for i in ids:
            u = self.units[i]
            u.refs += 1
            taken.append(i)  # released by the post-hook even if a later gather here raises
            if not self._trace_done and i not in self._position:
                self._position[i] = len(self._trace)
                self._trace.append(i)
            self._gather_now(u)
            if i in self._position:
                self._prefetch(self._position[i], +1)

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        # a frame is missing only when a global pre-hook raised before ours ran: nothing was taken then
        if not self._frames or self._frames[-1][0] != id(module):
            return None
        _, nested, taken = self._frames.pop()
        if nested:
            return None
        ids = self.module_units[id(module)]
        grad = torch.is_grad_enabled()
        for i in taken:
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
        tensors = grad_tensors(output) if grad else []
        if tensors:
            # [Note: pre-backward without touching outputs] a hook that fires when the first gradient
            # of any output arrives, i.e. before autograd enters this module's backward. Outputs are
            # returned as they are (same objects, same types): an identity autograd Function here
            # would return views, which in-place code after the module (ReLU(inplace=True),
            # ``out += identity`` in every ResNet) may not modify.
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda _g: self._pre_backward(ids), mode="any")
        return None

    def _reused_soon(self, u: Unit) -> bool:
        """[Note: reuse distance] Backward needs a unit again after the units that follow it in
        forward: if those hold at most ``stage3_max_reuse_distance`` parameters (as recorded in
        the first step's trace), releasing it now would only make backward gather it again. Kept
        units count against ``stage3_max_live_parameters``. Unset, the distance is the prefetch
        window: what backward's prefetch would gather right away anyway, so
        keeping it adds no memory beyond the prefetch window and saves its second all-gather."""
        if not self._trace_done or u.index not in self._position or self.reuse_distance <= 0:
            return False
        if self._after_in_trace[self._position[u.index]] > self.reuse_distance:
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

    def _before_grad(self, ui: int, grad: torch.Tensor) -> None:
        self._gather_now(self.units[ui])  # returns at once when gathered

    def _on_grad(self, p: torch.Tensor) -> None:
        ui, pos = self.unit_of[id(p)]
        u = self.units[ui]
        if u.grad_in is None:
            u.grad_in = self._grad_buffer(u)
            u.written = [False] * len(u.params)
            self._note_peak()
        o, n = u.layout.offsets[pos], u.numels[pos]
        dst = u.grad_in[o:o + n]
        # the buffer comes uninitialised from the pool: the first gradient is copied in (padding is
        # zeroed at launch), which is cheaper than zero-filling everything and adding
        if u.written[pos]:
            dst.add_(p.grad.reshape(-1))
        else:
            dst.copy_(p.grad.reshape(-1))
            u.written[pos] = True
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
        buf = self._pool.take(u.full_numel, self.opts.grad_accum_dtype, u.local.device)
        self._held["gradient_buffers"] = self._pool.allocated
        return buf

    def _reduction_units(self) -> list[Unit]:
        return self.units

    def _launch(self, u: Unit) -> None:
        if not u.trainable:  # frozen parameters only: nothing to reduce
            return
        u.launched = True
        if u.grad_in is None:  # no gradient reached it: still join the collective, with zeros
            u.grad_in = self._grad_buffer(u)
            u.written = [False] * len(u.params)
        # a parameter that got no gradient this backward contributes zeros; so do alignment and padding
        zero_unwritten(u.grad_in, [(o, o + n) for o, n in zip(u.layout.offsets, u.numels, strict=True)], u.written,
                       u.layout.gaps)
        if u.grad_shard is None:  # optimizer in backward: this unit's shard lives until its step
            # written whole by a reduce-scatter straight into it; else (a cast, or reduce_scatter: false, which
            # all-reduces and adds its part) the average is summed into it, so it must start at zero
            whole = self.opts.reduce_dtype == torch.float32 and self.opts.reduce_scatter
            shard = (torch.empty if whole else torch.zeros)(u.shard_numel, dtype=torch.float32, device=u.local.device)
            u.grad_shard, u.shard_fresh = shard, True
            self._held["gradient_shards"] += shard.numel() * 4
        self._reducer.add_shard(u.grad_in, u.grad_shard, self.rank * u.shard_numel, u.shard_fresh,
                                on_done=lambda: self._reduced(u))

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

    def _reduced(self, u: Unit) -> None:
        """``u``'s average is in its gradient shard: its buffer goes back to the pool (reused by the next
        unit of this size in this backward; emptied by step()), and with the optimizer in backward the
        unit steps now."""
        u.shard_fresh = False
        self._pool.give(u.grad_in)
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
        if self.unit_stepper is not None:  # optimizer state on disk: read, step, write back (swap_optimizer.py)
            self.unit_stepper(u.master_chunks)
        else:
            self._optimizer.step()
        u.detach_grads()
        u.shard_fresh = True
        self._held["gradient_shards"] -= shard.numel() * 4

    def _drain(self) -> None:
        self._reducer.drain()
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
            for name, m, (start, _, length) in zip(u.names, u.master_chunks, u.layout.pieces, strict=True):
                if length:
                    out.append(Piece(name, start, length, m, 0))
        return out

    # -- optimizer and step -----------------------------------------------------------------------
    def master_for(self, param: torch.nn.Parameter) -> torch.Tensor:
        ui, pos = self.unit_of[id(param)]
        return self.units[ui].master_chunks[pos]

    def master_copies(self) -> bool:
        return any(not u.master_is_view for u in self.units)

    def step_subgroups(self, masters: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
        return unit_subgroups(self.units, masters, size)

    @torch.no_grad()
    def publish_masters_of(self, masters: list[torch.Tensor]) -> None:
        unit_of_chunk = {id(m): u for u in self.units for m in u.master_chunks}
        self._publish(list(dict.fromkeys(unit_of_chunk[id(m)] for m in masters)))  # whole units (step_subgroups)

    @torch.no_grad()
    def _publish(self, units: list[Unit]) -> None:
        """The units' compute shards from their masters (nothing to do where the shard is the master):
        one multi-tensor copy for all of them in memory, not a copy (a kernel launch on a GPU) per piece."""
        dst, src = [], []
        for u in units:
            pieces = [(at, m) for m, (_, at, length) in zip(u.master_chunks, u.layout.pieces, strict=True) if length]
            if self._tiered(u):
                self.param_tier.store(u, pieces)
            elif not u.master_is_view:
                dst += [u.local[at:at + m.numel()] for at, m in pieces]
                src += [m for _, m in pieces]
        if dst:
            torch._foreach_copy_(dst, src)

    def drop_master_storage(self, masters: list[torch.Tensor]) -> None:
        mark_masters_on_tier(self.units, masters)

    def attach_optimizer(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        if not hasattr(optimizer, "set_partition"):
            return
        index = {id(p): i for i, (_, p) in enumerate(self.named_params)}
        segments = {}
        for u in self.units:
            for p, m, (_, _, length) in zip(u.params, u.master_chunks, u.layout.pieces, strict=True):
                if id(p) in index:
                    segments[id(m)] = [(index[id(p)], 0, length)] if length else []  # the whole chunk
        optimizer.set_partition(segments, len(self.named_params), self._norm_reducer(over_dp=True))

    def grad_norm_sq(self) -> torch.Tensor:
        if self.topo.mp_world_size > 1:
            return self._model_parallel_norm_sq([(m.grad, p) for u in self.units
                                                 for p, m in zip(u.params, u.master_chunks, strict=True)])
        sq = [torch.linalg.vector_norm(u.grad_shard, dtype=torch.float32) ** 2 for u in self.units
              if u.grad_shard is not None]
        total = torch.stack(sq).sum() if sq else self.zero_norm()
        all_reduce(total, group=self.group)  # one collective: the global norm, and any overflow
        return total

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        for u in self.units:
            if u.grad_shard is not None:
                u.grad_shard.mul_(factor)

    def link_grads(self) -> None:
        for u in self.units:
            if u.grad_shard is not None:
                u.attach_grads(u.grad_shard)

    @torch.no_grad()
    def after_step(self) -> None:
        self._release_deferred()
        # at rest stage 3 holds shards only (every buffer is back in the pool once reductions drained)
        self._pool.clear()
        self._held["gradient_buffers"] = self._pool.allocated
        if not self.masters_published_elsewhere:
            self._publish(self.units)
        for u in self.units:
            # a gathered unit, or one a backward prefetch left in flight, would hold pre-step values
            if (u.gathered or u.pending is not None) and u.refs == 0 and not u.persistent:
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
        self._peak_gathered = max(self._peak_gathered, self._held["parameters"] + self._held["in_flight"])

    def state_bytes(self) -> dict[str, int]:
        out = units_state_bytes(self.units, self.param_tier)
        out["peak_transient"] = self._peak_transient  # not model state at rest: the high-water mark
        out["peak_gathered"] = self._peak_gathered  # its gathered-parameter part
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
        resident = self.master_tier.all_resident() if modified and self.master_tier is not None else nullcontext()
        with torch.no_grad(), resident:
            for u in units:
                if modified:
                    for p, m, (start, _, length) in zip(u.params, u.master_chunks, u.layout.pieces, strict=True):
                        if length:
                            m.copy_(p.data.reshape(-1)[start:start + length])
                    self._publish([u])
                u.refs -= 1
                if u.refs == 0 and not u.persistent:
                    self._free(u)
