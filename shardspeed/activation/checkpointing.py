"""``checkpoint(function, *args)``: run ``function`` without keeping its activations; backward runs it
again (same RNG state, so dropout draws the same mask) and backpropagates through the recomputation.

[Note: two ways to recompute]
- Plain: torch's non-reentrant checkpoint. It keeps the region's inputs as they are, works with
  inputs that do not require grad, and nests inside ZeRO stage 3's gather hooks.
- With ``partition_activations`` or ``checkpoint_in_cpu``: the inputs themselves are what is kept,
  so they are stored differently: each tensor-parallel rank keeps 1/T of every input (all-gathered
  again in backward) and/or keeps it in host memory. A custom autograd function owns them; its
  backward restores them, recomputes under the saved RNG state and calls autograd on the region.
  It is driven by the gradient of its outputs, so at least one input must require grad.
[Note: which ranks share a checkpoint's inputs] Only the tensor-parallel group holds the same
activations (a region's input is replicated across the ranks slicing its layers), so only it can
split them. The model-parallel group also spans pipe stages, which run other layers on other
activations: gathering across it would rebuild an input from pieces of different tensors. Without
pipe stages the two groups are the same.
``contiguous_checkpointing`` (with partitioning) copies the kept pieces into ``num_checkpoints``
reusable buffers instead of allocating new ones every step.

[Note: the model-parallel RNG streams are replayed too]
Dropout inside a tensor-parallel region draws from the tracker's stream
(``get_rng_tracker().fork()``), not from the default generator, and that stream has moved on by
the time backward recomputes the region. Both paths therefore snapshot the tracker's states with
the default generator's when the region runs forward, put them back for the recomputation, and
restore the states current at recomputation afterwards, so the masks equal the first ones and
later forks continue their streams as if nothing had been recomputed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint

from shardspeed.accelerator import get_accelerator
from shardspeed.activation.wgrad import recording_session
from shardspeed.comm import Topology, all_gather, topology_from_mpu
from shardspeed.config import ShardspeedConfig, load_config
from shardspeed.tensor_parallel import get_rng_tracker, model_parallel_seed


@dataclass
class _Settings:
    mpu: Any = None
    topo: Topology | None = None  # from mpu, on first use (its groups exist by then)
    partition_activations: bool = False
    contiguous: bool = False
    num_checkpoints: int | None = None
    in_cpu: bool = False
    synchronize: bool = False
    profile: bool = False
    timings: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "recompute": 0.0})


_settings = _Settings()


def configure(mpu_: Any, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """Set how ``checkpoint`` keeps its inputs: from the ``activation_checkpointing`` section of
    ``deepspeed_config`` (path, dict or config), then from the explicit arguments, which win."""
    s = _Settings(mpu=mpu_)
    if deepspeed_config is not None:
        cfg = deepspeed_config if isinstance(deepspeed_config, ShardspeedConfig) else load_config(deepspeed_config)
        a = cfg.activation_checkpointing
        s.partition_activations, s.contiguous = a.partition_activations, a.contiguous_memory_optimization
        s.num_checkpoints, s.in_cpu = a.number_checkpoints, a.cpu_checkpointing
        s.synchronize, s.profile = a.synchronize_checkpoint_boundary, a.profile
    for name, value in (("partition_activations", partition_activations), ("contiguous", contiguous_checkpointing),
                        ("num_checkpoints", num_checkpoints), ("in_cpu", checkpoint_in_cpu),
                        ("synchronize", synchronize), ("profile", profile)):
        if value is not None:
            setattr(s, name, value)
    if s.contiguous and not s.partition_activations:
        raise ValueError("contiguous_checkpointing copies the partitioned activations into reusable buffers: "
                         "it needs partition_activations=True as well")
    if s.contiguous and not s.num_checkpoints:
        raise ValueError("contiguous_checkpointing needs num_checkpoints (the number of checkpoint() calls "
                         "in one forward) to size its buffers")
    global _settings
    _settings = s
    _pool.reset(s.num_checkpoints if s.contiguous else 0)


def is_configured() -> bool:
    return _settings.mpu is not None or _settings.partition_activations or _settings.in_cpu


def reset() -> None:
    """Back to the defaults (plain recompute); also frees the contiguous buffers."""
    configure(None)


def profile_timings() -> dict[str, float]:
    """Seconds spent in checkpointed forwards and in recomputation, when ``profile`` is on."""
    return dict(_settings.timings)


def checkpoint(function: Any, *args: Any) -> Any:
    """``function(*args)``, keeping only its inputs; see the module note."""
    if not torch.is_grad_enabled():
        return function(*args)
    s = _settings
    if s.partition_activations or s.in_cpu:
        if not any(torch.is_tensor(a) and a.requires_grad for a in args):
            raise ValueError("checkpoint(): with partition_activations or checkpoint_in_cpu, recomputation is "
                             "driven by the gradient of the region's inputs, and none of them requires grad; "
                             "pass the hidden state that flows from earlier layers, or turn both options off")
        return _KeptInputs.apply(function, s, *args)
    start = _boundary(s)
    out = torch_checkpoint.checkpoint(_Timed(function, s, get_rng_tracker().get_states()), *args,
                                      use_reentrant=False, preserve_rng_state=True)
    _account(s, "forward", start)
    return out


class _Timed:
    """The region as the plain path runs it: a second call is the recomputation (under the
    tracker states of the first; torch's checkpoint replays the default generator's)."""

    def __init__(self, function: Any, s: _Settings, tracker_states: dict[str, torch.Tensor]):
        self.function, self.s, self.calls, self.tracker_states = function, s, 0, tracker_states
        self.wgrads: Any = None  # the recording of a forward that defers weight gradients (wgrad.py)

    def _recording(self) -> Any:
        w = self.wgrads
        return w.queue.recording(replay=w) if w is not None else contextlib.nullcontext()

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.wgrads = recording_session()
            with self._recording():  # re-entered: this region's saved-tensor hooks are its own
                return self.function(*args)
        start = _boundary(self.s)
        try:
            # a forward that deferred weight gradients defers them again (wgrad.py, Note: recomputed regions)
            with _tracker_states(self.tracker_states), self._recording():
                return self.function(*args)
        finally:  # torch stops a recomputation early (by raising) once it has what backward needs
            _account(self.s, "recompute", start)


@contextlib.contextmanager
def _tracker_states(states: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model-parallel RNG tracker at ``states`` inside the block, as it was outside."""
    tracker = get_rng_tracker()
    current = tracker.get_states()
    tracker.set_states(states)
    try:
        yield
    finally:
        tracker.set_states(current)


