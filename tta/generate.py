"""Build a CIFAR-C-style corruption set offline from any clean labelled split, deterministically.

Output, in RobustBench's layout so the same loader reads released and regenerated sets:
``<corruption>.npy`` of shape (S x N, H, W, 3) uint8, the N images at each requested severity in
order, ``labels.npy`` (S x N,), ``clean.npy`` (the N clean images, in the labels' order) and ``manifest.json``: the corruption parameters, severities, seed,
the source's name and SHA-256 over its images and labels, and ``"regenerated": true`` (results on
such a set are labelled so; they are not the released CIFAR-10-C).

    python -m selfsup.tta.generate --dataset imagefolder:/tmp/c10/cifar10-20k --split val \\
        --out data/cifar10_subset-c --severities 5
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from selfsup.config import CommandParser, flag_type
from selfsup.errors import UsageError, exits_cleanly
from selfsup.files import atomic_write_bytes, ensure_writable_dir
from selfsup.tta.corruptions import CORRUPTIONS, check, corrupt, image_rng

SIZE = 32  # the CIFAR parameters are for 32x32 images


def source_hash(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def generate(
    images: np.ndarray,
    labels: np.ndarray,
    out: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    source: str = "",
    progress: bool = False,
) -> dict:
    """Write the corrupted copies of ``images`` (N, H, W, 3) uint8 into ``out``; returns the manifest."""
    for name in corruptions:
        for severity in severities:
            check(name, severity)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
        raise UsageError(
            f"the corruption parameters are CIFAR's, for ({SIZE}, {SIZE}, 3) uint8 images; got {images.dtype} "
            f"{images.shape[1:]} (ImageNet-sized parameters are not implemented yet)"
        )
    if len(images) != len(labels):
        raise UsageError(f"{len(images)} images but {len(labels)} labels")
    out = ensure_writable_dir(out, "--out")
    for name in tqdm(corruptions, desc="corruptions", unit="set", disable=not progress):
        stacked = np.stack(
            [
                corrupt(image, name, severity, image_rng(seed, name, severity, i))
                for severity in severities
                for i, image in enumerate(images)
            ]
        )
        _save_npy(out / f"{name}.npy", stacked)
    _save_npy(out / "labels.npy", np.tile(np.asarray(labels, dtype=np.int64), len(severities)))
    _save_npy(out / "clean.npy", images)  # accuracy after adaptation; EATA's Fisher information
    manifest = {
        "regenerated": True,
        "source": source,
        "source_sha256": source_hash(images, labels),
        "images_per_severity": len(images),
        "severities": list(severities),
        "seed": seed,
        "corruptions": {
            name: [list(p) if isinstance(p, tuple) else p for p in CORRUPTIONS[name].severities]
            for name in corruptions
        },
        "parameters_from": "Hendrycks & Dietterich, make_cifar_c.py (32x32)",
    }
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def load_split(
    dataset: str, split: str, data_root: str | None, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """A registry split as (N, 32, 32, 3) uint8 images and labels; unreadable files are skipped (warned of)."""
    from selfsup.data import DataOptions, build_dataset
    from selfsup.imagefolder import report_corrupt

    data, _ = build_dataset(dataset, split, None, DataOptions(root=data_root))
    n = len(data) if limit is None else min(limit, len(data))
    images, labels = [], []
    for i in range(n):
        if (item := data[i]) is None:
            continue
        image, label = item
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if array.shape != (SIZE, SIZE, 3):
            raise UsageError(
                f"{dataset} image {i} is {array.shape[1]}x{array.shape[0]}; the CIFAR corruption parameters need 32x32 images"
            )
        images.append(array)
        labels.append(label)
    report_corrupt(data)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def add_set_flags(parser: CommandParser, corruptions: Sequence[str]) -> None:
    """The flags every generator takes: --out, --corruptions, --severities, --seed, --limit."""
    parser.add_argument("--out", required=True)
    parser.add_argument("--corruptions", nargs="+", default=list(corruptions))
    severity = flag_type(int, choices=(1, 2, 3, 4, 5))
    parser.add_argument("--severities", nargs="+", type=severity, default=[1, 2, 3, 4, 5])
    parser.add_argument("--seed", type=flag_type(int, ge=0), default=0)
    parser.add_argument("--limit", type=flag_type(int, ge=1), help="first N images only")


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m selfsup.tta.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--data-root")
    add_set_flags(parser, CORRUPTIONS)
    args = parser.parse_args(argv)
    for name in args.corruptions:
        for severity in args.severities:
            check(name, severity)
    images, labels = load_split(args.dataset, args.split, args.data_root, args.limit)
    generate(
        images,
        labels,
        args.out,
        args.corruptions,
        args.severities,
        args.seed,
        f"{args.dataset}:{args.split}",
        progress=True,
    )
    print(
        f"{len(args.corruptions)} corruption(s) x {len(args.severities)} severities x {len(images)} images -> {args.out}"
    )


if __name__ == "__main__":
    main()
