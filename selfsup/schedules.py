"""Learning-rate schedules as closed forms of the fractional epoch, shared by every training stage.

``progress`` is ``epoch + i / iters_per_epoch`` as the official loops compute it (MoCo v3
``main_moco.py`` ``adjust_learning_rate``, MAE ``util/lr_sched.py``). lightly's
``cosine_schedule`` divides by ``max_steps - 1`` and pins the last step to the end value, so it
differs from the official formula by one step; we keep the official closed forms.
"""

from __future__ import annotations

import math


def warmup_cosine(
    progress: float, peak_lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0
) -> float:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_epochs``, then a half-cycle cosine to
    ``min_lr`` at ``epochs`` (MAE ``lr_sched.adjust_learning_rate``).

    With ``warmup_epochs=0``, ``min_lr=0`` and an integer ``progress`` this is MoCo v3's per-epoch
    cosine of ``main_lincls.py``.
    """
    if progress < warmup_epochs:
        return peak_lr * progress / warmup_epochs
    cosine = 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_epochs) / (epochs - warmup_epochs)))
    return min_lr + (peak_lr - min_lr) * cosine


def scaled_lr(base_lr: float, global_batch: int, reference: int = 256) -> float:
    """The linear scaling rule: lr = base_lr × global_batch / reference (256 in MoCo v3 and MAE,
    512 in DeiT's fine-tuning, which MoCo v3's transfer recipe uses)."""
    return base_lr * global_batch / reference


def apply_lr(optimizer, lr: float) -> None:
    """Set every parameter group's lr to ``lr`` times its ``lr_scale`` (timm's layer-wise decay
    groups carry one; without this their scale would have no effect)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
