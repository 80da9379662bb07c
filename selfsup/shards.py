"""WebDataset ``.tar`` shards for data too large for a file tree (ImageNet-22K on many nodes).

Each shard holds samples as ``<key>.jpg`` (or png/webp) plus ``<key>.cls`` (the class index).
Shards are split first across processes (``split_by_node``, which reads torch.distributed's rank
and world size) and then across DataLoader workers, so no two readers see the same shard.

Shuffling while reading is local: shard order, then a buffer of ``shuffle_buffer`` (5,000) samples
per worker. Shards must therefore be written from a shuffled list of samples; shards written class
by class give batches of a handful of classes, whatever the reader does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import webdataset as wds


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
) -> wds.WebDataset:
    """An iterable of ``(image, label)`` over the shards, split by node and by worker."""
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
    dataset = dataset.decode("pil").to_tuple("jpg;jpeg;png;webp", "cls")
    return dataset.map_tuple(transform or (lambda x: x), int)


def shard_classes(root: str | Path) -> list[str]:
    """Class names from ``classes.txt`` beside the shards (one per line), if present."""
    path = Path(root) / "classes.txt"
    return path.read_text().split() if path.is_file() else []
