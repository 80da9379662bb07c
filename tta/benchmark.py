"""Corruption sets on disk and the streams of test batches the protocols make of them.

Layout (RobustBench's, used by the released CIFAR-10-C / CIFAR-100-C and by ``generate``):
``<corruption>.npy`` holding (S x N, H, W, 3) uint8 images, the N test images at each of S
severities in order (S = 5 for released sets), and ``labels.npy`` of N or S x N labels. A regenerated
set adds ``manifest.json`` (which severities it holds, its parameters) and ``clean.npy`` (the N
clean images, for accuracy after adaptation and EATA's Fisher information).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import UsageError
from selfsup.tta.corruptions import BENCHMARK, CORRUPTIONS, HELD_OUT
from selfsup.tta.folder_set import FolderSet, is_folder_set, open_folder_set, read_batches
from selfsup.tta.label_shift import label_shift_order

# names accepted by --dataset, and the folder RobustBench downloads them to under a data root
RELEASED = {"cifar10-c": "CIFAR-10-C", "cifar100-c": "CIFAR-100-C"}
PROTOCOLS = ("reset", "continual", "mixed")


_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one of the set's files once its header says what it holds and the file is that
    long: a partial download would fail inside mmap ("mmap length is greater than file size") or
    numpy, naming no file. Never unpickles (numpy's default)."""
    redo = "download it again or re-generate the set (python -m selfsup.tta.generate)"
    try:
        with path.open("rb") as file:
            read_header = _HEADERS.get(np.lib.format.read_magic(file))
            if read_header is not None:
                shape, _, dtype = read_header(file)
                expected = file.tell() + math.prod(shape) * dtype.itemsize
                if path.stat().st_size < expected:
                    raise UsageError(
                        f"{path} is truncated: {path.stat().st_size} of the {expected} bytes its header "
                        f"promises ({shape} {dtype}); {redo}"
                    )
        return np.load(path, mmap_mode=mmap_mode)
    except (ValueError, OSError) as err:  # not a .npy file, an object array, unreadable
        raise UsageError(f"{path} is not a readable .npy array ({err}); {redo}") from None


@dataclass
class CorruptionSet:
    root: Path
    regenerated: bool
    severities: tuple[int, ...]  # the severities stored, in order
    size: int  # N, test images per severity
    available: tuple[str, ...]  # corruptions present, in the benchmark's order
    labels: np.ndarray  # the N labels (released sets repeat them for each severity: read once)
    image_size: int  # the images' side (H)
    manifest: dict = field(default_factory=dict)

    def check(self, name: str, severity: int) -> tuple[np.ndarray, int]:
        """The stored file of ``name`` (memory-mapped, nothing read) and where ``severity`` starts in
        it; one error line when the severity is not stored or the file's shape is off."""
        if severity not in self.severities:
            raise UsageError(
                f"{self.root} holds severities {', '.join(map(str, self.severities))}, not {severity}: "
                "pick one of those or regenerate the set with --severities"
            )
        stored = load_npy(self.root / f"{name}.npy", mmap_mode="r")
        if stored.ndim != 4 or stored.shape[0] != self.size * len(self.severities) or stored.shape[-1] != 3:
            raise UsageError(
                f"{self.root / f'{name}.npy'} has shape {stored.shape}; expected "
                f"({self.size * len(self.severities)}, H, W, 3): {len(self.severities)} severities of "
                f"{self.size} images, as labels.npy says"
            )
        if stored.dtype != np.uint8:
            raise UsageError(f"{self.root / f'{name}.npy'} holds {stored.dtype}; expected uint8 images")
        return stored, self.severities.index(severity) * self.size

    def images(self, name: str, severity: int) -> np.ndarray:
        stored, start = self.check(name, severity)
        return np.asarray(stored[start : start + self.size])

    def clean(self) -> np.ndarray | None:
        path = self.root / "clean.npy"
        return load_npy(path) if path.is_file() else None


def resolve_root(dataset: str, data_root: str | None) -> Path:
    """``cifar10-c``/``cifar100-c`` under ``data_root`` (RobustBench's folder names), or a folder."""
    key = dataset.lower()
    if key in RELEASED:
        root = Path(data_root or "data") / RELEASED[key]
        if not root.is_dir():
            raise UsageError(
                f"{dataset}: no folder {root}; put the released set there (RobustBench's layout: "
                f"<corruption>.npy and labels.npy) or pass --data-root, or build one offline with "
                f"python -m selfsup.tta.generate"
            )
        return root
    if key == "imagenet-c":
        root = Path(data_root or "data")
        root = root / "ImageNet-C" if (root / "ImageNet-C").is_dir() else root
        if not is_folder_set(root):
            raise UsageError(
                f"imagenet-c: {root} holds no <corruption>/<severity>/<wnid>/*.JPEG folders; pass --data-root "
                "(the released ImageNet-C, or one built by python -m selfsup.tta.generate_imagenet_c)"
            )
        return root
    root = Path(dataset)
    if not root.is_dir():
        raise UsageError(
            f"--dataset {dataset}: expected cifar10-c, cifar100-c or a folder with <corruption>.npy "
            "and labels.npy"
        )
    return root


