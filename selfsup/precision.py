"""Which arithmetic a run uses: ``auto`` picks bf16 only where the hardware runs it natively.

bf16 autocast pays off on GPUs with bf16 units and on CPUs with AVX-512 BF16 or AMX (about 4x the
fp32 matmul rate). On CPUs without them (AVX2 only) PyTorch emulates bf16 and it is hundreds of
times slower than fp32 (measured on a 2-core AVX2 EPYC: 0.28 vs 111 GFLOP/s for a 2048-square
matmul; a small-ViT MoCo step 77 s vs 4.7 s). So the precision is detected, never assumed.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Literal

import torch

Precision = Literal["auto", "no", "bf16", "fp16"]
_WARNED: list[bool] = []


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (x86: AVX-512 BF16 or AMX).

    torch reports the x86 features; on other CPUs (ARM, POWER) a short timed matmul decides.
    """
    probes = [
        getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    ]
    if all(p is not None for p in probes) and torch.backends.cpu.get_cpu_capability().startswith(
        ("AVX", "DEFAULT")
    ):
        return any(p() for p in probes)
    return bf16_speed_ratio() >= 1.0


def matmul_gflops(dtype: torch.dtype, n: int = 256, min_seconds: float = 0.05) -> float:
    """Measured GFLOP/s of an n x n matmul in ``dtype`` on the CPU (at least ``min_seconds`` of work)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up (kernel selection, allocation)
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2.0 * n**3 * runs / elapsed / 1e9


def bf16_speed_ratio() -> float:
    """bf16 matmul speed over fp32 on this CPU (> 1: bf16 is native; << 1: emulated)."""
    return matmul_gflops(torch.bfloat16) / matmul_gflops(torch.float32)


def resolve_precision(requested: str, device: torch.device | str, *, quiet: bool = False) -> str:
    """``auto`` -> ``bf16`` or ``no`` for ``device``; an explicit choice is kept (with a warning
    when it is bf16 on a CPU that emulates it). Returns ``"no" | "bf16" | "fp16"``."""
    device = torch.device(device)
    if requested == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch --mixed_precision X
        if launcher in ("no", "bf16", "fp16"):
            return launcher
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "no"
        return "no"
    if (
        requested == "bf16"
        and device.type == "cpu"
        and not cpu_has_native_bf16()
        and not quiet
        and not _WARNED
    ):
        _WARNED.append(True)  # once per process: several stages may resolve the same choice
        ratio = bf16_speed_ratio()
        print(
            f"warning: bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): a bf16 matmul "
            f"runs at {ratio:.3g}x the fp32 speed here (about {1 / max(ratio, 1e-9):.0f}x slower); "
            "use mixed_precision=auto (or no) unless you are measuring this",
            file=sys.stderr,
        )
    return requested


def describe_cpu() -> str:
    """One line naming the CPU and its vector instruction set, to print beside any timing."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}"
