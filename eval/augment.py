"""Augmented training views for the linear probe (``linear_head.augment=true``), as published probes train.

Both official scripts (MoCo v3 ``main_lincls.py``, MAE ``main_linprobe.py``) train the head on
RandomResizedCrop (scale 0.08-1, i.e. the whole image range) + horizontal-flip views, embedded by
the frozen backbone anew every epoch. :func:`augmented_batches` returns that as a callable over
(epoch, batch size, drop_last) for :func:`selfsup.eval.linear_head.train_linear_head`; the features
are not cached (each epoch's views differ). The views use the eval transform's size and
normalisation, so only the crop and the flip differ from the cached features the head is tested on.

torchvision's ``RandomResizedCrop`` is MoCo v3's sampler (up to 10 tries, then a centre crop); MAE's
``util/crop.py`` draws once and clamps the box to the image instead, a minor difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from selfsup.eval.linear_head import AugmentedBatches, resolve_protocol
from selfsup.features import embed
from selfsup.imagefolder import collate_skip_none
from selfsup.precision import resolve_precision

CROP_SCALE = (0.08, 1.0)  # torchvision's default, used by both official scripts


def train_view_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear"
):
    """RandomResizedCrop(img_size, scale 0.08-1) + horizontal flip + the eval transform's normalisation."""
    mode = transforms.InterpolationMode(interpolation)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(img_size, scale=CROP_SCALE, interpolation=mode),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def augmented_batches(
    model: torch.nn.Module,
    dataset,
    feature: str = "cls",
    *,
    device: torch.device | str = "cpu",
    mixed_precision: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
) -> AugmentedBatches:
    """``batches(epoch, batch_size, drop_last)``: shuffled batches of frozen features of augmented views.

    ``dataset`` applies the random views itself (e.g. :func:`train_view_transform`). The shuffle is
    seeded by (seed, epoch), so a run repeats; the backbone stays in eval mode and gets no gradient.
    """
    device = torch.device(device)
    model = model.eval().requires_grad_(False).to(device)
    precision = resolve_precision(mixed_precision, device)

    def batches(epoch: int, batch_size: int, drop_last: bool):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=collate_skip_none,
            pin_memory=device.type == "cuda",
        )
        for images, targets in loader:
            yield embed(model, images, feature, device, precision), targets.long()

    return batches


def probe_augmented_batches(config, source, info) -> AugmentedBatches:
    """The callable for one ``probe`` source: its backbone, the dataset's train split, its protocol's crops."""
    from selfsup.data import build_dataset

    mean, std = source.mean or info.mean, source.std or info.std  # as the cached eval features
    protocol = resolve_protocol(config.linear_protocol, config.linear_head)
    transform = train_view_transform(source.spec.img_size, mean, std, protocol.interpolation)
    dataset, _ = build_dataset(config.dataset, "train", transform, config.data)
    head_device = config.linear_head.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if head_device == "auto" else head_device
    return augmented_batches(
        source.build(),
        dataset,
        config.feature,
        device=device,
        mixed_precision=config.mixed_precision,
        num_workers=config.num_workers,
        seed=config.linear_head.seed,
    )
