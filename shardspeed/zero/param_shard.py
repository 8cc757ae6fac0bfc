"""Per-parameter chunks, the form ``zero.Init`` keeps a parameter in while the model is being
built: each parameter, flattened and padded to a multiple of N, is cut into N equal chunks; rank r
keeps chunk r. Pure functions.

[Note: why per parameter while building] Under ``zero.Init`` a module's parameters are partitioned
as soon as its own ``__init__`` returns, before anyone knows which parameters will be gathered
together (stage 3's units are found at initialize()). A chunk per parameter is meaningful alone
and does not depend on what else the module holds. At initialize() stage 3 gathers each parameter
once and cuts its units' flat shards from it (unit_layout.py, Note: flat units).
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
