"""The ``pretrained_cfg`` every registered architecture starts from (timm's fields, ImageNet defaults)."""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def timm_cfg(**overrides) -> dict:
    """timm's default-config dict: no weights URL (weights come from selfsup checkpoints)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        **overrides,
    }
