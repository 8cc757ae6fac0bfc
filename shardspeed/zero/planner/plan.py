"""Per-rank memory of a training step, by tier (device, host, disk), from the sizes the strategies
actually allocate. Stage by stage this mirrors zero/stage0.py, local.py, sharded.py and stage3.py.

[Note: what a plan counts] Three groups, each item on one tier:
- model states: parameters in the compute dtype, fp32 masters (none where they are views of the
  parameters: fp32 training at stages 1-3), optimizer state, gradients (buffers, shards);
- buffers: what a rank keeps beside them (stage 3's persistent small units, offload swap buffers);
- transients, by phase (forward, backward, step): gathered units and prefetches, borrowed gradient
  buckets and their pool, the gradient autograd computes for the largest parameter before a hook
  moves it, optimizer temporaries. The largest phase is the "largest transient"; the peak is model
  states + buffers + it. Activations, the data loader and the runtime itself are not counted: give
  the planner a model, not a batch.
Initialization is reported apart (``init``): stage 3 without zero.Init holds the whole model once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardspeed.zero.partition import plan_sharded_buckets
from shardspeed.zero.planner.items import TIERS, Item
from shardspeed.zero.planner.offload import OffloadLayout, apply_offload
from shardspeed.zero.planner.settings import PlanSettings
from shardspeed.zero.planner.spec import ModelSpec
from shardspeed.zero.planner.windows import ReductionPeak, gathered_peak, prefetch_budget, reduction_peak
from shardspeed.zero.unit_layout import flat_layout


@dataclass
class Plan:
    settings: PlanSettings
    spec: ModelSpec
    items: list[Item]
    notes: list[str] = field(default_factory=list)

    def total(self, group: str, tier: str) -> int:
        return sum(i.nbytes for i in self.items if i.group == group and i.tier == tier)

    def phases(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i in self.items:
            if i.group == "transient":
                out.setdefault(i.phase, dict.fromkeys(TIERS, 0))[i.tier] += i.nbytes
        return out

    def largest_transient(self) -> tuple[str, dict[str, int]]:
        """The phase holding the most memory (device + host) beyond states and buffers."""
        phases = self.phases()
        if not phases:
            return "", dict.fromkeys(TIERS, 0)
        name = max(phases, key=lambda p: phases[p]["device"] + phases[p]["host"])
        return name, phases[name]

    def steady(self, tier: str) -> int:
        return self.total("model states", tier) + self.total("buffers", tier)

    def peak(self, tier: str) -> int:
        return self.steady(tier) + self.largest_transient()[1][tier]

    def init_peak(self, tier: str) -> int:
        return self.total("init", tier)

    def memory_peak(self) -> int:
        """Device + host bytes at the peak of a step: one memory where the device is the CPU."""
        return self.peak("device") + self.peak("host")

    def peak_bytes_per_rank(self) -> dict[str, int]:
        return {t: max(self.peak(t), self.init_peak(t)) for t in TIERS}


def _state(role: str, what: str, nbytes: int) -> Item:
    return Item("model states", role, what, nbytes)


def _temp(phase: str, role: str, what: str, nbytes: int) -> Item:
    return Item("transient", role, what, nbytes, phase=phase)


def make_plan(spec: ModelSpec, s: PlanSettings) -> Plan:
    """The plan of one rank (all data-parallel ranks hold the same sizes, up to padding)."""
    if s.stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage {s.stage}: expected 0, 1, 2 or 3")
    if s.offload_param is not None and s.stage != 3:
        raise ValueError(f"zero_optimization.offload_param (device {s.offload_param.device}) applies to stage 3 "
                         f"only; the config has stage {s.stage}")
    if s.offload_optimizer is not None and s.stage == 0:
        raise ValueError("zero_optimization.offload_optimizer applies to stages 1-3; the config has stage 0")
    build = {0: _stage0, 1: _stages12, 2: _stages12, 3: _stage3}[s.stage]
    items, layout = build(spec, s)
    items, notes = apply_offload(items, layout, s)
    plan = Plan(s, spec, items, notes)
    if spec.assumed:
        plan.notes.insert(0, f"layout {spec.assumed}")
    if s.optimizer.name.endswith("(assumed: no optimizer section)"):
        plan.notes.append("no optimizer section in the config: AdamW's 8 B per master element assumed")
    return plan


def _frozen_bytes(spec: ModelSpec, s: PlanSettings) -> int:
    return sum(p.numel for p in spec.params if not p.trainable) * s.compute_bytes


def _autograd_grad(spec: ModelSpec, s: PlanSettings, phase: str = "backward") -> Item:
    # autograd computes each gradient as a new tensor before it is added into the bucket (or
    # accumulated into .grad): the largest trainable parameter's is alive beside everything else
    largest = max((p.numel for p in spec.params if p.trainable), default=0)
    return _temp(phase, "autograd", f"autograd's gradient of the largest parameter ({largest:,} elements)",
                 largest * s.compute_bytes)


def _stage0(spec: ModelSpec, s: PlanSettings) -> tuple[list[Item], OffloadLayout]:
    n, t = spec.total, spec.trainable
    local = s.world == 1 and s.compute == "fp32" and s.accum == "fp32"
    items = [_state("param", f"parameters ({s.compute}, whole model)", n * s.compute_bytes)]
    if local:  # zero/local.py: gradients live in .grad, made by autograd, dropped by zero_grad
        items.append(_state("grad", "gradients (autograd's .grad, fp32)", t * 4))
    else:
        items.append(_state("grad", f"gradient buckets ({s.accum}, whole model)", t * s.accum_bytes))
        if s.compute != "fp32" or s.accum != "fp32":
            items.append(_state("master", "fp32 masters (whole model)", t * 4))
        items.append(_autograd_grad(spec, s))
        if s.reduce != s.accum:  # every bucket in flight has its cast copy; stage 0 does not bound them
            items.append(_temp("backward", "wire", f"{s.reduce} copies of the buckets in flight", t * s.reduce_bytes))
        if s.accum != "fp32":  # link_grads widens the reduced gradients for the step
            items.append(_temp("step", "grad", "fp32 copies of the gradients for the step", t * 4))
    items.append(_state("optim", f"optimizer state ({s.optimizer.name}, whole model)", t * s.optimizer.state_bytes))
    if s.optimizer.step_temp_bytes:
        items.append(_temp("step", "optim_temp", "optimizer step temporaries", t * s.optimizer.step_temp_bytes))
    return items, OffloadLayout([[p.numel] for p in spec.params if p.trainable])


def _stages12(spec: ModelSpec, s: PlanSettings) -> tuple[list[Item], OffloadLayout]:
    trainable = [p for p in spec.params if p.trainable]
    plans = plan_sharded_buckets([[p.name for p in trainable]], [[p.shape for p in trainable]], s.bucket_numel,
                                 s.world)
    padded = sum(b.padded for b in plans)
    shard = sum(b.shard for b in plans)
    fp32 = s.compute == "fp32"
    items = [_state("param", f"parameters ({s.compute}, whole model, {len(plans)} flat buckets)",
                    padded * s.compute_bytes)]
    if _frozen_bytes(spec, s):
        items.append(_state("param", f"frozen parameters ({s.compute})", _frozen_bytes(spec, s)))
    # fp32 training: the master shard is a view of the parameter buffer (sharded.py, Note: what each rank holds)
    items.append(_state("master", "fp32 masters (this rank's shard)" + (": a view of the parameters" if fp32 else ""),
                        0 if fp32 else shard * 4))
    items.append(_state("optim", f"optimizer state ({s.optimizer.name}, this rank's shard)",
                        shard * s.optimizer.state_bytes))
    if s.stage == 1:
        items.append(_state("grad", f"gradient buckets ({s.accum}, whole model)", padded * s.accum_bytes))
        if s.accum != "fp32":
            items.append(_state("grad_shard", "fp32 gradient shard", shard * 4))
    else:
        items.append(_state("grad_shard", "fp32 gradient shard", shard * 4))
        # stage 2 borrows a full bucket per reduction, bounded by reduce_bucket_size (reducer.py)
        red = reduction_peak([b.padded for b in plans], s.bucket_numel, s.bucket_numel)  # backward order already
        items += _reduction_items(red, s, f"borrowed gradient buckets ({s.accum}, <= reduce_bucket_size "
                                  f"{s.bucket_numel:,} elements in flight)", "buckets", "gradient buckets")
    items.append(_autograd_grad(spec, s))
    if s.optimizer.step_temp_bytes:
        items.append(_temp("step", "optim_temp", "optimizer step temporaries (this rank's shard)",
                           shard * s.optimizer.step_temp_bytes))
    return items, OffloadLayout([[b.shard] for b in plans])  # a master per bucket, in bucket order (sharded.py)


def _reduction_items(red: ReductionPeak, s: PlanSettings, borrowed: str, noun: str, pooled: str) -> list[Item]:
    """What the gradient reduction holds (reducer.py): the full-size ``noun`` borrowed in backward
    (``borrowed`` describes them), their copies in the reduce dtype while in flight, and those pooled
    until ``step()`` returns (``pooled``)."""
    items = [_temp("backward", "bucket", borrowed, red.backward * s.accum_bytes)]
    if s.reduce != s.accum:
        items.append(_temp("backward", "wire", f"{s.reduce} copies of the {noun} in flight",
                           red.in_flight * s.reduce_bytes))
    if red.after_backward:
        items.append(_temp("step", "bucket", f"{pooled} pooled until step() returns",
                           red.after_backward * s.accum_bytes))
    return items


def _stage3(spec: ModelSpec, s: PlanSettings) -> tuple[list[Item], OffloadLayout]:
    units = [[spec.params[i] for i in u] for u in spec.units]
    numels = [sum(p.numel for p in u) for u in units]
    shards = [flat_layout([p.numel for p in u], s.world, 0).shard for u in units]
    full = [sh * s.world for sh in shards]
    persistent = [m <= s.z3.persistence_threshold for m in numels]
    # the optimizer steps each trainable parameter's piece of this rank's shard (Unit.master_chunks)
    pieces = [[length if p.trainable else 0 for p, (_, _, length) in
               zip(u, flat_layout([p.numel for p in u], s.world, 0).pieces, strict=True)] for u in units]
    trainable_shard = sum(map(sum, pieces))
    shard = sum(shards)
    fp32 = s.compute == "fp32"
    items = [_state("param_shard", f"parameter shards ({s.compute}, {len(units)} units)", shard * s.compute_bytes),
             _state("master", "fp32 masters (this rank's shard)" + (": a view of the parameter shards" if fp32 else ""),
                    0 if fp32 else shard * 4),
             _state("optim", f"optimizer state ({s.optimizer.name}, this rank's shard)",
                    trainable_shard * s.optimizer.state_bytes)]
    oib = s.z3.optimizer_in_backward
    if not oib:
        items.append(_state("grad_shard", "fp32 gradient shards", shard * 4))
    kept_whole = sum(f for f, p in zip(full, persistent, strict=True) if p)
    if kept_whole:
        items.append(Item("buffers", "gathered", f"small units kept gathered (<= stage3_param_persistence_threshold "
                          f"{s.z3.persistence_threshold:,} elements)", kept_whole * s.compute_bytes))
    budget = prefetch_budget(numels, s.z3.prefetch_numel)
    reuse = s.z3.max_reuse_distance if s.z3.max_reuse_distance is not None else budget
    fwd, bwd = gathered_peak(numels, full, persistent, budget, s.z3.max_live_numel, reuse)
    items.append(_temp("forward", "gathered", f"gathered units (running + prefetched, window {budget:,} elements)",
                       fwd * s.compute_bytes))
    items.append(_temp("backward", "gathered", "gathered units (running + prefetched + kept from forward)",
                       bwd * s.compute_bytes))
    # gradient buffers are borrowed per unit in backward order (units complete in reverse)
    order = [f for f, u in zip(full, units, strict=True) if any(p.trainable for p in u)][::-1]
    red = reduction_peak(order, s.bucket_numel, s.bucket_numel)
    items += _reduction_items(red, s, f"unit gradient buffers ({s.accum}, <= reduce_bucket_size "
                              f"{s.bucket_numel:,} elements)", "buffers", "unit gradient buffers")
    if oib:  # a unit's gradient shard lives from its reduction to its step (Note: optimizer in backward)
        items.append(_temp("backward", "grad_shard", "fp32 gradient shards of units being reduced",
                           red.in_flight // s.world * 4))
    items.append(_autograd_grad(spec, s))
    if s.optimizer.step_temp_bytes:
        temp_elems = max(shards, default=0) if oib else trainable_shard
        items.append(_temp("backward" if oib else "step", "optim_temp", "optimizer step temporaries",
                           temp_elems * s.optimizer.step_temp_bytes))
    # initialize(): every unit's shards are cut before any is released; the model is whole until then,
    # unless built under zero.Init, whose per-parameter chunks go as each unit is cut (stage3_unit.py)
    states = shard * s.compute_bytes + (0 if fp32 else shard * 4) + (0 if oib else shard * 4)
    if s.zero_init:
        built = ("one parameter gathered whole while its unit is cut (zero.Init)", spec.largest_param * 4)
    else:
        built = ("model built whole before initialize() (fp32)", spec.total * 4)
    items += [Item("init", "model", built[0], built[1]),
              Item("init", "param_shard", "shards cut at initialize() (parameters, masters, gradients)", states)]
    # Stage3Strategy.units run in reverse registration order: the order sub-groups step in
    chunks = [[n for n, p in zip(pc, u, strict=True) if p.trainable] for pc, u in zip(pieces, units, strict=True)]
    tiered = [sh for sh, keep in zip(shards, persistent, strict=True) if not keep]
    return items, OffloadLayout(chunks[::-1], tiered_shards=tiered, persistent_shard=shard - sum(tiered))
