"""Throughput of training steps: samples/s, tokens/s, achieved TFLOP/s and MFU.

MFU is achieved FLOP/s over peak FLOP/s per rank. The peak is the config's ``peak_tflops`` or
measured once: the best of a few large matmuls in the compute dtype on this device (so MFU is
against what this machine does, not a datasheet).
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from shardspeed.accelerator import get_accelerator


@lru_cache(maxsize=4)
def measure_peak_tflops(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 4) -> float:
    acc = get_accelerator()
    device = acc.device()
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        acc.synchronize()
        t = time.perf_counter()
        a @ b
        acc.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


class Throughput:
    """Figures for one optimizer step of ``samples`` samples (global) taking ``seconds``."""

    def __init__(self, world_size: int, seq_length: int | None, peak_tflops: float | None,
                 n_params: int, dtype: torch.dtype):
        self.world, self.seq, self.n_params, self.dtype = world_size, seq_length, n_params, dtype
        self._peak = peak_tflops
        self.forward_flops_per_sample: float | None = None  # measured by the FLOPs profiler, when it ran

    @property
    def peak_tflops(self) -> float:
        if self._peak is None:
            self._peak = measure_peak_tflops(self.dtype)
        return self._peak

    def flops_per_sample(self) -> float | None:
        """Training FLOPs of one sample: 3x the profiled forward (backward is about twice the
        forward), else 6 x parameters x tokens (the usual dense-transformer estimate)."""
        if self.forward_flops_per_sample is not None:
            return 3.0 * self.forward_flops_per_sample
        if self.seq is not None:
            return 6.0 * self.n_params * self.seq
        return None

    def report(self, samples: int, seconds: float) -> dict[str, float]:
        out = {"samples_per_sec": samples / seconds}
        if self.seq is not None:
            out["tokens_per_sec"] = samples * self.seq / seconds
        fps = self.flops_per_sample()
        if fps is not None:
            tflops = fps * samples / seconds / self.world / 1e12  # per rank
            out["tflops_per_rank"] = tflops
            out["mfu"] = tflops / self.peak_tflops
        return out