def _boundary(s: _Settings) -> float:
    if s.synchronize:
        get_accelerator().synchronize()
    return time.perf_counter()


def _account(s: _Settings, what: str, start: float) -> None:
    if s.synchronize:
        get_accelerator().synchronize()
    if s.profile:
        s.timings[what] += time.perf_counter() - start


class _Kept:
    """One input tensor as stored between forward and backward."""

    def __init__(self, t: torch.Tensor, s: _Settings, slot: int | None):
        self.shape, self.dtype, self.device, self.requires_grad = t.shape, t.dtype, t.device, t.requires_grad
        self.numel = t.numel()
        if s.topo is None and s.mpu is not None:
            s.topo = topology_from_mpu(s.mpu)
        topo = s.topo
        # the tensor-parallel group, not the model-parallel one (Note: which ranks share a checkpoint's inputs)
        self.group = topo.tp_group if topo is not None and topo.tp_world_size > 1 else None
        self.world = topo.tp_world_size if self.group is not None else 1
        data = t.detach().reshape(-1)
        if self.group is not None:  # this rank's 1/T of it, zero-padded to equal pieces
            chunk = -(-self.numel // self.world)
            piece = torch.zeros(chunk, dtype=t.dtype, device=t.device)
            lo, hi = topo.tp_rank * chunk, min((topo.tp_rank + 1) * chunk, self.numel)
            if hi > lo:
                piece[:hi - lo].copy_(data[lo:hi])
            data = piece
        else:
            data = data.clone()  # the caller may change its tensor in place after the call
        if s.in_cpu:
            data = data.to("cpu")
        if slot is not None:
            data = _pool.store(slot, data)
        self.data = data

    def restore(self) -> torch.Tensor:
        data = self.data.to(self.device)
        if self.group is not None:
            full = torch.empty(self.world * data.numel(), dtype=self.dtype, device=self.device)
            all_gather(full, data, group=self.group)
            data = full[:self.numel]
        out = data.view(self.shape).detach()
        out.requires_grad_(self.requires_grad)
        return out


class _ContiguousPool:
    """``num_checkpoints`` buffers reused every step; slot k holds the k-th checkpoint's pieces."""

    def __init__(self) -> None:
        self.slots: list[torch.Tensor | None] = []
        self.used: list[int] = []
        self.next = 0

    def reset(self, n: int) -> None:
        self.slots, self.used, self.next = [None] * n, [0] * n, 0

    def take(self) -> int | None:
        if not self.slots:
            return None
        if all(u > 0 for u in self.used):
            raise RuntimeError(f"more than num_checkpoints={len(self.slots)} checkpoint() regions are alive at once; "
                               "raise num_checkpoints to the number of checkpointed layers in one forward")
        while self.used[self.next] > 0:
            self.next = (self.next + 1) % len(self.slots)
        slot, self.next = self.next, (self.next + 1) % len(self.slots)
        return slot

    def store(self, slot: int, data: torch.Tensor) -> torch.Tensor:
        buf = self.slots[slot]
        need = self.used[slot] + data.numel()
        if buf is None or buf.numel() < need or buf.dtype != data.dtype or buf.device != data.device:
            grown = torch.empty(max(need, 2 * (buf.numel() if buf is not None else 0)), dtype=data.dtype,
                                device=data.device)
            if buf is not None and self.used[slot]:
                grown[:self.used[slot]].copy_(buf[:self.used[slot]])
            self.slots[slot] = buf = grown
        view = buf[self.used[slot]:need]
        view.copy_(data)
        self.used[slot] = need
        return view

    def release(self, slot: int) -> None:
        self.used[slot] = 0


_pool = _ContiguousPool()


class _KeptInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, function: Any, s: _Settings, *args: Any) -> Any:
        start = _boundary(s)
        ctx.function, ctx.s = function, s
        ctx.rng = torch.get_rng_state()
        ctx.device_rng = get_accelerator().get_rng_state()
        ctx.tracker_states = get_rng_tracker().get_states()
        ctx.slot = _pool.take()
        ctx.kept = [_Kept(a, s, ctx.slot) if torch.is_tensor(a) else a for a in args]
        with torch.no_grad():
            out = function(*args)
        _account(s, "forward", start)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        s = ctx.s
        inputs = [k.restore() if isinstance(k, _Kept) else k for k in ctx.kept]
        if ctx.slot is not None:
            _pool.release(ctx.slot)
        start = _boundary(s)
        acc = get_accelerator()
        # the forward's RNG state for the recomputation, and the current one back afterwards
        with torch.random.fork_rng(devices=[], enabled=True):
            torch.set_rng_state(ctx.rng)
            current_device_rng = acc.get_rng_state()
            acc.set_rng_state(ctx.device_rng)
            with torch.enable_grad(), _tracker_states(ctx.tracker_states):
                out = ctx.function(*inputs)
            acc.set_rng_state(current_device_rng)
        _account(s, "recompute", start)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *[x.grad if torch.is_tensor(x) and x.requires_grad else None for x in inputs])


# DeepSpeed's names (``deepspeed.checkpointing.get_cuda_rng_tracker`` / ``model_parallel_cuda_manual_seed``)
get_cuda_rng_tracker = get_rng_tracker


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """``tensor_parallel.model_parallel_seed`` for the mpu given to ``configure`` (else the current
    model-parallel unit): the shared stream seeded with ``seed``, this rank's with ``seed + 2718 + tp_rank``."""
    model_parallel_seed(seed, _settings.mpu)
