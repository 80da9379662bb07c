"""The common corruptions of Hendrycks & Dietterich (ICLR 2019) at CIFAR's 32x32 parameters, seeded.

Each corruption is a pure function of (image, severity 1-5, numpy Generator): the same seed gives
the same corrupted image on any machine, which the original script (no seed) and the
``imagecorruptions`` package (ImageNet severities, broken under NumPy 2) do not. The parameters are
those of the CIFAR generator (``make_cifar_c.py``); the steps are restated with numpy, scipy and PIL
in place of scikit-image, OpenCV and ImageMagick, each noted where it differs. 15 benchmark
corruptions plus the 4 held out for tuning (``HELD_OUT``).

This first slice holds the 14 corruptions that need neither texture images, ImageMagick's motion blur
nor OpenCV's edge and distance transforms; motion_blur, snow, frost, spatter and elastic_transform are
listed in ``PLANNED`` and refused with that message until they are written.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image
from scipy import ndimage

from selfsup.errors import UsageError

Fn = Callable[[np.ndarray, object, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Corruption:
    name: str
    family: str  # noise | blur | weather | digital
    severities: tuple  # the parameter of severities 1..5
    fn: Fn  # float image in [0, 1] (H, W, 3), parameter, generator -> float image (clipped by the caller)


# --- noise ------------------------------------------------------------------------------------


def _gaussian_noise(x, c, rng):
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x, c, rng):
    return rng.poisson(x * c) / c


def _impulse_noise(x, c, rng):
    # salt and pepper on each value (pixel and channel), half each: scikit-image's random_noise("s&p")
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _speckle_noise(x, c, rng):
    return x + x * rng.normal(scale=c, size=x.shape)


# --- blur -------------------------------------------------------------------------------------


def _gaussian(x, sigma):
    # scikit-image's filters.gaussian on a colour image: per channel, mode "nearest", truncate 4
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def _gaussian_blur(x, c, rng):
    return _gaussian(x, c)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: a disk of ``radius`` px, normalised, then slightly blurred (anti-aliasing)."""
    if radius <= 8:
        span, size = np.arange(-8, 8 + 1), (3, 3)
    else:
        span, size = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(span, span)
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    kernel /= kernel.sum()
    # OpenCV's GaussianBlur(kernel, ksize=size, sigmaX=alias_blur), restated: a gaussian limited to the ksize window
    half = size[0] // 2
    taps = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * alias_blur**2))
    taps /= taps.sum()
    kernel = ndimage.convolve1d(
        ndimage.convolve1d(kernel, taps, axis=0, mode="mirror"), taps, axis=1, mode="mirror"
    )
    return kernel


def _defocus_blur(x, c, rng):
    kernel = _disk(*c)
    # OpenCV's filter2D per channel: correlation with reflect-101 borders ("mirror" in scipy)
    return np.stack([ndimage.correlate(x[..., ch], kernel, mode="mirror") for ch in range(3)], axis=-1)


