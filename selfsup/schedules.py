"""Learning-rate schedules as closed forms of the fractional epoch, shared by every training stage.

``progress`` is ``epoch + i / iters_per_epoch`` as the official loops compute it (MoCo v3
``main_moco.py`` ``adjust_learning_rate``, MAE ``util/lr_sched.py``). lightly's
``cosine_schedule`` divides by ``max_steps - 1`` and pins the last step to the end value, so it
differs from the official formula by one step; we keep the official closed forms.
"""

from __future__ import annotations

import math


def warmup_cosine(progress: float, peak_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_epochs``, then a half-cycle cosine to 0 at ``epochs``.

    With ``warmup_epochs=0`` and an integer ``progress`` this is MoCo v3's per-epoch cosine of
    ``main_lincls.py``.
    """
    if progress < warmup_epochs:
        return peak_lr * progress / warmup_epochs
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_epochs) / (epochs - warmup_epochs)))


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MoCo v3 and MAE: lr = base_lr × global_batch / 256."""
    return base_lr * global_batch / 256
