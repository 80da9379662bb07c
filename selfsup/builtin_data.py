"""Datasets that need no download: scikit-learn's digits (the demo default) and synthetic images."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


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


def stratified_split(targets: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of indices into (train, val)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(targets))
    train, val = train_test_split(indices, test_size=val_fraction, stratify=targets, random_state=seed)
    return np.sort(train), np.sort(val)


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
        img = 0.6 * colours[c][None, None, :] + 0.25 * stripes[..., None] + rng.normal(0, 0.12, (image_size, image_size, 3))
        images[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return images, targets


def channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = x.mean(axis=0), x.std(axis=0)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)  # type: ignore[return-value]
