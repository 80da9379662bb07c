"""Datasets that need no download: scikit-learn's digits (the demo default) and synthetic images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from selfsup.errors import UsageError
from selfsup.imagefolder import listing, warn_once


class ArrayImages(Dataset):
    """Labelled uint8 images (N, H, W, 3) served as PIL images, like torchvision's datasets."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], transform=None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8x8 digits, upsampled (bicubic) to RGB ``image_size`` squares."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for img in digits.images:  # values 0..16
        gray = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8))
        images.append(np.asarray(gray.resize((image_size, image_size), Image.BICUBIC).convert("RGB")))
    return np.stack(images), digits.target.astype(np.int64)


def stratified_split(
    targets: np.ndarray,
    val_fraction: float,
    seed: int = 0,
    *,
    class_names: Sequence[str] | None = None,
    name: str = "dataset",
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of indices into (train, val), for any class sizes.

    scikit-learn's stratified ``train_test_split`` does the split (so splits it could already make
    stay exactly as they were), within these guarantees it does not give by itself:

    * a class with a single image cannot be split: it goes wholly to train (a warning names it);
    * every other class has at least one image on each side, so val holds at least one image per
      such class even when ``val_fraction`` asks for fewer (a warning says how many are held out);
    * a val split that would be empty (no class has 2 images) is a :class:`UsageError`.

    ``class_names`` and ``name`` only make the messages readable.
    """
    from sklearn.model_selection import train_test_split

    targets = np.asarray(targets)
    labels, inverse, counts = np.unique(targets, return_inverse=True, return_counts=True)
    splittable = counts[inverse] >= 2
    k = int((counts >= 2).sum())
    if k == 0:
        raise UsageError(
            f"{name}: no class has 2 or more images, so no validation images can be held out of the training "
            "images; add images, or give a separate validation set (a val/<class>/ folder beside train/)"
        )
    singles = labels[counts < 2]
    if len(singles):
        named = [class_names[i] if class_names is not None else str(i) for i in singles]
        warn_once(
            f"{name}: {len(singles)} class(es) with a single image go wholly to train (too few to split; they have "
            f"no validation image): {listing(named)}"
        )
    indices = np.flatnonzero(splittable)
    n = len(indices)
    wanted = math.ceil(val_fraction * n)  # what scikit-learn holds out for a fractional test_size
    n_val = min(max(wanted, k), n - k)
    if n_val != wanted:
        warn_once(
            f"{name}: val_fraction={val_fraction} of {n} images is {wanted}, but each of the {k} classes needs at "
            f"least one validation and one training image: holding out {n_val}"
        )
    _, val = train_test_split(indices, test_size=n_val, stratify=targets[indices], random_state=seed)
    in_val = np.zeros(len(targets), dtype=bool)
    in_val[val] = True
    _balance_lopsided(in_val, inverse, counts, seed)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)  # single-image classes are all in train


def _balance_lopsided(in_val: np.ndarray, inverse: np.ndarray, counts: np.ndarray, seed: int) -> None:
    """Give every class of 2+ images one image on each side of ``in_val`` (a mask, changed in place).

    scikit-learn shares val out in proportion to class sizes, so with very uneven classes a small one
    can still end up wholly on one side: move one of its images (drawn with ``seed``) across.
    ``inverse`` and ``counts`` are each image's class index and each class's size (``np.unique``).
    """
    val_counts = np.bincount(inverse[in_val], minlength=len(counts))
    lopsided = np.flatnonzero((counts >= 2) & ((val_counts == 0) | (val_counts == counts)))
    if len(lopsided):
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        rng = np.random.default_rng(seed)
        for c in lopsided:
            in_val[rng.choice(order[starts[c] : starts[c + 1]])] ^= True


def synthetic_arrays(
    num_samples: int, num_classes: int, image_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is visible (a class colour and stripe frequency) under heavy noise.

    Learnable but not trivial: enough for tests to tell a working pipeline from a broken one.
    """
    class_rng = np.random.default_rng(12345)  # the same classes for every split
    colours = class_rng.uniform(0.2, 0.8, size=(num_classes, 3))
    freqs = class_rng.uniform(0.5, 3.0, size=num_classes)
    rng = np.random.default_rng(seed)
    targets = np.arange(num_samples) % num_classes
    rng.shuffle(targets)
    coords = np.linspace(0, 2 * np.pi, image_size)
    images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
    for i, c in enumerate(targets):
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.broadcast_to(0.5 + 0.5 * np.sin(freqs[c] * coords + phase), (image_size, image_size))
        img = (
            0.6 * colours[c][None, None, :]
            + 0.25 * stripes[..., None]
            + rng.normal(0, 0.12, (image_size, image_size, 3))
        )
        images[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return images, targets


def channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = x.mean(axis=0), x.std(axis=0)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)  # type: ignore[return-value]
