"""MoCo v3's momentum schedule as a pure function of the fractional epoch.

``progress`` is ``epoch + i / iters_per_epoch`` exactly as the official ``main_moco.py`` computes
it. The learning rate (warm-up + cosine) is the shared :func:`selfsup.schedules.warmup_cosine`.
"""

from __future__ import annotations

import math


def moco_momentum(progress: float, base_momentum: float, epochs: float, cosine: bool = True) -> float:
    """m = 1 - 0.5·(1 + cos(π·progress/epochs))·(1 - m0): from m0 up to 1 (``adjust_moco_momentum``)."""
    if not cosine:
        return base_momentum
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress / epochs)) * (1.0 - base_momentum)
