"""Tied weights across pipeline stages: one logical parameter (an embedding and the output head that
reuses it) held by several stages, kept equal by the pipeline engine.

[Note: tied weights stay one parameter]
- At start, the owner stage (the first that holds the key) broadcasts the tied parameters to the
  other holders, before any strategy copies them into masters or partitions.
- Each holder computes a partial gradient (the embedding's on the first stage, the head's on the
  last). After the strategy's data-parallel reduction of a step, the holders sum their reduced
  gradients over the tie's group (same data and tensor coordinate, the stages holding the key), so
  every holder steps with the whole gradient and, from equal values and equal optimizer states,
  stays equal to the owner without another broadcast.
- The sum works on the strategy's reduced gradients (``Strategy.grad_pieces``): a replicated
  strategy (stage 0) holds the whole averaged gradient; a partitioned one (stages 1-2) holds
  segments that differ per stage, so the pieces are first assembled into the whole tied gradient
  over the data-parallel group (a sum of disjoint pieces), summed over the tie's group, and each
  rank takes its pieces back. Averaging over data and summing over stages commute, so the order
  is free. It costs two all-reduces of the tied parameters per step.
- Non-owner copies carry ``ds_pipe_replicated``, so the global gradient norm counts them once.
"""

from __future__ import annotations

from typing import Any

import torch

from shardspeed.comm import all_reduce, broadcast, get_rank, new_group


class TiedWeights:
    """This rank's ties (keys its stage holds and shares with another stage) and their groups.
    Every rank must construct it, in the same order: it creates process groups."""

    def __init__(self, module: Any):
        self._ties: list[tuple[Any, Any, list[int]]] = []  # (TiedWeightGroup, process group, global ranks)
        me = get_rank()
        for tie in module.tied_weight_groups().values():
            for ranks in tie.rank_lists:
                if len(ranks) < 2:
                    continue  # held by one stage only: an ordinary shared module there
                group = new_group(ranks)  # every rank makes every group (comm/model_parallel.py's note)
                if me in ranks and tie.module is not None:
                    self._ties.append((tie, group, ranks))
                    if tie.owner_stage != module.stage_id:
                        for p in tie.params():
                            p.ds_pipe_replicated = True

    def __bool__(self) -> bool:
        return bool(self._ties)

    @torch.no_grad()
    def broadcast(self) -> None:
        """Make every holder's tied parameters equal to the owner's (at start)."""
        for tie, group, ranks in self._ties:
            for p in tie.params():
                broadcast(p.data, src=ranks[0], group=group)

    @torch.no_grad()
    def reduce_grads(self, strategy: Any) -> None:
        """Sum the reduced gradients of tied parameters over their holders (the module's note).
        Call after ``strategy.wait_reductions()`` and before the norm and the step."""
        if not self._ties:
            return
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, start, view in strategy.grad_pieces():
            pieces.setdefault(name, []).append((start, view))
        for tie, group, _ in self._ties:
            named = [(n, p) for n, p in zip(tie.local_names, tie.params(), strict=True) if p.requires_grad]
            total = sum(p.numel() for _, p in named)
            if not total:
                continue
            flat = torch.zeros(total, dtype=torch.float32, device=named[0][1].device)
            where, at = [], 0
            for name, p in named:
                for start, view in pieces.get(name, []):
                    lo = at + start
                    flat[lo:lo + view.numel()].copy_(view)
                    where.append((lo, view))
                at += p.numel()
            if not strategy.replicated:  # assemble the whole gradient from the data-parallel shards
                all_reduce(flat, group=strategy.topo.dp_group)
            all_reduce(flat, group=group)
            for lo, view in where:
                view.copy_(flat[lo:lo + view.numel()])
