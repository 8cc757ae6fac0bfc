"""CPU or CUDA, decided once per process.

[Note: one API on both devices] Code above this layer never asks ``torch.cuda`` directly: it asks
the accelerator for streams, events, pinned host buffers and the device a rank owns. On CPU the
stream and event calls are harmless no-ops (work there is synchronous), and "pinned" buffers are
plain ones, so the same code path runs, and is tested, on both.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import psutil
import torch


class _CpuEvent:
    """A recorded point in a CPU "stream": everything before it is already done."""

    def record(self, stream: Any = None) -> None:
        del stream

    def wait(self, stream: Any = None) -> None:
        del stream

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        raise RuntimeError("elapsed_time needs CUDA events (enable_timing=True); on CPU time with time.perf_counter")


@dataclass(frozen=True)
class Accelerator:
    name: str  # "cpu" or "cuda"

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.name == "cuda" else "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.name == "cuda"

    def device_count(self) -> int:
        return torch.cuda.device_count() if self.name == "cuda" else 1

    def device(self, local_rank: int = 0) -> torch.device:
        """The device of the rank with this ``local_rank``.

        [Note: one GPU per rank] Two ranks on one GPU would each allocate a full set of buffers there
        and NCCL refuses (or deadlocks on) two ranks of one communicator on one device, so more local
        ranks than visible GPUs is an error, never a silent ``local_rank % device_count``.
        """
        if self.name != "cuda":
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if local_rank >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else '<unset>'}): start at most {count} "
                "processes on this node (launcher --num_gpus), make more devices visible, or run on CPU with "
                "SHARDSPEED_ACCELERATOR=cpu")
        return torch.device("cuda", local_rank)

    def current_device(self) -> torch.device:
        """The device this process computes on now (after ``set_device``)."""
        if self.name == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        if self.name == "cuda":
            torch.cuda.set_device(self.device(local_rank))

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()

    # -- streams and events (no-ops on CPU) --------------------------------------------------------
    def new_stream(self) -> Any:
        """A side stream (CUDA), None on CPU; pass it to ``stream()``."""
        return torch.cuda.Stream() if self.name == "cuda" else None

    def current_stream(self) -> Any:
        return torch.cuda.current_stream() if self.name == "cuda" else None

    def stream(self, stream: Any) -> Any:
        """Context manager: run the block's kernels on ``stream`` (CPU, or ``None``: no change)."""
        if self.name == "cuda" and stream is not None:
            return torch.cuda.stream(stream)
        return nullcontext()

    def Event(self, enable_timing: bool = False) -> Any:  # noqa: N802 - the name torch.cuda uses
        return torch.cuda.Event(enable_timing=enable_timing) if self.name == "cuda" else _CpuEvent()

    def record_event(self, stream: Any = None) -> Any:
        """An event recorded now on ``stream`` (default: the current one): a later ``event.wait(s)``
        makes stream ``s`` wait for the work queued before it."""
        event = self.Event()
        if self.name == "cuda":
            event.record(stream if stream is not None else torch.cuda.current_stream())
        return event

    def wait_stream(self, waiting: Any, on: Any) -> None:
        """Make stream ``waiting`` wait for what is queued on ``on`` so far."""
        if self.name == "cuda" and waiting is not None and on is not None:
            waiting.wait_stream(on)

    # -- host buffers --------------------------------------------------------------------------------
    def pin_memory(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in page-locked host memory when CUDA exists (copies to the GPU can then be
        asynchronous, ``non_blocking=True``); ``t`` itself otherwise, or when already pinned."""
        if t.device.type != "cpu" or not torch.cuda.is_available() or t.is_pinned():
            return t
        return t.pin_memory()

    def empty_pinned(self, *size: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised host tensor, pinned when CUDA exists."""
        return torch.empty(*size, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())

    # -- random state and memory ---------------------------------------------------------------------
    def get_rng_state(self) -> torch.Tensor | None:
        """The device generator's state (CUDA); None where the CPU generator is the only one."""
        return torch.cuda.get_rng_state() if self.name == "cuda" else None

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if self.name == "cuda" and state is not None:
            torch.cuda.set_rng_state(state)

    def memory_allocated(self) -> int:
        """Bytes of live tensors on the device (CPU: resident set size of this process)."""
        if self.name == "cuda":
            return torch.cuda.memory_allocated()
        return psutil.Process().memory_info().rss

    def max_memory_allocated(self) -> int:
        if self.name == "cuda":
            return torch.cuda.max_memory_allocated()
        # ru_maxrss is the process's peak resident set, in KiB on Linux.
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak_memory_stats(self) -> None:
        if self.name == "cuda":
            torch.cuda.reset_peak_memory_stats()


@lru_cache(maxsize=1)
def get_accelerator() -> Accelerator:
    """CUDA when present, unless SHARDSPEED_ACCELERATOR (or DS_ACCELERATOR) says otherwise."""
    forced = os.environ.get("SHARDSPEED_ACCELERATOR") or os.environ.get("DS_ACCELERATOR")
    if forced:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"SHARDSPEED_ACCELERATOR={forced!r}: expected 'cpu' or 'cuda'")
        return Accelerator(forced)
    return Accelerator("cuda" if torch.cuda.is_available() else "cpu")
