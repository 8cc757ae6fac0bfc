"""One line of a plan: so many bytes of one kind, on one tier, in one group (plan.py, Note: what a
plan counts)."""

from __future__ import annotations

from dataclasses import dataclass

TIERS = ("device", "host", "disk")
GROUPS = ("model states", "buffers", "transient", "init")


@dataclass(frozen=True)
class Item:
    group: str  # one of GROUPS
    role: str  # what it is, for offload to move: param, param_shard, master, optim, grad, grad_shard, bucket, ...
    what: str  # the line a user reads
    nbytes: int
    tier: str = "device"
    phase: str = ""  # transients: forward | backward | step
