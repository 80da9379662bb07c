"""Build ImageNet-C offline from any ImageNet-style folder (``<source>/<wnid>/<image>``), image by image.

As ``make_imagenet_c.py`` (hendrycks/robustness): each image is resized to 256 (shorter side) and
centre-cropped to 224 (torchvision, as the original), corrupted with the 224-px parameters
(:mod:`imagenet_c`), truncated to uint8 and saved as JPEG quality 85 (optimize) under the released
layout ``<out>/<corruption>/<severity>/<wnid>/<name>.JPEG``. Unlike the original, every image's
randomness comes from a generator seeded by (seed, corruption, severity, index), as the CIFAR
generator's, so a set is the same on every machine and independent of the order of work (and of
``--workers``). One image is in memory at a time per worker; a file already written is kept, so an
interrupted run continues where it stopped. ``<out>/clean/<wnid>/`` holds the cropped clean images
(clean accuracy, EATA's Fisher) and ``manifest.json`` the parameters, seed and ``"regenerated": true``.

    python -m selfsup.tta.generate_imagenet_c --source /data/imagenet/val --out data/ImageNet-C \\
        --corruptions gaussian_noise fog --severities 5 --workers 2
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision import transforms
from tqdm import tqdm

from selfsup.config import CommandParser, flag_type
from selfsup.errors import UsageError, exits_cleanly
from selfsup.files import atomic_write_bytes, ensure_writable_dir
from selfsup.tta.corruptions import image_rng
from selfsup.tta.folder_set import list_images
from selfsup.tta.generate import add_set_flags
from selfsup.tta.imagenet_c import PARAMETERS, SUPPORTED, UNSUPPORTED, check_224, corrupt_224

# the original's test transform before it corrupts (torchvision's bilinear, antialiased on PIL images)
CROP = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
QUALITY = 85  # the original's Image.save(..., quality=85, optimize=True)


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=QUALITY, optimize=True)
    return buffer.getvalue()


def out_name(name: str) -> str:
    """The released files keep the source's name; a non-JPEG source gets a .JPEG suffix (the bytes are JPEG)."""
    return name if Path(name).suffix.lower() in (".jpeg", ".jpg") else f"{Path(name).stem}.JPEG"


def process_image(
    job: tuple[int, str, str],
    source: Path,
    out: Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    seed: int,
) -> str | None:
    """Write every corrupted copy of image ``index``; returns its SHA-256, or None when unreadable."""
    index, wnid, name = job
    path = source / wnid / name
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as opened:
            clean = np.asarray(CROP(opened.convert("RGB")), dtype=np.uint8)
    except (OSError, UnidentifiedImageError):
        return None
    target = f"{wnid}/{out_name(name)}"
    if not (out / "clean" / target).is_file():
        atomic_write_bytes(out / "clean" / target, jpeg_bytes(clean))
    for corruption in corruptions:
        for severity in severities:
            dest = out / corruption / str(severity) / target
            if not dest.is_file():
                rng = image_rng(seed, corruption, severity, index)
                atomic_write_bytes(dest, jpeg_bytes(corrupt_224(clean, corruption, severity, rng)))
    return hashlib.sha256(raw).hexdigest()


def generate_folders(
    source: str | Path,
    out: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Write the set under ``out`` streaming image by image; returns the manifest."""
    for name in corruptions:
        for severity in severities:
            check_224(name, severity)
    source = Path(source)
    if not source.is_dir() or not (files := list_images(source)):
        raise UsageError(f"--source {source}: expected an ImageNet-style folder of <wnid>/<image> files")
    files = files[:limit] if limit else files
    out = ensure_writable_dir(out, "--out")
    work = partial(
        process_image,
        source=source,
        out=out,
        corruptions=tuple(corruptions),
        severities=tuple(severities),
        seed=seed,
    )
    jobs = [(i, wnid, name) for i, (wnid, name) in enumerate(files)]
    bar = partial(tqdm, total=len(jobs), unit="image", disable=not progress)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            hashes = list(bar(pool.imap(work, jobs, chunksize=4)))
    else:
        hashes = list(bar(map(work, jobs)))
    return write_manifest(out, source, files, hashes, corruptions, severities, seed)


def write_manifest(out, source, files, hashes, corruptions, severities, seed) -> dict:
    digest = hashlib.sha256()
    for (wnid, name), sha in zip(files, hashes):
        digest.update(f"{wnid}/{name}:{sha}\n".encode())
    skipped = [f"{wnid}/{name}" for (wnid, name), sha in zip(files, hashes) if sha is None]
    manifest = {
        "regenerated": True,
        "layout": "<corruption>/<severity>/<wnid>/<name>.JPEG (ImageNet-C as released)",
        "source": str(source),
        "source_sha256": digest.hexdigest(),
        "images_per_severity": len(files) - len(skipped),
        "unreadable_skipped": skipped,
        "severities": list(severities),
        "seed": seed,
        "corruptions": {
            n: [list(p) if isinstance(p, tuple) else p for p in PARAMETERS[n]] for n in corruptions
        },
        "parameters_from": "Hendrycks & Dietterich, make_imagenet_c.py (224 px)",
        "not_generated": UNSUPPORTED,
    }
    atomic_write_bytes(Path(out) / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(
        prog="python -m selfsup.tta.generate_imagenet_c", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--source", required=True, help="ImageNet-style folder: <wnid>/<image>")
    add_set_flags(parser, SUPPORTED)  # --limit: the first N images sorted by (wnid, name)
    parser.add_argument("--workers", type=flag_type(int, ge=1), default=1)
    args = parser.parse_args(argv)
    manifest = generate_folders(
        args.source,
        args.out,
        args.corruptions,
        args.severities,
        args.seed,
        args.limit,
        args.workers,
        progress=True,
    )
    skipped = len(manifest["unreadable_skipped"])
    print(
        f"{len(args.corruptions)} corruption(s) x {len(args.severities)} severities x "
        f"{manifest['images_per_severity']} images -> {args.out}"
        + (f" ({skipped} unreadable skipped)" if skipped else "")
    )


if __name__ == "__main__":
    main()
