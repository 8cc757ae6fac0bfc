"""Parameters that initialisation code touches after ``zero.Init`` partitioned them.

[Note: touched after partitioning] Hugging Face models (and any ``self.apply(init_fn)`` in a
parent) re-initialise their children's weights after each child's ``__init__`` has returned, e.g.
``module.weight.data.normal_(std=0.02)`` in ``post_init()``. By then ``zero.Init`` has replaced the
weight by a placeholder, so the draw would touch nothing (and consume no random numbers, shifting
every later draw). While ``zero.Init`` is active a torch-function mode watches every torch call:
when one reads or writes a partitioned parameter (itself, its ``.data`` alias, or a view of either)
the parameter is made whole again on every rank (one all-gather of its chunks), the call runs on
the whole tensor exactly as it would without ``zero.Init`` (same shape, same random stream), and
the parameter is cut again as soon as another one is touched or the constructor returns. So at
most one parameter beyond the current module is ever whole, and the result equals the model built
without ``zero.Init``. Every rank runs the same constructor, hence the same collectives in the same
order; values are re-broadcast from rank 0 before cutting, as at the first partition.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from shardspeed.comm import all_gather


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor with a storage of its own, so aliases of it (``p.data``) can be traced back
    to their parameter by storage address."""
    return torch.empty(1, dtype=dtype, device=device)[:0]


def gather_chunks(p: torch.nn.Parameter, group: Any, world: int,
                  comm_device: torch.device | None = None) -> torch.Tensor:
    """``p`` whole, in its own dtype and shape, from every rank's ``ds_chunk`` (a collective run on
    ``comm_device``, default the chunk's), on the device of ``p``'s placeholder: where the
    initialisation code that touched it expects it."""
    chunk = p.ds_chunk
    if world == 1:
        return chunk[:p.ds_numel].to(p.device, copy=True).view(p.ds_shape)
    chunk = chunk.to(comm_device or chunk.device)
    full = torch.empty(world * chunk.numel(), dtype=chunk.dtype, device=chunk.device)
    all_gather(full, chunk.contiguous(), group=group)
    return full[:p.ds_numel].view(p.ds_shape).to(p.device, copy=True)


class TouchedParameters(TorchFunctionMode):
    """Makes partitioned parameters whole for the torch calls that use them (Note above)."""

    def __init__(self, group: Any, world: int, cut: Callable[[torch.nn.Parameter], None],
                 comm_device: torch.device | None = None):
        super().__init__()
        self.group, self.world, self.cut, self.comm_device = group, world, cut, comm_device
        # storage address of a placeholder -> its parameter; weak, and checked on use, since an
        # address is reused once a dropped parameter's placeholder is freed
        self.owner: dict[int, weakref.ref[torch.nn.Parameter]] = {}
        self.whole: list[torch.nn.Parameter] = []

    def track(self, p: torch.nn.Parameter, ph: torch.Tensor) -> None:
        """``p`` now holds the placeholder ``ph`` (read from ``ph``: ``p.data`` would be a touch)."""
        self.owner[ph.untyped_storage().data_ptr()] = weakref.ref(p)

    def _partitioned(self, t: torch.Tensor) -> torch.nn.Parameter | None:
        if isinstance(t, torch.nn.Parameter) and hasattr(t, "ds_chunk") and t.data.numel() == 0:
            return t
        if t.numel() != 0:
            return None
        ptr = t.untyped_storage().data_ptr()
        ref = self.owner.get(ptr)
        p = ref() if ref is not None else None
        if p is None or not hasattr(p, "ds_chunk") or p.data.untyped_storage().data_ptr() != ptr:
            self.owner.pop(ptr, None)
            return None
        return p

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        touched = {id(p): p for t in flat if torch.is_tensor(t) and (p := self._partitioned(t)) is not None}
        if touched:
            for p in touched.values():
                self._make_whole(p)

            def swap(x: Any) -> Any:
                p = self._partitioned(x) if torch.is_tensor(x) else None
                if p is None:
                    return x
                return p if x is p else p.data  # an alias of the placeholder: the whole data now

            args, kwargs = tree_map(swap, (args, kwargs))
        return func(*args, **kwargs)

    @torch.no_grad()
    def _make_whole(self, p: torch.nn.Parameter) -> None:
        self.cut_all(keep=p)
        self.owner.pop(p.data.untyped_storage().data_ptr(), None)
        p.data = gather_chunks(p, self.group, self.world, self.comm_device)
        del p.ds_chunk, p.ds_shape, p.ds_numel
        self.whole.append(p)

    def cut_all(self, keep: torch.nn.Parameter | None = None) -> None:
        """Partition again every parameter made whole (but ``keep``)."""
        still = []
        for p in self.whole:
            if p is keep:
                still.append(p)
            else:
                self.cut(p)
        self.whole = still
