"""``selfsup-data NAME``: check that a dataset is in place and show what the stages will see."""

from __future__ import annotations

import argparse
from collections import Counter

from selfsup.data import DataOptions, build_dataset, class_targets, dataset_names, is_map_style
from selfsup.errors import exits_cleanly


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="selfsup-data", description=__doc__)
    parser.add_argument("dataset", help=f"one of: {', '.join(dataset_names())}")
    parser.add_argument("--data-root", default=None, help="folder holding the datasets (default: $SELFSUP_DATA or ./data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if torchvision can")
    args = parser.parse_args(argv)
    options = DataOptions(root=args.data_root, download=args.download)
    for split in ("train", "val"):
        dataset, info = build_dataset(args.dataset, split, options=options)
        if is_map_style(dataset):
            counts = Counter(class_targets(dataset).tolist())
            sizes = f"{len(dataset)} images, {len(counts)} classes present"
        else:
            sizes = "streamed from shards"
        print(f"{info.name} [{split}]: {sizes}")
    print(f"classes ({info.num_classes}): {', '.join(info.classes[:10])}{' ...' if info.num_classes > 10 else ''}")
    print(f"normalization: mean={info.mean} std={info.std}; native image size {info.image_size}")


if __name__ == "__main__":
    main()
