"""The common corruptions of Hendrycks & Dietterich (ICLR 2019) at CIFAR's 32x32 parameters, seeded.

Each corruption is a pure function of (image, severity 1-5, numpy Generator): the same seed gives
the same corrupted image on any machine, which the original script (no seed) and the
``imagecorruptions`` package (ImageNet severities, broken under NumPy 2) do not. The parameters are
those of the CIFAR generator (``make_cifar_c.py``); the steps are restated with numpy, scipy and PIL
in place of scikit-image and ImageMagick, each noted where it differs, and OpenCV is called where
the original calls it for a step no restatement reproduces bit for bit (spatter's Canny edges,
distance transform and 8-bit filters; snow's grey conversion; defocus blur's float32 kernel and
filter). 15 benchmark corruptions plus the 4 held out for tuning (``HELD_OUT``).

Frost differs from the released CIFAR-10-C in its texture, not its parameters: the original blends in
crops of five frost photographs it ships; here the textures are procedural (``frost_texture``), a fixed
bank of five made from fixed seeds, each matched to one photograph's brightness, tint, contrast and
fineness (``FROST_LOOKS``), so every run draws from the same frost as strong as the original's."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image, ImageDraw
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
    """The defocus kernel: a disk of ``radius`` px, normalised, then slightly blurred (anti-aliasing):
    float32 and OpenCV's GaussianBlur, as the original's ``disk``."""
    if radius <= 8:
        span, size = np.arange(-8, 8 + 1), (3, 3)
    else:
        span, size = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(span, span)
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    kernel /= np.sum(kernel)
    return cv2.GaussianBlur(kernel, ksize=size, sigmaX=alias_blur)


def _defocus_blur(x, c, rng):
    kernel = _disk(*c)
    # OpenCV's filter2D per channel (a float32 kernel over the float64 image), as the original
    return np.stack([cv2.filter2D(x[..., ch], -1, kernel) for ch in range(3)], axis=-1)


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


def motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion-blur kernel (``MotionBlurImage``), restated as a square correlation kernel
    centred on the pixel: 2 ceil(radius) + 1 taps weighted exp(-i^2 / 2 sigma^2), i = 0, 1, ...,
    normalised, tap i at i px from the pixel along ``angle`` degrees (x right, y down), rounded to the
    grid. One-sided: each pixel averages itself and the pixels ahead of it, so edges smear one way."""
    width = 2 * int(np.ceil(radius)) + 1
    steps = np.arange(width)
    taps = np.exp(-(steps**2) / (2 * sigma**2))
    taps /= taps.sum()
    theta = np.deg2rad(angle)
    # ceil(v - 0.5) as ImageMagick rounds the offsets (halves go down); two taps can share a pixel
    cols = np.ceil(steps * np.cos(theta) - 0.5).astype(int) + width - 1
    rows = np.ceil(steps * np.sin(theta) - 0.5).astype(int) + width - 1
    kernel = np.zeros((2 * width - 1, 2 * width - 1))
    np.add.at(kernel, (rows, cols), taps)
    return kernel


