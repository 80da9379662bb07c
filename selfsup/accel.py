"""Where a stage computes: one Accelerator factory, and how many CPU threads a small problem gets.

Every stage builds its :class:`accelerate.Accelerator` here, so every stage runs on the CPU when
there is no GPU (also under ``accelerate launch --multi_gpu``), resolves ``mixed_precision: auto``
the same way (:mod:`selfsup.precision`) and survives a second run in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from selfsup.errors import UsageError
from selfsup.precision import announce, resolve_precision
from selfsup.runlog import check_tracker

# Below this many values (samples x features x classes) a problem is thousands of tiny matrix
# products: BLAS and torch intra-op threads spend them waiting for each other (measured 100x
# slower than one thread for L-BFGS on a busy 2-core machine).
SMALL_PROBLEM_VALUES = 50_000_000


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_accelerator(
    precision: str | None = "auto", *, log_with: str = "none", project_dir: str | None = None
) -> Accelerator:
    """The process's Accelerator, on the CPU when no GPU is visible.

    ``precision`` (``auto | no | bf16 | fp16``) is resolved for this machine by
    :func:`~selfsup.precision.resolve_precision` and read back as ``accelerator.mixed_precision``;
    ``None`` leaves it to accelerate (its launcher's flag, else fp32), for stages that autocast
    themselves. ``log_with="tensorboard"`` needs the package (checked first, one line).
    """
    device = default_device()
    # `accelerate launch --multi_gpu` on a machine without GPUs starts W processes but accelerate
    # only joins them (gloo, MULTI_CPU) when told to use the CPU.
    kwargs: dict[str, Any] = {"cpu": device.type == "cpu"}
    if precision is not None:
        precision = resolve_precision(precision, device)
        kwargs["mixed_precision"] = precision
    if log_with != "none":
        check_tracker(log_with)
        kwargs.update(log_with=log_with, project_dir=project_dir)
    try:
        return Accelerator(**kwargs)
    except ValueError as err:
        if "already been initialized" not in str(err):  # e.g. fp16 without a GPU
            raise UsageError(f"mixed_precision={precision}: {err}") from None
    # A second run in this process with another precision: accelerate keeps its state per process;
    # reset it (the process group, held by PartialState, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)


def announce_precision(accelerator: Accelerator, asked: str) -> None:
    """One stderr line (main process) saying which arithmetic runs, and why when ``auto`` chose it."""
    if accelerator.is_main_process:
        announce(asked, accelerator.mixed_precision, accelerator.device)


def released(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The trained module as a stage hands it on (export, quantization, the next stage): out of its
    DDP/compile wrappers and without the autocast that ``accelerator.prepare`` patched into its
    ``forward`` (removed in place), so its graph is fp32 whatever precision the run trained in.

    Call it once training is over: the prepared model shares the module and trains in fp32 after.
    """
    net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    low = sorted(
        {str(t.dtype) for t in net.state_dict().values() if t.is_floating_point()} - {"torch.float32"}
    )
    assert not low, f"a prepared model holds {low} tensors: autocast must not change the stored weights"
    return net


def threads_for(n_values: int) -> int | None:
    """Threads for a CPU problem of ``n_values``: 1 when small (see :data:`SMALL_PROBLEM_VALUES`),
    ``None`` (the library's default) otherwise."""
    return 1 if n_values < SMALL_PROBLEM_VALUES else None