def _glass_blur(x, c, rng):
    sigma, max_delta, iterations = c
    out = np.uint8(_gaussian(x, sigma) * 255)  # the original truncates to uint8 between the two blurs
    h, w = out.shape[:2]
    for _ in range(iterations):  # the original's loop, bottom-right to top-left
        for row in range(h - max_delta, max_delta, -1):
            for col in range(w - max_delta, max_delta, -1):
                # randint's upper bound is excluded: offsets are -max_delta..max_delta-1 (-1 or 0 here)
                dx, dy = rng.integers(-max_delta, max_delta, size=2)
                # The original's tuple "swap" of two pixel views copies the neighbour into this pixel and
                # leaves the neighbour as it was; CIFAR-10-C was made so, and so is this.
                out[row, col] = out[row + dy, col + dx]
    return _gaussian(out / 255.0, sigma)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` keeping the size: crop ceil(H / factor) px, enlarge it
    bilinearly (scipy's zoom, order 1, as the original), trim the centre back to H."""
    h = x.shape[0]
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    zoomed = ndimage.zoom(x[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - h) // 2
    return zoomed[trim : trim + h, trim : trim + h]


def _zoom_blur(x, c, rng):
    # the mean of the image and its zooms by 1.00, 1.01, ... (1.00 included: the image counts twice)
    factors = np.arange(1, c, 0.01)
    out = x.astype(np.float32)
    total = np.zeros_like(out)
    for factor in factors:
        total += clipped_zoom(out, factor)
    return (out + total) / (len(factors) + 1)


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square noise in [0, 1] on a ``size`` x ``size`` torus (size a power of 2), as the fog of
    the original: corners start at 0, every new point is the mean of its 4 neighbours plus
    ``w * U(-w, w)``, with w = 100 divided by ``decay`` after each halving of the step."""
    grid = np.zeros((size, size))
    step, w = size, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        # square step: centres of the squares from their 4 corners (wrapping around)
        around = corners + np.roll(corners, -1, axis=0)
        around = around + np.roll(around, -1, axis=1)
        grid[half:size:step, half:size:step] = around / 4 + w * rng.uniform(-w, w, around.shape)
        centres = grid[half:size:step, half:size:step]
        # diamond step: edge midpoints from the two centres and two corners beside them
        row_mid = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = row_mid / 4 + w * rng.uniform(-w, w, row_mid.shape)
        col_mid = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = col_mid / 4 + w * rng.uniform(-w, w, col_mid.shape)
        step, w = half, w / decay
    grid -= grid.min()
    return grid / grid.max()


def _fog(x, c, rng):
    strength, decay = c
    peak = x.max()
    h = x.shape[0]
    x = x + strength * plasma_fractal(h, decay, rng)[:h, :h, None]
    return x * peak / (peak + strength)


# --- digital ----------------------------------------------------------------------------------


def _contrast(x, c, rng):
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _brightness(x, c, rng):
    hsv = rgb_to_hsv(np.clip(x, 0, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


def _saturate(x, c, rng):
    hsv = rgb_to_hsv(np.clip(x, 0, 1))
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return hsv_to_rgb(hsv)


def _jpeg_compression(x, c, rng):
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buffer, "JPEG", quality=c)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255.0


def _pixelate(x, c, rng):
    image = Image.fromarray(_to_uint8(x))
    w, h = image.size
    small = image.resize((int(w * c), int(h * c)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX), dtype=np.float64) / 255.0


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("gaussian_noise", "noise", (0.04, 0.06, 0.08, 0.09, 0.10), _gaussian_noise),
        Corruption("shot_noise", "noise", (500, 250, 100, 75, 50), _shot_noise),
        Corruption("impulse_noise", "noise", (0.01, 0.02, 0.03, 0.05, 0.07), _impulse_noise),
        Corruption(
            "defocus_blur", "blur", ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), _defocus_blur
        ),
        Corruption(
            "glass_blur",
            "blur",
            ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
            _glass_blur,
        ),
        Corruption(
            "zoom_blur", "blur", (1.06, 1.11, 1.16, 1.21, 1.26), _zoom_blur
        ),  # np.arange(1, c, 0.01): 7, 12, 16, 21, 26 factors
        Corruption("fog", "weather", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), _fog),
        Corruption("brightness", "weather", (0.05, 0.1, 0.15, 0.2, 0.3), _brightness),
        Corruption("contrast", "digital", (0.75, 0.5, 0.4, 0.3, 0.15), _contrast),
        Corruption("pixelate", "digital", (0.95, 0.9, 0.85, 0.75, 0.65), _pixelate),
        Corruption("jpeg_compression", "digital", (80, 65, 58, 50, 40), _jpeg_compression),
        # held out for tuning (the 4 extra corruptions of the paper's appendix)
        Corruption("speckle_noise", "noise", (0.06, 0.1, 0.12, 0.16, 0.2), _speckle_noise),
        Corruption("gaussian_blur", "blur", (0.4, 0.6, 0.7, 0.8, 1.0), _gaussian_blur),
        Corruption("saturate", "digital", ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), _saturate),
    )
}
# The benchmark's 15, in its canonical order (the continual protocol's order), and the 4 for tuning.
BENCHMARK = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
PLANNED = tuple(n for n in (*BENCHMARK, *HELD_OUT) if n not in CORRUPTIONS)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(x, 0, 1) * 255)  # truncation, as the original's np.uint8 of its float output


def check(name: str, severity: int) -> Corruption:
    """The corruption ``name`` at ``severity``, or one UsageError line listing what exists."""
    if name in PLANNED:
        raise UsageError(f"corruption '{name}' is not implemented yet; available: {', '.join(CORRUPTIONS)}")
    if name not in CORRUPTIONS:
        raise UsageError(
            f"unknown corruption '{name}'; expected one of: {', '.join((*BENCHMARK, *HELD_OUT))}"
        )
    if severity not in (1, 2, 3, 4, 5):
        raise UsageError(f"severity must be 1, 2, 3, 4 or 5, got {severity}")
    return CORRUPTIONS[name]


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``image`` (H, W, 3) uint8 corrupted by ``name`` at ``severity`` (1-5): same shape, uint8."""
    corruption = check(name, severity)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    x = image.astype(np.float64) / 255.0
    return _to_uint8(corruption.fn(x, corruption.severities[severity - 1], rng))


def image_rng(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    """The generator of one image of one corruption and severity: independent of the order of work."""
    key = sum(ord(ch) * 31**i for i, ch in enumerate(name)) % (2**32)
    return np.random.default_rng([seed, key, severity, index])
