"""CPU or CUDA, decided once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import psutil
import torch


@dataclass(frozen=True)
class Accelerator:
    name: str  # "cpu" or "cuda"

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.name == "cuda" else "gloo"

    def device(self, local_rank: int = 0) -> torch.device:
        if self.name == "cuda":
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        if self.name == "cuda":
            torch.cuda.set_device(self.device(local_rank))

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()

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


@lru_cache(maxsize=1)
def get_accelerator() -> Accelerator:
    """CUDA when present, unless SHARDSPEED_ACCELERATOR (or DS_ACCELERATOR) says otherwise."""
    forced = os.environ.get("SHARDSPEED_ACCELERATOR") or os.environ.get("DS_ACCELERATOR")
    if forced:
        if forced not in ("cpu", "cuda"):
            raise ValueError(f"SHARDSPEED_ACCELERATOR={forced!r}: expected 'cpu' or 'cuda'")
        return Accelerator(forced)
    return Accelerator("cuda" if torch.cuda.is_available() else "cpu")
