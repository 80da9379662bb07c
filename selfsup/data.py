"""The dataset registry every stage uses: a name in, a labelled dataset and its facts out.

``build_dataset(name, split)`` returns the dataset (PIL images through ``transform``, integer
labels) and a :class:`DatasetInfo` (class names, default normalization, native image size).
Splits are ``train`` and ``val``; for datasets published with a test set (CIFAR, Food-101, ...)
``val`` is that test set. Where there is no validation data (``imagefolder:`` trees without a
``val/`` folder, ``digits``) a deterministic, class-stratified ``val_fraction`` is carved from
the training data and never overlaps it.

Names: cifar10, cifar100, imagenet, imagenet22k, flowers102, pets, food101, dtd, stanford_cars,
digits, synthetic, and ``imagefolder:<path>`` for any folder of ``<class>/<image>`` files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import find_classes

from selfsup.builtin_data import ArrayImages, channel_stats, digits_arrays, stratified_split, synthetic_arrays
from selfsup.config import setting
from selfsup.errors import UsageError
from selfsup.imagefolder import (
    CorruptLog,
    SafeImageFolder,
    SplitImages,
    extension_counts,
    listing,
    native_image_size,
    warn_once,
)
from selfsup.shards import list_shards, shard_classes, shard_dataset

Split = Literal["train", "val"]
Stats = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    mean: Stats
    std: Stats
    # native size (shorter side) of the images; image folders measure it from a sample of their files,
    # WebDataset shards record ImageNet's conventional 224
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DataOptions:
    root: str | None = None
    download: bool = False
    strict: bool = False
    on_corrupt: Literal["drop", "replace"] = "drop"
    val_fraction: float = setting(0.1, gt=0, lt=1)
    seed: int = setting(0, ge=0)
    shuffle: bool = False  # only for streaming shards, whose order is set by the reader
    synthetic_size: int = setting(256, ge=1)  # images per split of the synthetic dataset
    synthetic_classes: int = setting(4, ge=1)
    synthetic_image_size: int = setting(32, ge=1)
    # False where labels are not used (pretraining): an image folder with a single class is then accepted
    need_labels: bool = True
    # False: the train split of a folder without val/ is every image (pretraining on all of it);
    # True: val_fraction is carved off and never part of train
    hold_out: bool = True


def default_root() -> str:
    return os.environ.get("SELFSUP_DATA", "data")


Builder = Callable[[Split, Callable | None, DataOptions], tuple[Any, DatasetInfo]]
_REGISTRY: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return add


def dataset_names() -> list[str]:
    return [*sorted(_REGISTRY), "imagefolder:<path>"]


def build_dataset(
    name: str,
    split: Split = "train",
    transform: Callable | None = None,
    options: DataOptions | None = None,
    **overrides: Any,
) -> tuple[Any, DatasetInfo]:
    """The ``split`` of dataset ``name`` and its :class:`DatasetInfo`; missing data is a UsageError."""
    options = options or DataOptions()
    for key, value in overrides.items():
        setattr(options, key, value)
    if split not in ("train", "val"):
        raise UsageError(f"unknown split '{split}'; expected 'train' or 'val'")
    # Checked for every dataset, also those with their own val split that never use it: a value that
    # is wrong should not be recorded in a run's config as if it had meant something.
    if not 0 < options.val_fraction < 1:
        raise UsageError(
            f"val_fraction must be strictly between 0 and 1 (the share of training images held out for "
            f"validation where a dataset has no val split), got {options.val_fraction}; e.g. 0.1"
        )
    if options.on_corrupt not in ("drop", "replace"):
        raise UsageError(f"on_corrupt must be 'drop' or 'replace', got {options.on_corrupt!r}")
    if name.startswith("imagefolder:"):
        return _imagefolder(name.split(":", 1)[1], split, transform, options)
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown dataset '{name}'{hint}; known: {', '.join(dataset_names())}")
    return _REGISTRY[name](split, transform, options)


# --- built in, no download ---------------------------------------------------------------


@register_dataset("digits")
def _digits(split: Split, transform, opts: DataOptions):
    images, targets = digits_arrays(32)
    train_idx, val_idx = stratified_split(targets, val_fraction=0.2, seed=0)
    mean, std = channel_stats(images[train_idx])
    idx = train_idx if split == "train" else val_idx
    classes = [str(d) for d in range(10)]
    info = DatasetInfo("digits", tuple(classes), mean, std, 32)
    return ArrayImages(images[idx], targets[idx], classes, transform), info


@register_dataset("synthetic")
def _synthetic(split: Split, transform, opts: DataOptions):
    seed = opts.seed * 2 + (0 if split == "train" else 1)
    images, targets = synthetic_arrays(
        opts.synthetic_size, opts.synthetic_classes, opts.synthetic_image_size, seed
    )
    classes = [f"class_{i}" for i in range(opts.synthetic_classes)]
    mean, std = channel_stats(images)
    info = DatasetInfo("synthetic", tuple(classes), mean, std, opts.synthetic_image_size)
    return ArrayImages(images, targets, classes, transform), info


# --- torchvision datasets -------------------------------------------------------------------

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))


def _torchvision(
    name: str, cls_name: str, split_args: dict[str, dict[str, Any]], stats, size: int, layout: str
):
    def build(split: Split, transform, opts: DataOptions):
        import torchvision.datasets as tvd

        root = Path(opts.root or default_root())
        try:
            dataset = getattr(tvd, cls_name)(
                str(root), transform=transform, download=opts.download, **split_args[split]
            )
        except RuntimeError as err:
            if "download" in str(err).lower() or "not found" in str(err).lower():
                raise UsageError(
                    f"{name}: no data under {root} (expected {layout}, as torchvision writes it); "
                    f"fetch it once with `selfsup-data {name} --download --data-root {root}` (every stage then "
                    f"finds it), or point --data-root / data_root= at a folder that has it"
                ) from None
            raise
        classes = getattr(dataset, "classes", None)
        if not classes:
            labels = getattr(dataset, "_labels", None) or []
            classes = [f"class_{i:03d}" for i in range(max(labels, default=-1) + 1)]
        return dataset, DatasetInfo(name, tuple(classes), *stats, size)

    register_dataset(name)(build)


_torchvision(
    "cifar10",
    "CIFAR10",
    {"train": {"train": True}, "val": {"train": False}},
    CIFAR10_STATS,
    32,
    "cifar-10-batches-py/",
)
_torchvision(
    "cifar100",
    "CIFAR100",
    {"train": {"train": True}, "val": {"train": False}},
    CIFAR100_STATS,
    32,
    "cifar-100-python/",
)
_torchvision(
    "flowers102",
    "Flowers102",
    {"train": {"split": "train"}, "val": {"split": "test"}},
    IMAGENET_STATS,
    224,
    "flowers-102/",
)
_torchvision(
    "pets",
    "OxfordIIITPet",
    {"train": {"split": "trainval"}, "val": {"split": "test"}},
    IMAGENET_STATS,
    224,
    "oxford-iiit-pet/",
)
_torchvision(
    "food101",
    "Food101",
    {"train": {"split": "train"}, "val": {"split": "test"}},
    IMAGENET_STATS,
    224,
    "food-101/",
)
_torchvision(
    "dtd", "DTD", {"train": {"split": "train"}, "val": {"split": "test"}}, IMAGENET_STATS, 224, "dtd/"
)
# torchvision can no longer download Stanford Cars: the files must be placed by hand.
_torchvision(
    "stanford_cars",
    "StanfordCars",
    {"train": {"split": "train"}, "val": {"split": "test"}},
    IMAGENET_STATS,
    224,
    "stanford_cars/ (placed by hand)",
)


# --- folders of images and shards -------------------------------------------------------------


def _imagefolder(
    path: str, split: Split, transform, opts: DataOptions, name: str | None = None, stats=IMAGENET_STATS
):
    tree = _folder_tree(Path(path).expanduser(), name or f"imagefolder:{path}")
    folder = tree.root / "val" if split == "val" and tree.has_val else tree.train_dir
    classes = _folder_classes(tree, folder, opts.need_labels)
    dataset = _open_folder(tree, folder, classes, transform, opts)
    paths = [p for p, _ in dataset.samples]
    info = DatasetInfo(tree.name, tuple(classes), *stats, native_image_size(paths))
    if tree.has_val or (split == "train" and not opts.hold_out):
        return dataset, info
    train_idx, val_idx = stratified_split(
        np.asarray(dataset.targets), opts.val_fraction, opts.seed, class_names=classes, name=tree.name
    )
    # a split that replaces an unreadable file from its own images: a held-out image never trains
    return SplitImages(dataset, (train_idx if split == "train" else val_idx).tolist()), info


@dataclass(frozen=True)
class _FolderTree:
    """An ImageFolder tree: ``root/train/<class>/`` (optionally with ``root/val/<class>/``) or ``root/<class>/``."""

    name: str
    root: Path
    train_dir: Path
    has_val: bool
    layout: str  # named in every message, so the user sees the expected tree


def _layout(root: Path) -> str:
    return (
        f"{root}/train/<class>/<image> (and optionally {root}/val/<class>/<image>), or {root}/<class>/<image>"
    )


def _folder_tree(root: Path, name: str) -> _FolderTree:
    """Where the training (and validation) class folders of ``root`` are."""
    if not root.is_dir():
        raise UsageError(
            f"{name}: folder {root} does not exist; expected the ImageFolder layout {_layout(root)}"
        )
    train_dir = root / "train" if (root / "train").is_dir() else root
    has_val = (root / "val").is_dir()
    if has_val and train_dir == root:  # val/ would be both the validation split and a training class
        raise UsageError(
            f"{name}: {root} has val/ but no train/; expected the ImageFolder layout {_layout(root)}"
        )
    return _FolderTree(name, root, train_dir, has_val, _layout(root))


def _folder_classes(tree: _FolderTree, folder: Path, need_labels: bool) -> list[str]:
    """The training folder's classes, which label every split (so a val/ lacking a class shifts no label)."""
    try:
        classes, _ = find_classes(tree.train_dir)
    except FileNotFoundError:
        raise UsageError(
            f"{tree.name}: no class folders in {tree.train_dir}; expected the ImageFolder layout {tree.layout}"
        ) from None
    if folder != tree.train_dir:
        unknown = sorted(set(_subfolders(folder)) - set(classes))
        if unknown:
            raise UsageError(
                f"{tree.name}: {folder} has class folders that {tree.train_dir} lacks ({listing(unknown)}); their "
                f"images would have no label: rename them to training classes or remove them"
            )
    if need_labels and len(classes) < 2:
        raise UsageError(
            f"{tree.name}: {tree.train_dir} has a single class folder ({classes[0]}); classification (probe, the "
            f"kNN monitor) needs 2 or more class folders ({tree.layout}); pretraining alone does not use labels"
        )
    return classes


