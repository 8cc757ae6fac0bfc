"""``zero.Init``: build a model already partitioned, so no rank ever holds it whole.

[Note: when a module is partitioned] At the end of each module's own ``__init__``, its direct
parameters are broadcast from rank 0 (so every rank agrees whatever its RNG did), cut into
per-parameter chunks (``param_shard.py``), and replaced by empty placeholders; only this rank's
chunk is kept. Values therefore do not depend on the world size. A parent that initialises its
children's parameters in its own ``__init__`` (``self.apply(init_fn)``, Hugging Face's
``post_init()``) gets each of them whole for the calls that use it (init_touch.py, Note: touched
after partitioning), so the model equals the one built without ``zero.Init``.

[Note: where the pieces live] The module is built where its code puts it (the host, usually), and
its placeholders stay there: ``initialize()`` moves the module to the engine's device like any
other. The chunks live on ``remote_device``: the accelerator's device by default (so the model never
has to fit in host memory twice over), or the host with ``remote_device="cpu"`` (pinned when
``pin_memory`` and CUDA exist, so the move at ``initialize()`` is an asynchronous copy); stage 3
gathers them on its own device there (stage3.py ``_full_flat``). Broadcasts and gathers while
building run on the accelerator's device, since NCCL takes no host tensors.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from shardspeed.accelerator import get_accelerator
from shardspeed.comm import broadcast, get_global_rank, get_rank, get_world_size, init_distributed, world_group
from shardspeed.zero.init_touch import TouchedParameters, placeholder
from shardspeed.zero.param_shard import local_chunk


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= _all_subclasses(sub)
    return out


class Init:
    """Context manager: modules constructed inside are partitioned as they are built.

    Accepts DeepSpeed's arguments; ``data_parallel_group`` (or ``mpu``'s data-parallel group) sets
    the ranks the parameters are spread over, and ``enabled=False`` makes it a no-op.
    """

    def __init__(self, module: Any = None, data_parallel_group: Any = None, mem_efficient_linear: bool = True,
                 remote_device: Any = None, pin_memory: bool = False, config_dict_or_path: Any = None,
                 config: Any = None, enabled: bool = True, dtype: torch.dtype | None = None, mpu: Any = None,
                 **_ignored: Any):
        self.enabled = enabled
        self.remote_device = _remote_device(remote_device)
        self.pin_memory = pin_memory
        self.dtype = dtype
        self.group = data_parallel_group
        self.mpu = mpu
        self._patched: list[tuple[type, Any]] = []
        self._old_init_subclass: Any = None
        self._touch: TouchedParameters | None = None

    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        init_distributed()
        if self.group is None:
            self.group = self.mpu.get_data_parallel_group() if self.mpu is not None else world_group()
        self.rank, self.world = get_rank(self.group), get_world_size(self.group)
        acc = get_accelerator()
        self.comm_device = acc.current_device()  # after init_distributed chose this rank's device
        self.chunk_device = torch.device("cpu") if self.remote_device == "cpu" else self.comm_device
        for cls in _all_subclasses(torch.nn.Module):
            self._patch(cls)
        ctx = self
        self._old_init_subclass = torch.nn.Module.__dict__.get("__init_subclass__")

        def init_subclass(cls: type, **kw: Any) -> None:
            super(torch.nn.Module, cls).__init_subclass__(**kw)
            ctx._patch(cls)

        torch.nn.Module.__init_subclass__ = classmethod(init_subclass)  # classes defined inside the block
        self._touch = TouchedParameters(self.group, self.world, self._cut, self.comm_device)
        self._touch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._touch is not None:
            self._touch.__exit__(*exc)
            self._touch.cut_all()
            self._touch = None
        for cls, orig in reversed(self._patched):
            cls.__init__ = orig
        self._patched.clear()
        if self.enabled:
            if self._old_init_subclass is None:
                del torch.nn.Module.__init_subclass__
            else:
                torch.nn.Module.__init_subclass__ = self._old_init_subclass

    def _patch(self, cls: type) -> None:
        orig = cls.__dict__.get("__init__")
        if orig is None or getattr(orig, "_shardspeed_wrapped", False):
            return

        @functools.wraps(orig)
        def wrapped(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            orig(module, *args, **kwargs)
            self.partition(module)
            if self._touch is not None:  # what this constructor re-initialised is cut again now
                self._touch.cut_all()

        wrapped._shardspeed_wrapped = True  # type: ignore[attr-defined]
        cls.__init__ = wrapped
        self._patched.append((cls, orig))

    @torch.no_grad()
    def partition(self, module: torch.nn.Module) -> None:
        for p in module.parameters(recurse=False):
            if hasattr(p, "ds_shape") or p.numel() == 0:
                continue
            self._cut(p)

    @torch.no_grad()
    def _cut(self, p: torch.nn.Parameter) -> None:
        """Keep this rank's chunk of ``p`` (rank 0's values on every rank) and drop the rest."""
        data = p.data
        if self.dtype is not None and data.is_floating_point():
            data = data.to(self.dtype)
        if self.world > 1:
            data = data.to(self.comm_device)
            broadcast(data, src=get_global_rank(self.group, 0), group=self.group)
        chunk = local_chunk(data, self.rank, self.world).to(self.chunk_device)
        if self.pin_memory and chunk.device.type == "cpu":
            chunk = get_accelerator().pin_memory(chunk)
        p.ds_chunk = chunk
        p.ds_shape = tuple(p.shape)
        p.ds_numel = p.numel()
        ph = placeholder(data.dtype, p.device)
        p.data = ph
        if self._touch is not None:
            self._touch.track(p, ph)


def _remote_device(value: Any) -> str | None:
    """``remote_device`` as "cpu" or None (the accelerator's device). "nvme" builds the chunks in
    host memory, as "cpu" does: ``initialize()`` with ``zero_optimization.offload_param.device:
    nvme`` writes each unit's shard to disk as it is cut from them (zero/swap_params.py), so the
    model never exists whole anywhere; the chunks themselves (1/world of the model) are in memory
    while it is built."""
    name = None if value is None else str(value).lower()
    if name in (None, "none", "cuda", "device") or (name is not None and name.startswith("cuda:")):
        return None
    if name in ("cpu", "nvme"):
        return "cpu"
    raise ValueError(f"zero.Init(remote_device={value!r}): expected None, 'cpu', 'nvme' or 'cuda'")
