"""Re-slicing saved pieces into whatever layout the loading run has. Pure tensor code.

A saved piece is (flat start, length, values, {state key: slice or scalar}) of one parameter. A
wanted piece is a range of a parameter in the new layout. Any saved/wanted pair that overlaps
contributes the overlap; together the saved pieces cover every element exactly once (written by
the ranks of one run), so every wanted element is filled.
"""

from __future__ import annotations

from typing import Any

import torch

SavedPiece = tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]


def overlap(a_start: int, a_len: int, b_start: int, b_len: int) -> tuple[int, int] | None:
    lo, hi = max(a_start, b_start), min(a_start + a_len, b_start + b_len)
    return (lo, hi) if lo < hi else None


def fill(dest: torch.Tensor, dest_start: int, saved: list[SavedPiece], key: str | None = None) -> int:
    """Copy into ``dest`` (flat, covering [dest_start, dest_start + len)) every overlapping part of
    ``saved`` (values, or the state ``key``). Returns how many elements were filled."""
    filled = 0
    for start, length, values, states in saved:
        o = overlap(dest_start, dest.numel(), start, length)
        if o is None:
            continue
        src = values if key is None else states[key]
        lo, hi = o
        dest[lo - dest_start:hi - dest_start].copy_(src.reshape(-1)[lo - start:hi - start])
        filled += hi - lo
    return filled


def split_state(state: dict[str, Any], master: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's per-tensor state: per-element tensors (same size as ``master``) and the rest."""
    per_element, scalars = {}, {}
    for k, v in state.items():
        if torch.is_tensor(v) and v.shape == master.shape:
            per_element[k] = v
        else:
            scalars[k] = v
    return per_element, scalars