def _open_folder(
    tree: _FolderTree, folder: Path, classes: list[str], transform, opts: DataOptions
) -> SafeImageFolder:
    """The images of ``folder``, refusing a folder with none (or, for labels, with one class of images)."""
    dataset = SafeImageFolder(
        folder,
        transform,
        on_corrupt=opts.on_corrupt,
        strict=opts.strict,
        corrupt_log=CorruptLog(),
        classes=classes,
    )
    if dataset.ignored:
        warn_once(
            f"{tree.name}: ignored {len(dataset.ignored)} file(s) in {folder} that are not images PIL can open or "
            f"lie outside a class folder ({extension_counts(dataset.ignored)}): {listing(dataset.ignored)}"
        )
    if not dataset.samples:
        raise UsageError(
            f"{tree.name}: no images found in {folder} (image files are those PIL opens: .jpg, .png, .gif, .webp, "
            f".tif, ...); expected the ImageFolder layout {tree.layout}"
        )
    if dataset.empty_classes:
        warn_once(
            f"{tree.name}: {len(dataset.empty_classes)} class folder(s) in {folder} hold no images and are skipped "
            f"(kept in the class list, so labels do not shift): {listing(dataset.empty_classes)}"
        )
    if opts.need_labels and folder == tree.train_dir and len(classes) - len(dataset.empty_classes) < 2:
        raise UsageError(
            f"{tree.name}: only one class folder of {tree.train_dir} holds images; classification (probe, the kNN "
            f"monitor) needs images in 2 or more class folders ({tree.layout})"
        )
    return dataset


