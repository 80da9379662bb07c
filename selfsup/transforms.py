"""Evaluation-time preprocessing shared by every stage (training augmentations live in the stages)."""

from __future__ import annotations

from collections.abc import Sequence

from timm.data import create_transform

INTERPOLATION = "bicubic"  # timm's ViTs and DeiT evaluate with bicubic resizing
# At or below this size images are CIFAR-like: used whole (no centre crop), augmented with a padded
# crop instead of a random resized one, and (fine-tuning) trained in the low-resolution mode.
LOW_RES_MAX = 64


def is_low_res(size: int) -> bool:
    return size <= LOW_RES_MAX


def eval_crop_pct(img_size: int, native_size: int | None = None) -> float:
    """The centre-crop share: 1 (no crop) for images no larger than the model's input (CIFAR,
    digits: used whole, also when upsampled), timm's ImageNet default of 0.875 otherwise. Without
    the images' size (a checkpoint's sidecar written without it), the low-resolution rule decides."""
    if native_size is None:
        return 1.0 if is_low_res(img_size) else 0.875
    return 1.0 if native_size <= img_size else 0.875


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], native_size: int | None = None
):
    """Resize + centre crop (:func:`eval_crop_pct`) + normalize, as timm does for evaluation."""
    return create_transform(
        img_size,
        is_training=False,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=eval_crop_pct(img_size, native_size),
        interpolation=INTERPOLATION,
    )
