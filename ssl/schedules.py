"""Per-iteration schedules of the official ``main_moco.py`` as pure functions of a fractional epoch.

``progress`` is ``epoch + i / iters_per_epoch`` exactly as the official loop computes it.
lightly's ``cosine_schedule`` divides by ``max_steps - 1`` and pins the last step to the end
value, so it differs from the official formula by one step; we keep the official closed forms.
"""

from __future__ import annotations

import math


def learning_rate(progress: float, peak_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0 to ``peak_lr``, then half-cycle cosine to 0 (``adjust_learning_rate``)."""
    if progress < warmup_epochs:
        return peak_lr * progress / warmup_epochs
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_epochs) / (epochs - warmup_epochs)))


def moco_momentum(progress: float, base_momentum: float, epochs: float, cosine: bool = True) -> float:
    """m = 1 - 0.5·(1 + cos(π·progress/epochs))·(1 - m0): from m0 up to 1 (``adjust_moco_momentum``)."""
    if not cosine:
        return base_momentum
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress / epochs)) * (1.0 - base_momentum)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the official code: lr = base_lr × global_batch / 256."""
    return base_lr * global_batch / 256
