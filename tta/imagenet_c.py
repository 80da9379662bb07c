"""ImageNet-C's corruptions at 224 px: the parameters of ``make_imagenet_c.py`` (Hendrycks & Dietterich,
ICLR 2019; hendrycks/robustness, ImageNet-C/create_c) over the functions of :mod:`corruptions`.

The CIFAR functions take their parameters as arguments and work at any square size, so most 224-px
corruptions are those functions with the 224-px table below. Two need other arithmetic at 224 px and
are restated here: zoom blur's zoom factors step by 0.02-0.03 (CIFAR's by 0.01) and fog's plasma is
drawn on a 256 x 256 grid and cropped (224 is no power of 2). Frost is refused: its 224-px crops come
from the original's frost photographs, which are not shipped here (the procedural bank of
:mod:`corruptions` is made at CIFAR's 0.2 scale, too small for a 224-px crop).
"""

from __future__ import annotations

import numpy as np

from selfsup.errors import UsageError
from selfsup.tta.corruptions import (
    BENCHMARK,
    CORRUPTIONS,
    HELD_OUT,
    Corruption,
    _to_uint8,
    clipped_zoom,
    plasma_fractal,
)

SIZE = 224
UNSUPPORTED = {
    "frost": "frost at 224 px blends crops of the original's frost photographs, which are not shipped here"
}


def _zoom_blur(x, c, rng):
    """make_imagenet_c.py's zoom blur: the image and its zooms by np.arange(1, stop, step), averaged."""
    stop, step = c
    factors = np.arange(1, stop, step)
    out = x.astype(np.float32)
    total = np.zeros_like(out)
    for factor in factors:
        total += clipped_zoom(out, factor)
    return (out + total) / (len(factors) + 1)


def _fog(x, c, rng):
    """make_imagenet_c.py's fog: the plasma on its default 256 x 256 grid, cropped to the image."""
    strength, decay = c
    peak = x.max()
    h, w = x.shape[:2]
    x = x + strength * plasma_fractal(256, decay, rng)[:h, :w, None]
    return x * peak / (peak + strength)


# name -> the parameters of severities 1..5 in make_imagenet_c.py (same tuple layout as CORRUPTIONS)
PARAMETERS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),  # (stop, step)
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # (scale, sigma, alpha_affine): the original's 244 x (2, 0.7, 0.1), ... ("244 should have been 224")
    "elastic_transform": tuple(
        tuple(244 * v for v in c)
        for c in ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))
    ),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "spatter": (  # (loc, scale, sigma, threshold, intensity, mud)
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ),
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
}
_OWN = {"zoom_blur": _zoom_blur, "fog": _fog}  # the 224-px arithmetic differs from CIFAR's

CORRUPTIONS_224: dict[str, Corruption] = {
    name: Corruption(name, CORRUPTIONS[name].family, params, _OWN.get(name, CORRUPTIONS[name].fn))
    for name, params in PARAMETERS.items()
}
SUPPORTED = tuple(n for n in (*BENCHMARK, *HELD_OUT) if n in CORRUPTIONS_224)


def check_224(name: str, severity: int) -> Corruption:
    """The 224-px corruption ``name``, or one UsageError line (unknown, unsupported, bad severity)."""
    if name in UNSUPPORTED:
        raise UsageError(
            f"{name} is not generated at 224 px: {UNSUPPORTED[name]}; the others are: {', '.join(SUPPORTED)}"
        )
    if name not in CORRUPTIONS_224:
        raise UsageError(f"unknown corruption '{name}'; expected one of: {', '.join(SUPPORTED)}")
    if severity not in (1, 2, 3, 4, 5):
        raise UsageError(f"severity must be 1, 2, 3, 4 or 5, got {severity}")
    return CORRUPTIONS_224[name]


def corrupt_224(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``image`` (224, 224, 3) uint8 corrupted at ImageNet-C's ``severity``: uint8, truncated as the
    original's ``np.uint8`` before it saves the JPEG."""
    corruption = check_224(name, severity)
    if image.dtype != np.uint8 or image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a ({SIZE}, {SIZE}, 3) uint8 image, got {image.dtype} {image.shape}")
    x = image.astype(np.float64) / 255.0
    return _to_uint8(corruption.fn(x, corruption.severities[severity - 1], rng))