def open_set(root: Path) -> CorruptionSet | FolderSet:
    """Read a set's labels and manifest and check that its files agree; one error line otherwise.
    ImageNet-C's image folders open as a :class:`FolderSet`, read image by image."""
    if is_folder_set(root):
        return open_folder_set(root)
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise UsageError(
            f"{root} has no labels.npy; expected RobustBench's layout (<corruption>.npy, labels.npy)"
        )
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    severities = tuple(manifest.get("severities", (1, 2, 3, 4, 5)))
    available = tuple(n for n in (*BENCHMARK, *HELD_OUT) if (root / f"{n}.npy").is_file())
    if not available:
        raise UsageError(f"{root} holds no <corruption>.npy; expected names among: {', '.join(CORRUPTIONS)}")
    labels = load_npy(labels_path)
    first = load_npy(root / f"{available[0]}.npy", mmap_mode="r")
    rows = first.shape[0]
    if rows % len(severities) or len(labels) not in (rows, rows // len(severities)):
        raise UsageError(
            f"{labels_path} holds {len(labels)} labels but {available[0]}.npy holds {rows} images "
            f"({len(severities)} severities): the labels do not match the images"
        )
    size = rows // len(severities)
    return CorruptionSet(
        root,
        bool(manifest.get("regenerated", False)),
        severities,
        size,
        available,
        labels[:size].astype(np.int64),
        first.shape[1],
        manifest,
    )


def check_corruptions(names: Sequence[str], corruption_set: CorruptionSet | FolderSet) -> tuple[str, ...]:
    for name in names:
        if name not in CORRUPTIONS:
            raise UsageError(f"unknown corruption '{name}'; expected one of: {', '.join(CORRUPTIONS)}")
        if name not in corruption_set.available:
            raise UsageError(
                f"{corruption_set.root} has no {name}; it holds: {', '.join(corruption_set.available)}"
            )
    return tuple(names)


def to_model_input(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], size: int, device: torch.device
) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> the model's normalized input: its own mean and std (from the
    checkpoint; published TTA code used ImageNet's for every ViT) at its input size (bicubic)."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    mean_t = torch.tensor(tuple(mean), device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(tuple(std), device=device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@dataclass
class Batch:
    corruption: str  # "mixed" batches hold several: see ``sources``
    images: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray
    sources: np.ndarray  # the corruption index of each image (mixed protocol)
    starts_task: bool  # the first batch of a corruption (the reset protocol resets here)


def test_order(
    labels: np.ndarray, seed: int, limit: int | None, label_shift: float | None = None
) -> np.ndarray:
    """Each corruption's images in one seeded order, the same for every method (a set stored class by
    class would otherwise give single-class batches); the first ``limit`` of them when set. With
    ``label_shift``, SAR's imbalanced label stream over those images, twice as long (SAR's 100,000
    samples over ImageNet-C's 50,000)."""
    n = len(labels) if limit is None else min(limit, len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))[:n]
    if label_shift is None:
        return order
    return order[label_shift_order(labels[order], label_shift, 2 * n, np.random.default_rng(seed + 3))]


def stream(
    corruption_set: CorruptionSet | FolderSet,
    names: Sequence[str],
    severity: int,
    protocol: str,
    batch_size: int,
    seed: int = 0,
    limit: int | None = None,
    label_shift: float | None = None,
    workers: int = 0,
) -> Iterator[Batch]:
    """The test batches in :func:`test_order`; ``mixed`` shuffles every corruption's images into one
    stream. Folder sets are read image by image by ``workers``."""
    labels = corruption_set.labels
    order = test_order(labels, seed, limit, label_shift)
    if isinstance(corruption_set, FolderSet):
        yield from _folder_stream(corruption_set, names, severity, protocol, batch_size, seed, order, workers)
        return
    if protocol == "mixed":
        pool = [(i, j) for i in range(len(names)) for j in order]
        mixed_order = np.random.default_rng(seed + 1).permutation(len(pool))
        loaded = [corruption_set.images(name, severity) for name in names]
        for start in range(0, len(pool), batch_size):
            picks = [pool[k] for k in mixed_order[start : start + batch_size]]
            sources = np.array([i for i, _ in picks])
            index = np.array([j for _, j in picks])
            images = np.stack([loaded[i][j] for i, j in picks])
            yield Batch("mixed", images, labels[index], sources, start == 0)
        return
    for i, name in enumerate(names):
        images = corruption_set.images(name, severity)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield Batch(name, images[index], labels[index], np.full(len(index), i), start == 0)


def _folder_stream(
    folder_set: FolderSet,
    names: Sequence[str],
    severity: int,
    protocol: str,
    batch_size: int,
    seed: int,
    order: np.ndarray,
    workers: int,
) -> Iterator[Batch]:
    """:func:`stream`'s batches (the same orders) read from image folders by a DataLoader."""
    if protocol == "mixed":
        pool = np.array([(i, j) for i in range(len(names)) for j in order])
        pool = pool[np.random.default_rng(seed + 1).permutation(len(pool))]
        picks = [pool[start : start + batch_size] for start in range(0, len(pool), batch_size)]
        starts = [k == 0 for k in range(len(picks))]
    else:
        picks, starts = [], []
        for i in range(len(names)):
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                picks.append(np.stack([np.full(len(index), i), index], axis=1))
                starts.append(start == 0)
    sources = [folder_set.images(name, severity) for name in names]
    for pick, first, images in zip(picks, starts, read_batches(sources, picks, workers)):
        corruption = "mixed" if protocol == "mixed" else names[pick[0, 0]]
        yield Batch(corruption, images, folder_set.labels[pick[:, 1]], pick[:, 0], first)
