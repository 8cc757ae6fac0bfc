"""Per-parameter sharding for stage 3: each parameter, flattened and padded to a multiple of N,
is cut into N equal chunks; rank r keeps chunk r. Pure functions.

[Note: why per parameter] Stage 3 gathers parameters module by module, and a module's parameters
may belong to different optimizer groups (weights decay, biases do not) or be built one module at
a time under ``zero.Init``. Cutting every parameter on its own keeps each shard meaningful alone:
this rank's piece of ``name`` is elements [r*c, r*c + c) of its flat form, whatever else is in
the module and whatever the world size was when it was written.
"""

from __future__ import annotations

import torch


def chunk_numel(numel: int, world_size: int) -> int:
    return -(-numel // world_size)


def local_chunk(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's chunk of ``full`` (flattened, zero-padded at the end), as a new tensor."""
    flat = full.detach().reshape(-1)
    c = chunk_numel(flat.numel(), world_size)
    out = torch.zeros(c, dtype=full.dtype, device=full.device)
    lo, hi = rank * c, min((rank + 1) * c, flat.numel())
    if hi > lo:
        out[:hi - lo].copy_(flat[lo:hi])
    return out


def valid_in_chunk(numel: int, world_size: int, rank: int) -> int:
    """How many of the chunk's elements are real (the rest is padding)."""
    c = chunk_numel(numel, world_size)
    return max(0, min(c, numel - rank * c))
