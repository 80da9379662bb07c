"""ImageNet-C as released: ``<root>/<corruption>/<severity>/<wnid>/<name>.JPEG`` (Hendrycks & Dietterich,
ICLR 2019), read image by image from disk through a DataLoader; no severity is ever held in memory.

Every (corruption, severity) folder holds the same files (the 50,000 validation images), so image i
is the same source image in each, as in the npy layout. Images are read as SAR's code reads ImageNet-C
(mr-eggplant/SAR ``te_transforms_imageC``: ``CenterCrop(224)``, the released files being 224 px
already); the normalization is the classifier's own (``benchmark.to_model_input``). A ``clean/``
folder beside the corruptions (written by ``generate_imagenet_c``: the source images after
``Resize(256)``, ``CenterCrop(224)``) gives clean accuracy and EATA's Fisher images, read lazily too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from selfsup.errors import UsageError
from selfsup.tta.corruptions import BENCHMARK, HELD_OUT

SIZE = 224
EXTENSIONS = (".jpeg", ".jpg", ".png")
CENTRE = transforms.CenterCrop(SIZE)


def list_images(folder: Path) -> list[tuple[str, str]]:
    """(wnid, file name) of every image under ``folder/<wnid>/``, sorted."""
    return sorted(
        (d.name, f.name)
        for d in folder.iterdir()
        if d.is_dir()
        for f in d.iterdir()
        if f.suffix.lower() in EXTENSIONS
    )


def load_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(CENTRE(image.convert("RGB")), dtype=np.uint8)


class LazyImages(torch.utils.data.Dataset):
    """The images of one folder in the set's order, read when indexed: ``lazy[index_array]`` is a
    (B, 224, 224, 3) uint8 batch, as an array's would be."""

    def __init__(self, folder: Path, files: Sequence[tuple[str, str]]):
        self.folder, self.files = folder, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if np.ndim(index) == 0:
            wnid, name = self.files[int(index)]
            return load_image(self.folder / wnid / name)
        return np.stack([self[i] for i in np.asarray(index)])


@dataclass
class FolderSet:
    """The npy set's interface (``corruption_set`` everywhere in the stage) over image folders."""

    root: Path
    regenerated: bool
    severities: tuple[int, ...]
    size: int
    available: tuple[str, ...]
    # each image's wnid's index in ``classes``; the classifier's class index after ``use_classes``
    labels: np.ndarray
    image_size: int
    files: list[tuple[str, str]]
    classes: tuple[str, ...]
    manifest: dict = field(default_factory=dict)

    def folder(self, name: str, severity: int) -> Path:
        return self.root / name / str(severity)

    def check(self, name: str, severity: int) -> tuple[LazyImages, int]:
        """The lazy images of ``name`` at ``severity``; one error line when they are not the set's files."""
        folder = self.folder(name, severity)
        if not folder.is_dir():
            held = sorted(p.name for p in (self.root / name).iterdir() if p.is_dir())
            raise UsageError(
                f"{self.root / name} holds severities {', '.join(held) or '(none)'}, not {severity}"
            )
        files = list_images(folder)
        if files != self.files:
            raise UsageError(
                f"{folder} holds {len(files)} images, not the {self.size} of {self.folder(self.available[0], self.severities[0])} "
                "(every corruption and severity must hold the same files): download or generate it again"
            )
        return LazyImages(folder, files), 0

    def images(self, name: str, severity: int) -> LazyImages:
        return self.check(name, severity)[0]

    def clean(self) -> LazyImages | None:
        folder = self.root / "clean"
        return (
            LazyImages(folder, self.files) if folder.is_dir() and list_images(folder) == self.files else None
        )

    def use_classes(self, class_names: Sequence[str], checkpoint: str) -> None:
        """Relabel by the classifier's class names (the wnids it was trained on); one line when they do not cover the set's."""
        index = {name: i for i, name in enumerate(class_names)}
        missing = [wnid for wnid in self.classes if wnid not in index]
        if missing:
            raise UsageError(
                f"{checkpoint}'s class names do not include {len(missing)} of {self.root}'s classes "
                f"(e.g. {missing[0]}): an ImageNet-C run needs a classifier whose class_names are the wnids"
            )
        self.labels = np.array([index[wnid] for wnid, _ in self.files], dtype=np.int64)


def is_folder_set(root: Path) -> bool:
    return any((root / n / str(s)).is_dir() for n in (*BENCHMARK, *HELD_OUT) for s in range(1, 6))


def open_folder_set(root: Path) -> FolderSet:
    """The corruptions and severities present under ``root``; the first one's files define the set."""
    available = tuple(n for n in (*BENCHMARK, *HELD_OUT) if (root / n).is_dir())
    severities = tuple(s for s in range(1, 6) if any((root / n / str(s)).is_dir() for n in available))
    if not available or not severities:
        raise UsageError(
            f"{root} holds no <corruption>/<severity>/<wnid>/*.JPEG folders (ImageNet-C's layout)"
        )
    files = list_images(root / available[0] / str(severities[0]))
    if not files:
        raise UsageError(f"{root / available[0] / str(severities[0])} holds no images in <wnid>/ folders")
    classes = tuple(sorted({wnid for wnid, _ in files}))
    index = {wnid: i for i, wnid in enumerate(classes)}
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    labels = np.array([index[wnid] for wnid, _ in files], dtype=np.int64)
    return FolderSet(
        root,
        bool(manifest.get("regenerated", False)),
        severities,
        len(files),
        available,
        labels,
        SIZE,
        files,
        classes,
        manifest,
    )


def read_batches(
    sources: Sequence[LazyImages], picks: Sequence[np.ndarray], workers: int
) -> Iterator[np.ndarray]:
    """The images of each batch of ``picks`` ((corruption index, image index) rows), read by a
    DataLoader's workers ahead of the model; one batch in memory at a time (plus the prefetched)."""
    concat = torch.utils.data.ConcatDataset(sources)
    offsets = np.cumsum([0, *(len(s) for s in sources[:-1])])
    sampler = [list(offsets[p[:, 0]] + p[:, 1]) for p in picks]
    loader = torch.utils.data.DataLoader(
        concat, batch_sampler=sampler, num_workers=workers, collate_fn=np.stack
    )
    yield from loader
