"""Evaluation-time preprocessing shared by every stage (training augmentations live in the stages)."""

from __future__ import annotations

from collections.abc import Sequence

from timm.data import create_transform


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], native_size: int | None = None
):
    """Resize + centre crop + normalize, as timm does for evaluation.

    Small images (CIFAR, digits) are used whole: when the model's input size is the native size,
    no crop is taken (crop_pct=1), instead of timm's ImageNet default of 0.875.
    """
    crop_pct = 1.0 if native_size is not None and native_size <= img_size else 0.875
    return create_transform(img_size, is_training=False, mean=tuple(mean), std=tuple(std), crop_pct=crop_pct)