def _subfolders(folder: Path) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.is_dir()]


@register_dataset("imagenet")
def _imagenet(split: Split, transform, opts: DataOptions):
    root = Path(opts.root or default_root()) / "imagenet"
    if not (root / "train").is_dir():
        raise UsageError(
            f"imagenet: {root}/train not found; expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG "
            "(ImageNet-1K from image-net.org, val sorted into class folders); set --data-root to its parent"
        )
    return _imagefolder(str(root), split, transform, opts, name="imagenet")


@register_dataset("imagenet22k")
def _imagenet22k(split: Split, transform, opts: DataOptions):
    root = Path(opts.root or default_root()) / "imagenet22k"
    shard_dir = root / split
    shards = list_shards(shard_dir)
    if shards:
        classes = shard_classes(shard_dir) or shard_classes(root)
        info = DatasetInfo("imagenet22k", tuple(classes), *IMAGENET_STATS, 224)
        return shard_dataset(shards, transform, shuffle=opts.shuffle, seed=opts.seed), info
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        return _imagefolder(str(root), split, transform, opts, name="imagenet22k")
    raise UsageError(
        f"imagenet22k: no data under {root}; expected WebDataset shards {root}/{split}/*.tar "
        f"(samples as .jpg + .cls, optional classes.txt) or {root}/train/<synset>/<image>; set --data-root to its parent"
    )


def class_targets(dataset: Any) -> np.ndarray:
    """All labels of a map-style dataset without decoding images (for splits and reports)."""
    if isinstance(dataset, Subset):
        return class_targets(dataset.dataset)[np.asarray(dataset.indices)]
    for attr in ("targets", "_labels", "labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    return np.asarray([dataset[i][1] for i in range(len(dataset))])


def is_map_style(dataset: Dataset | Any) -> bool:
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
