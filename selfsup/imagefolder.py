"""ImageFolder that survives corrupt files without ever giving a sample the wrong label.

A file that fails to decode is recorded (path and reason) in a small log file that every
DataLoader worker appends to, so the main process can report all of them at the end of a run.
What happens to the sample is the caller's choice:

* ``on_corrupt="drop"`` (evaluation): the sample is returned as ``None``; :func:`collate_skip_none`
  leaves it out of the batch, and :class:`MarkSkipped` keeps its place with a placeholder labelled
  ``SKIPPED``, removed after a sharded evaluation's gather (so none is counted, none twice);
* ``on_corrupt="replace"`` (training): the next readable sample is returned instead, with its own
  label, so every batch keeps its size (needed for all-gathers across processes). A split of a
  folder (:class:`SplitImages`) replaces from its own images only: a held-out image never trains;
* ``strict=True``: the first corrupt file stops the run with its path.

Every format PIL decodes is an image here (GIF, TIFF, WebP, BMP, ... not only torchvision's
``IMG_EXTENSIONS``), and :func:`to_rgb` turns each mode into 8-bit RGB without losing it: 16-bit
values keep their high byte (PIL's own ``convert("RGB")`` clips them to 255), transparency is
composited on white. Files nothing here can read are listed in ``ignored``; class folders without
images stay in ``classes`` (labels never shift) and are listed in ``empty_classes``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from selfsup.errors import UsageError
from selfsup.shards import DECODE_ERRORS


def _decodable_extensions() -> tuple[str, ...]:
    """Extensions of every format PIL can open and decode here.

    Stub plugins (HDF5, GRIB, BUFR, WMF) only recognise a file and need a handler installed from
    outside, and PIL's MPEG plugin reads a video's size but no pixels: their files are not images.
    """
    Image.init()
    formats = {
        fmt
        for fmt, (factory, _accept) in Image.OPEN.items()
        if fmt != "MPEG" and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in formats))


IMAGE_EXTENSIONS = _decodable_extensions()

BACKGROUND = 255  # transparent pixels become white: the page colour an icon or a cut-out photo is made for


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode, without clipping or dropping information.

    * 16-bit (``I;16*``, and ``I`` holding 0..65535, as PIL opens 16-bit PNG/TIFF): the high byte
      (v >> 8), the same reduction PIL's decoders apply to 16-bit colour images;
    * transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparent colour):
      composited on white, ``round((c * a + 255 * (255 - a)) / 255)``; palettes go through RGBA;
    * ``F`` (float) and ``I`` outside 0..65535 have no agreed 8-bit meaning: ``ValueError``, so the
      file is reported instead of guessed at;
    * everything else (``1``, ``L``, ``CMYK``, ``YCbCr``, ...): PIL's ``convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"{mode} image with values {low}..{high}, outside 16 bits: no 8-bit reading of it"
            )
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "F":
        raise ValueError(
            "floating-point image (mode F): its value range is unknown, so it has no 8-bit reading"
        )
    if mode in ("RGBA", "LA", "PA", "P", "RGBa") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        colour, alpha = rgba[..., :3], rgba[..., 3:]
        # (x + 127) // 255 is round(x / 255) exactly: x / 255 is never halfway between integers
        mixed = (colour * alpha + BACKGROUND * (255 - alpha) + 127) // 255
        return Image.fromarray(mixed.astype(np.uint8), "RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode a file fully (errors surface here, not later in a transform) into 8-bit RGB."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return to_rgb(image)


def native_image_size(paths: Sequence[str], sample: int = 15, seed: int = 0) -> int:
    """The median shorter side of up to ``sample`` images drawn with ``seed``, read from headers only.

    The shorter side is what evaluation resizes to the model's input. Files whose header does not
    open are passed over here: they are reported when they are loaded.
    """
    order = np.random.default_rng(seed).permutation(len(paths))[: 4 * sample]
    sides, failures = [], []
    for i in order:
        try:
            with Image.open(paths[i]) as image:
                sides.append(min(image.size))
        except DECODE_ERRORS as err:
            failures.append(f"{paths[i]}: {err}")
        if len(sides) == sample:
            break
    if not sides:
        raise UsageError(
            f"none of the {len(failures)} images sampled to find the image size opens (first: {failures[0]}); "
            "check that these files are images"
        )
    return int(statistics.median_low(sides))


class CorruptLog:
    """Append-only record of unreadable files, shared by DataLoader workers through the file system."""

    def __init__(self, path: str | Path | None = None):
        if path is None:  # the file appears only when the first corrupt image is met
            path = Path(tempfile.gettempdir()) / f"selfsup-corrupt-{uuid.uuid4().hex}.tsv"
        self.path = Path(path)

    def add(self, file: str, reason: str) -> None:
        line = f"{file}\t{' '.join(reason.split())}\n"
        with open(self.path, "a") as f:  # one short write per line: appends do not interleave
            f.write(line)

    def entries(self) -> list[tuple[str, str]]:
        if not self.path.exists():
            return []
        seen: dict[str, str] = {}
        for line in self.path.read_text().splitlines():
            file, _, reason = line.partition("\t")
            seen.setdefault(file, reason)  # a file re-read every epoch is reported once
        return sorted(seen.items())


class _SkipOrReplace:
    """``dataset[i]`` by the ``on_corrupt`` policy over ``load_or_none``: None, or the next readable
    sample of this same dataset (so a replacement never comes from outside it)."""

    on_corrupt: str

    def load_or_none(self, index: int) -> tuple[Any, int] | None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        if self.on_corrupt == "drop":
            return self.load_or_none(index)
        return first_readable(self.load_or_none, index, len(self), str(self))  # type: ignore[arg-type]


class SafeImageFolder(_SkipOrReplace, ImageFolder):
    """torchvision ``ImageFolder`` whose corrupt files are skipped, counted and reported.

    ``classes`` (optional) fixes the class list, so a ``val/`` folder is labelled like ``train/``
    even when it lacks some class folders. Class folders without images are kept (torchvision's
    ``allow_empty``) and listed in ``empty_classes``; files that are not images PIL can open, and
    files outside any class folder, are listed in ``ignored``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        *,
        on_corrupt: Literal["drop", "replace"] = "drop",
        strict: bool = False,
        corrupt_log: CorruptLog | None = None,
        classes: Sequence[str] | None = None,
    ):
        self._fixed_classes = list(classes) if classes is not None else None
        self.ignored: list[str] = [str(Path(root) / e.name) for e in os.scandir(root) if not e.is_dir()]

        def is_image(path: str) -> bool:
            if path.lower().endswith(IMAGE_EXTENSIONS):
                return True
            self.ignored.append(path)
            return False

        super().__init__(
            str(root), transform=transform, loader=load_image, is_valid_file=is_image, allow_empty=True
        )
        self.ignored.sort()
        present = {target for _, target in self.samples}
        self.empty_classes = [c for i, c in enumerate(self.classes) if i not in present]
        self.on_corrupt = on_corrupt
        self.strict = strict
        self.corrupt_log = corrupt_log or CorruptLog()

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        if self._fixed_classes is None:
            return find_classes(directory)
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}

    def _load(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def load_or_none(self, index: int) -> tuple[Any, int] | None:
        """Sample ``index``, or None with its file logged when it does not decode (``strict``: stop)."""
        try:
            return self._load(index)
        except DECODE_ERRORS as err:
            path = self.samples[index][0]
            if self.strict:
                raise UsageError(f"corrupt image {path} ({err}); drop --strict to skip such files") from None
            self.corrupt_log.add(path, f"{type(err).__name__}: {err}")
            return None

    def __str__(self) -> str:
        return str(self.root)


class SplitImages(_SkipOrReplace, Subset):
    """A split (train or held-out val) of a :class:`SafeImageFolder`, or a share of such a split:
    an unreadable file is dropped or replaced by the next readable image of this split, never by one
    of another split (the images held out for validation stay out of training)."""

    def __init__(self, dataset: Any, indices: Sequence[int], on_corrupt: str | None = None):
        super().__init__(dataset, list(indices))
        self.on_corrupt = on_corrupt or dataset.on_corrupt

    def load_or_none(self, index: int) -> tuple[Any, int] | None:
        return self.dataset.load_or_none(self.indices[index])

    def __getitems__(self, indices: list[int]) -> list:  # Subset's would bypass the policy
        return [self[i] for i in indices]

    def __str__(self) -> str:
        return f"a split of {self.dataset}"


def first_readable(load: Callable[[int], Any], index: int, size: int, where: str) -> Any:
    """``load(index)``, or of the next indices (cyclically) the first that is not None."""
    for attempt in range(size):
        item = load((index + attempt) % size)
        if item is not None:
            return item
    raise UsageError(f"no readable image in {where}")


def listing(items: Iterable[Any], limit: int = 20) -> str:
    """``a, b, c`` for a warning line; past ``limit`` items, the first ones and how many more."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} ... and {len(items) - limit} more"


def extension_counts(paths: Iterable[str]) -> str:
    """``.txt: 3, (none): 1`` for a list of files."""
    counts = Counter(Path(p).suffix.lower() or "(no extension)" for p in paths)
    return ", ".join(f"{ext}: {n}" for ext, n in counts.most_common())


_WARNED: set[str] = set()


def warn_once(message: str, stream=None) -> None:
    """``warning: message`` on stderr, once per process: stages build a dataset several times."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=stream or sys.stderr)


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` without the samples a dataset dropped (returned as ``None``)."""
    return default_collate([item for item in batch if item is not None])


SKIPPED = -1  # the label of a placeholder that keeps an unreadable sample's place in a batch


class MarkSkipped:
    """``default_collate`` with every dropped sample (``None``) as ``(placeholder, SKIPPED)``.

    For sharded evaluation: every process's batch keeps its size, so ``all_gather`` sees equal
    shapes and accelerate's ``gather_for_metrics`` cuts the last batch's padding at the right place
    (it cuts by position); the placeholders are removed after the gather (:func:`readable`).
    """

    def __init__(self, placeholder: Any):
        self.placeholder = placeholder

    def __call__(self, batch: list[Any]) -> Any:
        return default_collate([(self.placeholder, SKIPPED) if item is None else item for item in batch])


def marking_collate(dataset: Any) -> Callable[[list[Any]], Any]:
    """:class:`MarkSkipped` whose placeholder is zeros shaped like ``dataset``'s first readable image;
    for a stream (no index, so no place to keep), :func:`collate_skip_none`."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return collate_skip_none
    if len(dataset) == 0:
        return MarkSkipped(None)
    image, _ = first_readable(dataset.__getitem__, 0, len(dataset), "the dataset")
    return MarkSkipped(torch.zeros_like(image))


def readable(labels: torch.Tensor) -> torch.Tensor:
    """The mask of the samples of a gathered batch that are not :class:`MarkSkipped` placeholders."""
    return labels != SKIPPED


def skipped_files(dataset: Any) -> list[str]:
    """The files of ``dataset`` found unreadable so far (none for datasets without a corrupt log)."""
    log = find_corrupt_log(dataset)
    return [file for file, _ in log.entries()] if log else []


SHOWN = 5  # unreadable files named in a warning line; reports list them all


def report_corrupt(dataset: Any, stream=None, what: str = "") -> list[tuple[str, str]]:
    """Warn in one line of the unreadable files a dataset skipped (the first few and the first
    reason), ``what`` naming the use ("validation", ...), and return them all as (path, reason)."""
    log = find_corrupt_log(dataset)
    entries = log.entries() if log else []
    if entries:
        paths = listing((file for file, _ in entries), SHOWN)
        print(
            f"warning: {what + ': ' if what else ''}{len(entries)} unreadable image file(s) skipped: {paths} "
            f"(first reason: {entries[0][1]})",
            file=stream or sys.stderr,
        )
    return entries


def merge_corrupt(dataset: Any, entries: Iterable[tuple[str, str]]) -> None:
    """Add (path, reason) pairs found elsewhere (other processes) to ``dataset``'s corrupt log."""
    log = find_corrupt_log(dataset)
    if log is None:
        return
    known = {file for file, _ in log.entries()}
    for file, reason in entries:
        if file not in known:
            log.add(file, reason)
            known.add(file)


def find_corrupt_log(dataset: Any) -> CorruptLog | None:
    """The corrupt-file log of a dataset, looking through Subset/wrapper layers."""
    while dataset is not None:
        if isinstance(getattr(dataset, "corrupt_log", None), CorruptLog):
            return dataset.corrupt_log
        dataset = getattr(dataset, "dataset", None)
    return None
