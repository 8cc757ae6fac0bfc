"""Random streams under tensor slicing: one that every tensor-parallel rank shares, and one of its own.

[Note: two random streams]
Outside a sliced region every tensor-parallel rank holds the same activations, so dropout there
must draw the same mask on all of them: the default generator is seeded alike on every rank
(``model_parallel_seed`` seeds it with ``seed``). Inside a sliced region (attention heads, the MLP's
hidden units, the sequence chunks under sequence parallelism) each rank holds different elements, and
equal masks would correlate them: dropout there runs under ``get_rng_tracker().fork()``, which swaps in
a generator state of this rank's own (seeded ``seed + 2718 + tp_rank``, the offset Megatron uses) and
swaps the default one back afterwards, each stream continuing where it stopped.

The tracker holds states of the generator dropout draws from: the CUDA generator of the current
device on CUDA, the CPU generator on CPU (the accelerator decides, once per tracker).
Activation checkpointing saves the tracker's states with the default generator's when it runs a
region forward and restores both for the recomputation, so recomputed dropout masks, forked or not,
equal the first ones (see ``shardspeed.activation.checkpointing``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from shardspeed.accelerator import get_accelerator
from shardspeed.comm import get_model_parallel_unit

MODEL_PARALLEL_RNG = "model-parallel-rng"
_SEED_OFFSET = 2718


def _device_rng_calls() -> tuple[Any, Any, Any]:
    """(get_state, set_state, seed) for the generator dropout uses on this process's accelerator."""
    if get_accelerator().is_cuda:
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state, torch.cuda.manual_seed
    return torch.get_rng_state, torch.set_rng_state, torch.default_generator.manual_seed


class RNGStatesTracker:
    """Named generator states that ``fork(name)`` swaps in for the duration of a block."""

    def __init__(self) -> None:
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        self._states, self._seeds = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every named state (to restore later with ``set_states``)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """A new stream ``name`` starting from ``seed``; the default generator is left as it was."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} is already tracked; reset() the tracker to re-seed it")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} already starts another tracked RNG stream: two streams with one seed "
                             "would draw the same numbers")
        get_state, set_state, manual_seed = _device_rng_calls()
        saved = get_state()
        manual_seed(seed)
        self._states[name] = get_state()
        set_state(saved)
        self._seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default stream is untouched by it."""
        if name not in self._states:
            raise KeyError(f"no RNG stream named {name!r} is tracked: call "
                           "shardspeed.tensor_parallel.model_parallel_seed(seed) on every rank first")
        get_state, set_state, _ = _device_rng_calls()
        saved = get_state()
        set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = get_state()
            set_state(saved)


_tracker = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process's tracker (DeepSpeed's and Megatron's ``get_cuda_rng_tracker``)."""
    return _tracker


def model_parallel_seed(seed: int, mpu: Any = None) -> None:
    """Seed the shared stream with ``seed`` and this rank's model-parallel stream with
    ``seed + 2718 + tp_rank`` (see the module note). Call it on every rank after
    ``initialize_model_parallel`` (``mpu``: a user's model parallel unit instead of the current one)."""
    unit = mpu if mpu is not None else get_model_parallel_unit()
    tp_rank = _tensor_parallel_rank(unit) if unit is not None else 0
    _device_rng_calls()[2](seed)
    _tracker.reset()
    _tracker.add(MODEL_PARALLEL_RNG, seed + _SEED_OFFSET + tp_rank)


def _tensor_parallel_rank(mpu: Any) -> int:
    # older Megatron units name only the model-parallel group, which is then the tensor-parallel one
    for name in ("get_tensor_model_parallel_rank", "get_slice_parallel_rank", "get_model_parallel_rank"):
        fn = getattr(mpu, name, None)
        if callable(fn):
            return int(fn())
    raise TypeError(f"mpu {type(mpu).__name__} has no get_tensor_model_parallel_rank(), get_slice_parallel_rank() "
                    "or get_model_parallel_rank(): model_parallel_seed() needs this rank's tensor-parallel index")
