"""Does this device compute bf16 natively, or emulate it?

[Note: native bf16] On CPUs without bf16 instructions (AVX2-only x86, measured on the project's
machines) torch emulates a bf16 matmul at ~0.6 GFLOP/s against ~58 GFLOP/s in fp32: ~100x slower,
so bf16 there is never a speed choice. With AVX512-BF16 or AMX (x86) or the BF16 extension (Arm)
bf16 is the faster dtype. The answer comes from, in order:
1. ``SHARDSPEED_NATIVE_BF16=0|1`` in the environment (tests, and users who know better);
2. CUDA: ``torch.cuda.is_bf16_supported()``;
3. CPU on Linux: the instruction-set flags of ``/proc/cpuinfo``;
4. CPU elsewhere (no flags to read): a tiny timed matmul, bf16 against fp32. Emulation is two
   orders of magnitude slower, so a generous threshold cannot confuse the two.
Steps 2-4 run once per process (cached); the environment is read on every call so a test can
flip it without clearing caches.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

ENV = "SHARDSPEED_NATIVE_BF16"
# Flags that mean bf16 arithmetic in hardware: x86 AVX512-BF16 and AMX-BF16; Arm's BF16 extension
# (``bf16`` on aarch64's Features line; x86 has no flag spelled exactly ``bf16``).
_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Emulated bf16 is ~100x slower than fp32; native bf16 is faster than fp32. Anything up to 4x slower
# is called native so that timer noise on a busy machine cannot flip a native CPU to "emulated".
_EMULATED_RATIO = 4.0


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    reason: str  # for the log line: why we think so ("capability AVX2, no avx512_bf16/amx_bf16 flag")


def native_bf16(device_type: str = "cpu") -> Bf16Support:
    """Whether ``device_type`` ("cpu" or "cuda") computes bf16 natively (see Note: native bf16)."""
    forced = os.environ.get(ENV)
    if forced is not None and forced.strip() != "":
        if forced.strip() not in ("0", "1"):
            raise ValueError(f"{ENV}={forced!r}: expected 0 (emulated: use fp32) or 1 (native bf16)")
        return Bf16Support(forced.strip() == "1", f"{ENV}={forced.strip()}")
    if device_type == "cuda":
        return _cuda_bf16()
    return _cpu_bf16()


@lru_cache(maxsize=1)
def _cuda_bf16() -> Bf16Support:
    ok = torch.cuda.is_bf16_supported()
    return Bf16Support(ok, f"torch.cuda.is_bf16_supported() is {ok}")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's instruction-set flags (x86 ``flags``, aarch64 ``Features``), None where unreadable."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def _cpu_bf16() -> Bf16Support:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if flags is not None:
        found = sorted(f for f in _NATIVE_FLAGS if f in flags)
        if found:
            return Bf16Support(True, f"capability {capability}, CPU flags {'/'.join(found)}")
        return Bf16Support(False, f"capability {capability}, no avx512_bf16/amx_bf16/bf16 CPU flag")
    ratio = bf16_slowdown()
    return Bf16Support(ratio <= _EMULATED_RATIO,
                       f"capability {capability}, a bf16 matmul took {ratio:.1f}x the time of fp32")


def bf16_slowdown(n: int = 256, reps: int = 3) -> float:
    """Time of an n x n bf16 matmul over the fp32 one (best of ``reps``, after a warm-up).

    256 keeps it cheap where bf16 is emulated: 34 MFLOP at ~0.6 GFLOP/s is ~60 ms per repetition.
    """
    def best(dtype: torch.dtype) -> float:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up: first call pays for kernel selection
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)
