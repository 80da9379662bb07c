"""``selfsup-data NAME``: check that a dataset is in place and show what the stages will see.

Every image is decoded, as a stage would, so the counts are of images that load; files that do
not are listed by path on stderr.
"""

from __future__ import annotations

import os
from collections import Counter

from torch.utils.data import DataLoader
from tqdm import tqdm

from selfsup.config import CommandParser
from selfsup.data import DataOptions, build_dataset, dataset_names, is_map_style
from selfsup.errors import UsageError, exits_cleanly
from selfsup.imagefolder import report_corrupt

# Below this many images, starting DataLoader workers costs more than decoding in this process.
_WORKERS_FROM = 5000


def _decoded(_image) -> None:
    return None  # the image decoded (the dataset's loader did it); nothing needs to travel back


def _labels_of_loaded(batch: list) -> tuple[int, list[int]]:
    return len(batch), [
        int(item[1]) for item in batch if item is not None
    ]  # None: a file that did not decode


def count_loadable(dataset, workers: int, desc: str) -> tuple[Counter, int]:
    """(images per label, broken files) of a map-style dataset, decoding every image."""
    loader = DataLoader(
        dataset,
        batch_size=64,
        num_workers=workers if len(dataset) >= _WORKERS_FROM else 0,
        collate_fn=_labels_of_loaded,
    )
    counts: Counter = Counter()
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=len(dataset) < _WORKERS_FROM) as bar:
        for seen, labels in loader:
            counts.update(labels)
            bar.update(seen)
    return counts, len(dataset) - sum(counts.values())


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="selfsup-data", description=__doc__)
    parser.add_argument("dataset", help=f"one of: {', '.join(dataset_names())}")
    parser.add_argument(
        "--data-root", default=None, help="folder holding the datasets (default: $SELFSUP_DATA or ./data)"
    )
    parser.add_argument("--download", action="store_true", help="download the dataset if torchvision can")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="held out of folders without val/ (default 0.1)"
    )
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    args = parser.parse_args(argv)
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    options = DataOptions(root=args.data_root, download=args.download, val_fraction=args.val_fraction)
    for split in ("train", "val"):
        dataset, info = build_dataset(args.dataset, split, _decoded, options)
        if is_map_style(dataset):
            counts, broken = count_loadable(dataset, args.workers, f"{info.name} [{split}] decoding")
            sizes = f"{sum(counts.values())} images, {len(counts)} classes present"
            if broken:
                report_corrupt(dataset)
                sizes += f"; {broken} file(s) do not load (listed on stderr) and are skipped"
        else:
            sizes = "streamed from shards"
        print(f"{info.name} [{split}]: {sizes}")
    print(
        f"classes ({info.num_classes}): {', '.join(info.classes[:10])}{' ...' if info.num_classes > 10 else ''}"
    )
    print(f"normalization: mean={info.mean} std={info.std}; native image size {info.image_size}")


if __name__ == "__main__":
    main()
