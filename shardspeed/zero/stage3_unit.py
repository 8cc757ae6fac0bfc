"""A stage-3 unit: the parameters gathered together, this rank's shard of their flat form (compute
dtype and fp32 master), its pieces of each parameter, and the per-step bookkeeping of its gather
and reduction. zero/stage3.py drives it (Note: the life of a parameter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shardspeed.comm import Handle
from shardspeed.zero.strategy import StrategyOptions
from shardspeed.zero.unit_layout import flat_layout


class Unit:
    def __init__(self, index: int, names: list[str], params: list[torch.nn.Parameter], rank: int, world: int,
                 opts: StrategyOptions, persistent_threshold: int, full_flat: Callable[[torch.nn.Parameter],
                                                                                        torch.Tensor],
                 lazy_grads: bool = False, separate_master: bool = False):
        self.index, self.names, self.params = index, names, params
        self.world = world
        self.shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in params]
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.layout = flat_layout(self.numels, world, rank)  # Note: flat units (unit_layout.py)
        self.shard_numel = self.layout.shard
        self.full_numel = world * self.shard_numel
        device = params[0].device if params else None
        # separate_master: the shard goes to disk (swap_params.py), the master must not go with it
        self.master_is_view = opts.compute_dtype == torch.float32 and not separate_master
        # [Note: master chunks own their storage] Where the master is a copy, each chunk (what the
        # optimizer steps) is a tensor of its own, not a view of one flat master: a tier that takes
        # the masters (swap_optimizer.py) swaps each chunk's ``.data`` for a placeholder, and a view
        # would keep its ``_base`` (the whole flat master) alive behind it, 4 bytes per shard element
        # resident that nobody counts. Nothing else may hold a chunk's storage.
        fp32 = torch.zeros(self.shard_numel if self.master_is_view else 0, dtype=torch.float32, device=device)
        self.master_chunks: list[torch.Tensor] = []  # this rank's piece of each parameter (possibly empty)
        for p, (start, at, length) in zip(params, self.layout.pieces, strict=True):
            full = full_flat(p)  # on every rank, even for an empty piece: it may be a collective
            chunk = fp32[at:at + length] if self.master_is_view else torch.empty(length, dtype=torch.float32,
                                                                                    device=device)
            if length:
                chunk.copy_(full[start:start + length])
            self.master_chunks.append(chunk)
        if self.master_is_view:
            self.local = fp32  # fp32 training: the compute shard is the master
        else:
            # the same values as the flat master cast at once: each element rounds on its own, padding is 0
            self.local = torch.zeros(self.shard_numel, dtype=opts.compute_dtype, device=device)
            for m, (_, at, length) in zip(self.master_chunks, self.layout.pieces, strict=True):
                self.local[at:at + length].copy_(m)
        self.masters_on_tier = False  # set when a tier took the chunks' values (drop_master_storage)
        # optimizer in backward: a shard only between reduction and step (Note: optimizer in backward)
        self.grad_shard: torch.Tensor | None = None
        if not lazy_grads:
            self.attach_grads(torch.zeros(self.shard_numel, dtype=torch.float32, device=self.local.device))
        self.trainable = sum(1 for p in params if p.requires_grad)
        self.persistent = sum(self.numels) <= persistent_threshold
        self.refs = 0
        self.in_backward = False
        self.gathered = False
        self.buffer: torch.Tensor | None = None  # the gathered flat form while gathered
        self.pending: tuple[torch.Tensor, Handle] | None = None
        self.grad_in: torch.Tensor | None = None
        self.written: list[bool] = []  # which parameters' gradients are in grad_in this backward
        self.accumulated = 0
        self.launched = False
        self.shard_fresh = True
        for p in params:
            if hasattr(p, "ds_chunk"):
                delattr(p, "ds_chunk")

    def attach_grads(self, shard: torch.Tensor) -> None:
        """``shard`` becomes this unit's gradient shard, seen by the optimizer through its master chunks."""
        self.grad_shard = shard
        for m, (_, at, length) in zip(self.master_chunks, self.layout.pieces, strict=True):
            m.grad = shard[at:at + length]

    def master_bytes(self) -> int:
        """Bytes of fp32 master this unit holds beside its compute shard (0 where they are one tensor,
        or once a tier holds the masters)."""
        return 0 if self.master_is_view or self.masters_on_tier else 4 * sum(m.numel() for m in self.master_chunks)

    def detach_grads(self) -> None:
        self.grad_shard = None
        for m in self.master_chunks:
            m.grad = None

    def complete(self) -> bool:
        """Every trainable parameter has accumulated its gradient in this backward."""
        return self.accumulated >= self.trainable


def unit_subgroups(units: list[Unit], masters: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """The optimizer's sub-groups at stage 3 (``Strategy.step_subgroups``): whole units in unit order,
    merged while they fit in ``size`` elements, so a unit's masters are published together, into its
    one shard."""
    mine = {id(m) for m in masters}
    groups: list[list[torch.Tensor]] = []
    n = 0
    for u in units:
        chunks = [m for m in u.master_chunks if id(m) in mine]
        if not chunks:
            continue
        k = sum(m.numel() for m in chunks)
        if not groups or (n + k > size and groups[-1]):
            groups.append([])
            n = 0
        groups[-1].extend(chunks)
        n += k
    return groups


def units_state_bytes(units: list[Unit], param_tier: Any) -> dict[str, int]:
    """Model-state bytes the units hold in memory (and, with parameter offload, the tier's buffers
    and what it keeps on disk): ``Strategy.state_bytes`` at stage 3, less the transients."""
    out = {"parameters": 0, "gradients": 0, "master_parameters": 0}
    for u in units:
        out["parameters"] += u.local.numel() * u.local.element_size()
        out["gradients"] += 0 if u.grad_shard is None else u.grad_shard.numel() * 4
        out["master_parameters"] += u.master_bytes()
    if param_tier is not None:
        out["param_offload_buffers"] = param_tier.memory_bytes()
        out["parameters_on_disk"] = param_tier.disk_bytes()
    return out


def mark_masters_on_tier(units: list[Unit], masters: list[torch.Tensor]) -> None:
    """``Strategy.drop_master_storage`` at stage 3. Nothing to free: the chunks own their storage,
    which went with their ``.data`` (Note: master chunks own their storage); only the units' count of
    master bytes changes."""
    taken = {id(m) for m in masters}
    for u in units:
        if any(id(m) in taken for m in u.master_chunks):
            u.masters_on_tier = True