def _correlate_edge(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation of each channel with an odd square kernel, borders repeating the edge pixel
    (ImageMagick's default virtual pixels), as a sum of shifted copies: a line of taps in a mostly
    empty square is much cheaper so than through ndimage.correlate."""
    half = kernel.shape[0] // 2
    padded = np.pad(x, [(half, half), (half, half)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    h, w = x.shape[:2]
    out = np.zeros(x.shape)
    for row, col in zip(*np.nonzero(kernel)):
        out += kernel[row, col] * padded[row : row + h, col : col + w]
    return out


def imagemagick_8bit(values: np.ndarray) -> np.ndarray:
    """An 8-bit image (0-255 units) filtered in ImageMagick and written back as 8 bits, as the original's
    PNG round trip: ImageMagick reads 8 bits as 16 (x 257), rounds its filtered sum to 16 bits
    (ClampToQuantum) and writes 8 bits by truncating (q // 257). Measured equal to Wand's
    MagickMotionBlurImage (ImageMagick 6.9.11 Q16) on every value of 20 seeded images."""
    return np.floor(np.floor(values * 257 + 0.5) / 257)


def _motion_blur(x, c, rng):
    radius, sigma = c
    blurred = _correlate_edge(x * 255, motion_kernel(radius, sigma, rng.uniform(-45, 45)))
    return imagemagick_8bit(blurred) / 255


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


def _snow(x, c, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = c
    h, w = x.shape[:2]
    flakes = clipped_zoom(rng.normal(loc, scale, size=(h, w, 1)), zoom)[..., 0]
    flakes[flakes < threshold] = 0
    # The original blurs the layer as an 8-bit grey image in ImageMagick: truncated to uint8 going in,
    # through ImageMagick's 16 bits, truncated to 8 coming out.
    flakes = np.uint8(np.clip(flakes, 0, 1) * 255).astype(np.float64)
    streaks = _correlate_edge(flakes, motion_kernel(radius, sigma, rng.uniform(-135, -45)))
    streaks = imagemagick_8bit(streaks)[..., None] / 255.0
    x = _float32(x)  # the original whitens a float32 image (OpenCV's grey of float32)
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)  # whiten towards a snowy sky
    return x + streaks + np.rot90(streaks, k=2)  # the flakes twice, the copy turned half a circle


FROST_SIZE = (128, 192)  # the texture at the original's 0.2 scale: a 32 px crop is a small window of it
FROST_SEED = 20190101  # the bank's fixed seed: the same five textures in every run, as the shipped photos


@dataclass(frozen=True)
class FrostLook:
    """What a frost texture is matched to: its mean R, G, B (brightness and tint), the standard deviation
    of its grey (contrast) and the share of the grey's power above 1/8 cycle per pixel (how fine)."""

    mean: tuple[float, float, float]
    std: float
    high: float


# The original's frost1..frost5 as it uses them (cv2.imread, cv2.resize by 0.2), measured from
# hendrycks/robustness ImageNet-C/create_c; frost2.png and frost3.png are the same file. The grey's
# mean absolute neighbour difference, not fitted, comes out within 1.3 levels of the photos' (10.8,
# 14.4, 14.4, 21.9, 29.2).
FROST_LOOKS = (
    FrostLook((77.5, 149.0, 165.7), 17.9, 0.324),
    FrostLook((200.8, 205.4, 214.5), 22.0, 0.462),
    FrostLook((200.8, 205.4, 214.5), 22.0, 0.462),
    FrostLook((138.0, 153.2, 165.6), 29.3, 0.540),
    FrostLook((112.3, 123.3, 134.7), 43.0, 0.488),
)


def high_share(grey: np.ndarray) -> float:
    """The share of a grey image's (mean-free) power above 1/8 cycle per pixel."""
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(grey.shape[0]), np.fft.fftfreq(grey.shape[1]), indexing="ij")
    return float(power[np.hypot(fx, fy) > 1 / 8].sum() / power.sum())


def _dendrites(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Ice dendrites on an (h, w) canvas, values in [0, 1]: strokes that wander slightly and sprout side
    branches at 60 degrees, as hexagonal crystals grow, each generation fainter."""
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    # (x, y, heading, length in canvas px, generation); the trunks start anywhere, heading anywhere
    todo = [(*rng.uniform((0, 0, 0, 40), (w, h, 2 * np.pi, 120)), 0) for _ in range(h * w // 240)]
    while todo:
        x0, y0, heading, length, generation = todo.pop()
        brightness = 255 * (1 - 0.3 * generation)
        for _ in range(int(length // 4)):  # 4 px segments
            heading += rng.normal(0, 0.1)
            x1, y1 = x0 + 4 * np.cos(heading), y0 + 4 * np.sin(heading)
            draw.line((x0, y0, x1, y1), fill=int(brightness * rng.uniform(0.6, 1)))
            if generation < 2 and rng.random() < 0.3:
                side = np.pi / 3 if rng.random() < 0.5 else -np.pi / 3
                todo.append((x1, y1, heading + side, length * rng.uniform(0.2, 0.5), generation + 1))
            x0, y0 = x1, y1
    return np.asarray(canvas, dtype=np.float64) / 255


def _standard(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / a.std()


def _frost_layers(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(fine, coarse), each of mean 0 and deviation 1: the dendrites drawn at twice the size and
    averaged down (strokes thinner than a pixel, as in the photos after the 0.2 resize); a plasma haze
    with the strokes' soft glow."""
    h, w = size
    strokes = _dendrites(rng, 2 * h, 2 * w)
    side = 1 << int(np.ceil(np.log2(max(2 * h, 2 * w))))
    haze = plasma_fractal(side, 1.6, rng)[: 2 * h, : 2 * w]
    fine = ndimage.gaussian_filter(strokes, 0.6)
    coarse = 0.3 * haze + 2.0 * ndimage.gaussian_filter(strokes, 6)
    return tuple(_standard(a.reshape(h, 2, w, 2).mean(axis=(1, 3))) for a in (fine, coarse))


def _frost_pattern(fine: np.ndarray, coarse: np.ndarray, high: float) -> np.ndarray:
    """t fine + (1 - t) coarse, standardised, with t (bisected) giving the ``high`` share of power above
    1/8 cycle per pixel."""
    low, top = 0.0, 1.0
    for _ in range(30):
        t = (low + top) / 2
        low, top = (t, top) if high_share(t * fine + (1 - t) * coarse) < high else (low, t)
    return _standard(t * fine + (1 - t) * coarse)


def _frost_tone(z: np.ndarray, look: FrostLook) -> np.ndarray:
    """uint8 RGB of ``look``'s mean and grey deviation from a standardised pattern: one gain for the three
    channels (so blue stays at or above red where its mean is), refitted for what clipping takes."""
    means = np.array(look.mean)
    gain, shift = look.std, 0.0
    for _ in range(5):
        grey = np.clip(means + shift + gain * z[..., None], 0, 255).mean(axis=-1)
        gain, shift = gain * look.std / grey.std(), shift + means.mean() - grey.mean()
    return np.uint8(np.round(np.clip(means + shift + gain * z[..., None], 0, 255)))


def frost_texture(
    rng: np.random.Generator, size: tuple[int, int] = FROST_SIZE, look: FrostLook = FROST_LOOKS[4]
) -> np.ndarray:
    """A procedural stand-in for one of the original's frost photographs: (H, W, 3) uint8, with its
    brightness and tint, contrast and fineness (``look``). Ice dendrites over a plasma haze with a soft
    glow around the strokes, mixed and toned to the look. A pure function of ``rng``."""
    fine, coarse = _frost_layers(rng, size)
    return _frost_tone(_frost_pattern(fine, coarse, look.high), look)


@functools.cache
def _frost_bank() -> tuple[np.ndarray, ...]:
    # five, as the original draws one of frost1..frost5 (its randint(5) never reaches frost6), each
    # with the look of its photograph
    textures = tuple(
        frost_texture(np.random.default_rng([FROST_SEED, i]), look=look) for i, look in enumerate(FROST_LOOKS)
    )
    for texture in textures:
        texture.flags.writeable = False
    return textures


def _frost(x, c, rng):
    image_weight, frost_weight = c
    bank = _frost_bank()
    texture = bank[rng.integers(len(bank))]
    h, w = x.shape[:2]
    # exclusive upper bounds, as the original's randint: the last possible offset is never drawn
    top = rng.integers(0, texture.shape[0] - h)
    left = rng.integers(0, texture.shape[1] - w)
    crop = texture[top : top + h, left : left + w]
    return (image_weight * x * 255 + frost_weight * crop) / 255  # the original blends in 0-255 units


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


EMBOSS = np.float32([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
WATER = np.float32(np.array([175, 238, 238]) / 255.0)  # pale turquoise, as the original's float32 layer
MUD = np.float32(np.array([63, 42, 20]) / 255.0)  # mud brown


def _spatter(x, c, rng):
    loc, scale, sigma, threshold, intensity, mud = c
    x = _float32(x)  # the original works in float32 from the image on
    liquid = _gaussian(rng.normal(loc, scale, size=(*x.shape[:2], 1)), sigma)[..., 0]
    liquid[liquid < threshold] = 0
    if mud:
        return _mud(x, liquid, threshold, intensity)
    return _water(x, liquid, intensity)


def _water(x: np.ndarray, liquid: np.ndarray, intensity: float) -> np.ndarray:
    """Spatter's water (severities 1-3): bright turquoise rims, embossed, along the edges of the drops.
    The original's OpenCV steps called as it calls them: Canny edges, the 5x5-mask distance to the
    nearest edge (at most 20), a 3x3 box blur in float32 cut to uint8, histogram equalisation, the
    emboss and a second box blur in 8 bits."""
    # the original's uint8 cast wraps a rare drop above 1 (on x86); explicit here, the same anywhere
    liquid = np.uint8((liquid * 255).astype(np.int64) % 256)
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, EMBOSS), (3, 3)).astype(np.float32)
    m = liquid * dist
    if m.max() == 0:  # no drop above the threshold: the original would divide 0 by 0 (NaN)
        return x
    m = m / m.max() * np.float32(intensity)
    return x + m[..., None] * WATER


def _mud(x: np.ndarray, liquid: np.ndarray, threshold: float, intensity: float) -> np.ndarray:
    """Spatter's mud (severities 4-5): the drops above the threshold, softened by a gaussian of sigma
    ``intensity``, their cores opaque; float32 as the original's in-place products."""
    m = _gaussian((liquid > threshold).astype(np.float32)[..., None], intensity)
    m[m < 0.8] = 0
    return x * (1 - m) + MUD * m


def _random_affine(x: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """The elastic transform's first step: the affine map that moves three anchor points around the
    centre by U(-alpha, alpha) px each, applied as OpenCV's warpAffine (bilinear, reflect-101 borders)."""
    h, w = x.shape[:2]
    centre, size = np.array([h // 2, w // 2], dtype=np.float64), min(h, w) // 3
    # (x, y) points; the original builds them from (rows, cols), the same for square images
    src = np.array([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    dst = src + rng.uniform(-alpha, alpha, size=src.shape)
    # the map (x, y, 1) -> (x', y') through the 3 pairs exactly, as OpenCV's getAffineTransform
    forward = np.eye(3)
    forward[:2] = np.linalg.solve(np.c_[src, np.ones(3)], dst).T
    # warpAffine reads each output pixel from the inverse map; scipy wants it in (row, col) order
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    inverse = swap @ np.linalg.inv(forward) @ swap
    # scipy's "mirror" is reflect-101; OpenCV interpolates with 1/32 px fixed-point weights, scipy exactly
    return np.stack(
        [ndimage.affine_transform(x[..., ch], inverse, order=1, mode="mirror") for ch in range(x.shape[2])],
        axis=-1,
    )


def _elastic_transform(x, c, rng):
    scale, sigma, alpha = c
    x = _random_affine(x, alpha, rng)
    h, w = x.shape[:2]
    # smoothed uniform noise as the displacement (x first, then y, as drawn in the original); at
    # severity 1 the scale is 0, so no displacement and the affine warp alone
    dx, dy = (
        ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * scale
        for _ in range(2)
    )
    rows, cols = np.mgrid[0:h, 0:w]
    coords = np.stack([rows + dy, cols + dx])
    return np.stack(
        [ndimage.map_coordinates(x[..., ch], coords, order=1, mode="reflect") for ch in range(x.shape[2])],
        axis=-1,
    )


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
            "motion_blur", "blur", ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)), _motion_blur
        ),  # (radius, sigma) of ImageMagick's motion blur, at an angle U(-45, 45)
        Corruption(
            "zoom_blur", "blur", (1.06, 1.11, 1.16, 1.21, 1.26), _zoom_blur
        ),  # np.arange(1, c, 0.01): 7, 12, 16, 21, 26 factors
        Corruption(
            "snow",
            "weather",
            (  # (loc, scale, zoom, threshold, radius, sigma, blend)
                (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
                (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
            ),
            _snow,
        ),
        Corruption(
            "frost", "weather", ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)), _frost
        ),  # (image weight, frost weight)
        Corruption("fog", "weather", ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), _fog),
        Corruption("brightness", "weather", (0.05, 0.1, 0.15, 0.2, 0.3), _brightness),
        Corruption("contrast", "digital", (0.75, 0.5, 0.4, 0.3, 0.15), _contrast),
        Corruption(
            "elastic_transform",
            "digital",
            # (scale, sigma, alpha_affine): 32 x (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), ...
            ((0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6), (3.2, 0.96, 0.96)),
            _elastic_transform,
        ),
        Corruption("pixelate", "digital", (0.95, 0.9, 0.85, 0.75, 0.65), _pixelate),
        Corruption("jpeg_compression", "digital", (80, 65, 58, 50, 40), _jpeg_compression),
        # held out for tuning (the 4 extra corruptions of the paper's appendix)
        Corruption("speckle_noise", "noise", (0.06, 0.1, 0.12, 0.16, 0.2), _speckle_noise),
        Corruption("gaussian_blur", "blur", (0.4, 0.6, 0.7, 0.8, 1.0), _gaussian_blur),
        Corruption(
            "spatter",
            "digital",
            (  # (loc, scale, sigma, threshold, intensity, mud): water at 1-3, mud at 4-5
                (0.62, 0.1, 0.7, 0.7, 0.5, 0),
                (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1),
            ),
            _spatter,
        ),
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


def _float32(x: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] from 8 bits as the original's ``np.array(x, dtype=np.float32) / 255.``:
    each level divided in float32 (not a float64 quotient rounded to float32)."""
    return np.rint(x * 255).astype(np.float32) / np.float32(255)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(x, 0, 1) * 255)  # truncation, as the original's np.uint8 of its float output


def check(name: str, severity: int) -> Corruption:
    """The corruption ``name`` at ``severity``, or one UsageError line listing what exists."""
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
