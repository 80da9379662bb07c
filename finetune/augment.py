"""Fine-tuning's training images: DeiT's augmentation through timm, or the low-resolution variant.

At 224 px (the paper's setting) timm's ``create_transform`` builds DeiT's pipeline: random resized
crop, flip, RandAugment, normalization, random erasing. At 64 px or less, a random resized crop of
scale 0.08 leaves a few pixels of the object, so the low-resolution mode pads and randomly crops
(the CIFAR convention) before the same RandAugment, normalization and erasing. Mixup/cutmix act on
batches (:mod:`selfsup.finetune.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from selfsup.finetune.settings import AugmentSettings
from selfsup.transforms import is_low_res


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with 0 bits kept meaning black, as in TF's RandAugment and older Pillow.

    timm's ``PosterizeIncreasing`` asks for 0 bits at magnitudes >= 10 (m9 with mstd 0.5 reaches
    them), which Pillow 11+ rejects ("bits must be between 1 and 8"), ending the run. Written here
    until timm clamps it.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Any) -> Any:
    """Replace the posterize op inside any RandAugment of ``transform`` (a Compose or a RandAugment)."""
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def train_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], a: AugmentSettings
) -> Callable:
    """PIL image -> normalised, augmented tensor."""
    return _fix_posterize(_train_transform(img_size, mean, std, a))


def _train_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], a: AugmentSettings
) -> Callable:
    if not is_low_res(img_size):
        return create_transform(
            img_size,
            is_training=True,
            scale=(a.min_scale, 1.0),
            hflip=a.hflip,
            color_jitter=None,
            auto_augment=a.rand_augment,
            interpolation="bicubic",
            re_prob=a.random_erasing,
            re_mode="pixel",
            mean=tuple(mean),
            std=tuple(std),
        )
    padding = a.crop_padding if a.crop_padding is not None else img_size // 8
    ops: list[Any] = [
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),  # no-op at the native size
        T.RandomCrop(img_size, padding=padding, padding_mode="reflect"),
        T.RandomHorizontalFlip(a.hflip),
    ]
    if a.rand_augment:
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        ops.append(rand_augment_transform(a.rand_augment, hparams))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if a.random_erasing > 0:
        ops.append(RandomErasing(a.random_erasing, mode="pixel", device="cpu"))
    return T.Compose(ops)
