"""Which arithmetic a run uses: ``auto`` picks bf16 only where the hardware runs it natively.

bf16 autocast pays off on GPUs with bf16 units and on CPUs with AVX-512 BF16 or AMX (about 4x the
fp32 matmul rate). On CPUs without them (AVX2 only) PyTorch emulates bf16 and it is hundreds of
times slower than fp32 (measured on a 2-core AVX2 EPYC: 0.28 vs 111 GFLOP/s for a 2048-square
matmul; a small-ViT MoCo step 77 s vs 4.7 s). So the precision is detected, never assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from typing import Literal

import torch

from selfsup.errors import UsageError

# The one vocabulary of every stage's ``mixed_precision`` key and flag (accelerate's, plus ``auto``):
# ``no`` is fp32 arithmetic; ``fp16`` is CUDA-only and trains through a gradient scaler.
Precision = Literal["auto", "no", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "no", "bf16", "fp16")
# Overrides the detection: 1 = treat this CPU as bf16-native, 0 = as emulating it. For running the
# test suite as the other kind of CPU would (slowly, where bf16 is emulated), never for speed.
NATIVE_BF16_ENV = "SELFSUP_NATIVE_BF16"
_WARNED: list[bool] = []


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matmul instructions (x86: AVX-512 BF16 or AMX).

    torch reports the x86 features; on other CPUs (ARM, POWER) a short timed matmul decides.
    ``SELFSUP_NATIVE_BF16=1|0`` overrides both.
    """
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
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
    when it is bf16 on a CPU that emulates it). Returns ``"no" | "bf16" | "fp16"``.

    Every stage resolves its ``mixed_precision`` here, so the five stages share one vocabulary
    (:data:`PRECISIONS`) and one rule. fp16 is refused off CUDA (CPUs have no fp16 autocast worth
    the name, and its gradient scaler is CUDA's).
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise UsageError(
            f"mixed_precision={requested!r} is not one of {', '.join(PRECISIONS)} "
            "(no = fp32; auto = bf16 where the hardware runs it natively)"
        )
    if requested == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch --mixed_precision X
        requested = launcher if launcher in ("no", "bf16", "fp16") else _auto(device)
    if requested == "fp16" and device.type != "cuda":
        raise UsageError(
            f"mixed_precision=fp16 needs a CUDA GPU (this run is on {device.type}): use bf16 or no"
        )
    if requested == "bf16" and device.type == "cpu" and not quiet:
        _warn_if_emulated()
    return requested


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def _warn_if_emulated() -> None:
    """Once per process (several stages may resolve the same choice), unless the detection is forced."""
    if cpu_has_native_bf16() or _WARNED or NATIVE_BF16_ENV in os.environ:
        return
    _WARNED.append(True)
    ratio = bf16_speed_ratio()
    print(
        f"warning: bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): a bf16 matmul "
        f"runs at {ratio:.3g}x the fp32 speed here (about {1 / max(ratio, 1e-9):.0f}x slower); "
        "use mixed_precision=auto (or no) unless you are measuring this",
        file=sys.stderr,
    )


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    """``--mixed-precision``, the same flag with the same values in every stage's command."""
    parser.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        help="auto (default: bf16 where the hardware runs it natively, else fp32), no (fp32), bf16, "
        "fp16 (CUDA only; same as mixed_precision=...)",
    )


def autocast_dtype(resolved: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (``None`` for ``no``: fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)


def autocast(device: torch.device | str, resolved: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved precision; a no-op for ``no``. For the stages that run
    their own forward passes (probe, tta); the training stages get theirs from accelerate."""
    dtype = autocast_dtype(resolved)
    device = torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def announce(asked: str, chosen: str, device: torch.device | str) -> None:
    """The one stderr line a stage prints about its arithmetic (and why, when ``auto`` chose it)."""
    kind = torch.device(device).type
    why = f" (auto: {'bf16 is native' if chosen == 'bf16' else 'no native bf16'} on {kind})"
    print(f"precision: {chosen}{why if asked == 'auto' else ''}", file=sys.stderr)


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
