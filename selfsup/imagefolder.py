"""ImageFolder that survives corrupt files without ever giving a sample the wrong label.

A file that fails to decode is recorded (path and reason) in a small log file that every
DataLoader worker appends to, so the main process can report all of them at the end of a run.
What happens to the sample is the caller's choice:

* ``on_corrupt="drop"`` (evaluation): the sample is returned as ``None`` and
  :func:`collate_skip_none` leaves it out of the batch;
* ``on_corrupt="replace"`` (training): the next readable sample is returned instead, with its own
  label, so every batch keeps its size (needed for all-gathers across processes);
* ``strict=True``: the first corrupt file stops the run with its path.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

from selfsup.errors import UsageError

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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


class SafeImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` whose corrupt files are skipped, counted and reported."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        *,
        on_corrupt: Literal["drop", "replace"] = "drop",
        strict: bool = False,
        corrupt_log: CorruptLog | None = None,
    ):
        super().__init__(str(root), transform=transform)
        self.on_corrupt = on_corrupt
        self.strict = strict
        self.corrupt_log = corrupt_log or CorruptLog()

    def _load(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        with open(path, "rb") as f:
            image = Image.open(f)
            image = image.convert("RGB")  # forces the full decode inside the try of the caller
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __getitem__(self, index: int) -> tuple[Any, int] | None:  # type: ignore[override]
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return self._load(i)
            except DECODE_ERRORS as err:
                path = self.samples[i][0]
                if self.strict:
                    raise UsageError(f"corrupt image {path} ({err}); drop --strict to skip such files") from None
                self.corrupt_log.add(path, f"{type(err).__name__}: {err}")
                if self.on_corrupt == "drop":
                    return None
        raise UsageError(f"no readable image under {self.root}")


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` without the samples a dataset dropped (returned as ``None``)."""
    return default_collate([item for item in batch if item is not None])


def report_corrupt(dataset: Any, stream=None) -> list[tuple[str, str]]:
    """Print the corrupt files a dataset skipped (one per line) and return them."""
    import sys

    log = find_corrupt_log(dataset)
    entries = log.entries() if log else []
    if entries:
        out = stream or sys.stderr
        print(f"warning: skipped {len(entries)} corrupt image file(s):", file=out)
        for file, reason in entries:
            print(f"  {file}: {reason}", file=out)
    return entries


def find_corrupt_log(dataset: Any) -> CorruptLog | None:
    """The corrupt-file log of a dataset, looking through Subset/wrapper layers."""
    while dataset is not None:
        if isinstance(getattr(dataset, "corrupt_log", None), CorruptLog):
            return dataset.corrupt_log
        dataset = getattr(dataset, "dataset", None)
    return None
