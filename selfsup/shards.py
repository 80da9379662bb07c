"""WebDataset ``.tar`` shards for data too large for a file tree (ImageNet-22K on many nodes).

Each shard holds samples as ``<key>.jpg`` (or png/webp) plus ``<key>.cls`` (the class index).
Shards are split first across processes (``split_by_node``, which reads torch.distributed's rank
and world size) and then across DataLoader workers, so no two readers see the same shard.

Only those two members of a sample are read, each by its own decoder (PIL for the image, ASCII
digits for the label): webdataset's default decoders would also ``pickle.loads`` a ``.pyd``/``.pkl``
member and ``torch.load`` a ``.pth`` one, so a downloaded shard could run code. Other members are
dropped undecoded. A sample without either member, or whose image or label does not decode, is
skipped as an image folder skips a corrupt file, with one warning line naming the shard and key (a
stream has no index whose place a replacement could keep; the next sample fills the batch).

Shuffling while reading is local: shard order, then a buffer of ``shuffle_buffer`` (5,000) samples
per worker. Shards must therefore be written from a shuffled list of samples; shards written class
by class give batches of a handful of classes, whatever the reader does.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

IMAGE_KEYS = "jpg;jpeg;png;webp"  # the first of these a sample holds is its image
LABEL_KEY = "cls"
# What PIL raises for a file that is no decodable image (shards and image folders alike)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_shards(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted(str(p) for p in root.glob("*.tar")) if root.is_dir() else []


def shard_dataset(
    urls: list[str],
    transform: Callable | None = None,
    *,
    shuffle: bool = False,
    shuffle_buffer: int = 5000,
    seed: int = 0,
    on_broken: Callable[[str, str], None] | None = None,
) -> wds.WebDataset:
    """An iterable of ``(image, label)`` over the shards, split by node and by worker.
    ``on_broken(where, reason)``: told of each sample skipped (default: a warning line on stderr)."""
    dataset = wds.WebDataset(
        urls,
        shardshuffle=100 if shuffle else False,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        seed=seed,
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer)
    # select the two members first: nothing else in a sample ever reaches a decoder
    dataset = dataset.compose(partial(readable_samples, on_broken=on_broken or warn_broken))
    return dataset.map_tuple(transform, lambda label: label) if transform else dataset


def readable_samples(samples: Iterable[dict[str, Any]], on_broken: Callable[[str, str], None]) -> Iterator:
    """``(image, label)`` of each sample that holds both and decodes; the others go to ``on_broken``."""
    for sample in samples:
        where = f"{sample.get('__url__', 'a shard')}: sample {sample.get('__key__', '?')}"
        image = next((sample[key] for key in IMAGE_KEYS.split(";") if key in sample), None)
        if image is None or LABEL_KEY not in sample:
            what = "image (.jpg, .jpeg, .png or .webp)" if image is None else "label (.cls)"
            on_broken(where, f"no {what} member")
            continue
        try:
            yield decode_image(image), decode_label(sample[LABEL_KEY])
        except DECODE_ERRORS as err:
            on_broken(where, f"does not decode ({type(err).__name__}: {' '.join(str(err).split())})")


def warn_broken(where: str, reason: str) -> None:
    print(f"warning: skipped a broken sample, {where}: {reason}", file=sys.stderr)


def decode_image(data: bytes) -> Image.Image:
    """An RGB PIL image, as webdataset's ``decode("pil")`` gives (``autodecode.ImageHandler``)."""
    with io.BytesIO(data) as stream:
        image = Image.open(stream)
        image.load()
    return image.convert("RGB")


def decode_label(data: bytes) -> int:
    """The class index, written as ASCII digits (webdataset's ``cls`` convention)."""
    return int(data.decode("ascii"))


def shard_classes(root: str | Path) -> list[str]:
    """Class names from ``classes.txt`` beside the shards (one per line), if present."""
    path = Path(root) / "classes.txt"
    return path.read_text().split() if path.is_file() else []
