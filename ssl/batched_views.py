"""BYOL views split in two: per-image crops and random parameters on the CPU, the rest batched on the device.

The CPU side (:class:`CropAndParams`, run in DataLoader workers inside the (seed, epoch, index)
seeding of :class:`~selfsup.ssl.augment.TwoViews`) samples torchvision's ``RandomResizedCrop``
region (scale ``min_scale``–1, the PIL path's op and distribution), cuts it onto a uint8 canvas
(:mod:`selfsup.ssl.crop_canvas`) and samples every later op's random parameters from the seeded
generators: flip, colour-jitter apply flag, factors and order, grayscale, blur flag and σ, solarize
flag. The training device (:class:`BatchedViews`) resizes the regions and applies the ops to the
whole batch, per sample, as DALI and FFCV-SSL pipelines do; it draws no random numbers, so the views
stay a pure function of (seed, epoch, index).

Distributions are those of :mod:`selfsup.ssl.augment` (lightly's ``BYOLView1/2Transform``:
torchvision ``ColorJitter`` factors U[max(0, 1-v), 1+v], hue U[-h, h], a random order of the four,
applied with p 0.8; grayscale p 0.2; blur σ U[σ0, σ1] with p 1.0 / 0.1; solarize at 128 with
p 0 / 0.2; flip p 0.5). The per-sample ops are kornia's (``kornia.enhance``: contrast with mean
subtraction, saturation with gray subtraction, hue, solarize and ``adjust_brightness_accumulative``,
all torchvision's formulas with a per-sample factor; ``kornia.filters.gaussian_blur2d`` with a
per-sample σ; ``kornia.color.rgb_to_grayscale``); torchvision's v2 functionals take one factor per
call. Written here: the per-sample flip and the per-sample jitter order (each of the four stages
applies, to each sample, the op its permutation names: kornia's ``ColorJitter`` orders a whole
batch alike). Unlike PIL the ops run in float without rounding to uint8 between them
(differences of a few grey levels, see tests/test_batched_views.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
    solarize,
)
from kornia.filters import gaussian_blur2d
from torchvision import transforms as T

from selfsup.ssl.crop_canvas import cut_region, resize_regions
from selfsup.ssl.settings import AugmentSettings

SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize default (lightly's RandomSolarization)


@dataclass(frozen=True)
class ViewRecipe:
    """One view's random ops: sizes, probabilities and ranges (σ already scaled to ``input_size``)."""

    input_size: int
    min_scale: float
    jitter: tuple[float, float, float, float]
    jitter_prob: float
    gray_prob: float
    blur_prob: float
    blur_sigmas: tuple[float, float]
    solarize_prob: float
    flip_prob: float

    @property
    def kernel_size(self) -> int:
        """Odd Gaussian kernel covering ±3 σ of the largest σ (torchvision's rule of thumb)."""
        return 2 * math.ceil(3 * self.blur_sigmas[1]) + 1


def view_recipes(settings: AugmentSettings, input_size: int) -> tuple[ViewRecipe, ViewRecipe]:
    """The two BYOL views of ``settings`` (the same values :func:`~selfsup.ssl.augment.byol_views` uses)."""
    if settings.min_scale is None:
        raise ValueError("augment.min_scale is unresolved: build the model first")
    scale = input_size / settings.blur_reference_size if settings.blur_reference_size else 1.0
    sigmas = (settings.blur_sigmas[0] * scale, settings.blur_sigmas[1] * scale)
    return tuple(
        ViewRecipe(
            input_size,
            settings.min_scale,
            settings.jitter,
            settings.jitter_prob,
            settings.gray_prob,
            settings.blur_prob[i],
            sigmas,
            settings.solarize_prob[i],
            settings.flip_prob,
        )
        for i in (0, 1)
    )


# One image's parameters, packed in one float tensor (one draw, one tensor to collate and move).
FIELDS = ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "o0", "o1", "o2", "o3")
FIELDS += ("gray", "blur", "sigma", "solarize", "crop_w", "crop_h")


def sample_params(recipe: ViewRecipe, crop: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """One image's parameters of every op after the crop (:data:`FIELDS`), from NumPy's seeded global
    generator (one draw: torch's per-call overhead on tiny tensors cost more than the crop at 32 px),
    packed with the crop's (w, h) extent on its canvas."""
    b, c, s, h = recipe.jitter
    low = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    high = np.array([1 + b, 1 + c, 1 + s, h])
    u = np.random.random_sample(10)
    flags = u[:5] < (
        recipe.flip_prob,
        recipe.jitter_prob,
        recipe.gray_prob,
        recipe.blur_prob,
        recipe.solarize_prob,
    )
    factors = low + (high - low) * u[5:9]
    sigma = recipe.blur_sigmas[0] + (recipe.blur_sigmas[1] - recipe.blur_sigmas[0]) * u[9]
    order = np.random.permutation(4)
    packed = [flags[0], flags[1], *factors, *order, flags[2], flags[3], sigma, flags[4], *crop]
    return torch.tensor(np.array(packed, dtype=np.float32))


def unpack(params: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of packed parameters (N x len(FIELDS)) -> the dict :func:`apply_params` takes."""
    column = {name: params[:, i] for i, name in enumerate(FIELDS)}
    flag = {k: column[k] > 0.5 for k in ("flip", "jitter", "gray", "blur", "solarize")}
    return {
        **flag,
        "factors": params[:, 2:6],  # brightness, contrast, saturation, hue
        "order": params[:, 6:10].long(),
        "sigma": column["sigma"],
        "crop": params[:, 14:16],  # w, h on the canvas
    }


class CropAndParams:
    """CPU side of one view: PIL image -> {"image": uint8 HxWx3 canvas holding the crop's region,
    "params": the region's extent and the later ops' parameters}."""

    def __init__(self, recipe: ViewRecipe):
        self.recipe = recipe
        self.crop = T.RandomResizedCrop(recipe.input_size, scale=(recipe.min_scale, 1.0))

    def __call__(self, image) -> dict[str, torch.Tensor]:
        image = image if image.mode == "RGB" else image.convert("RGB")
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        canvas, width, height = cut_region(image, box, self.recipe.input_size)
        return {"image": torch.from_numpy(canvas), "params": sample_params(self.recipe, (width, height))}


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:
        return adjust_brightness_accumulative(x, factor)
    if op == 1:
        return adjust_contrast_with_mean_subtraction(x, factor)
    if op == 2:
        return adjust_saturation_with_gray_subtraction(x, factor)
    return adjust_hue(x, factor * 2 * math.pi)  # kornia's hue is in radians, torchvision's in turns


def color_jitter(
    x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """Each sample with ``apply`` gets its four factors in its own order (stage k: op ``order[:, k]``)."""
    x = x.clone()
    for stage in range(4):
        for op in range(4):
            chosen = (apply & (order[:, stage] == op)).nonzero().squeeze(1)
            if len(chosen):
                x[chosen] = _jitter_op(x[chosen], op, factors[chosen, op])
    return x


def _where(flag: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(flag.view(-1, 1, 1, 1), a, b)


def apply_params(x: torch.Tensor, p: dict[str, torch.Tensor], kernel_size: int) -> torch.Tensor:
    """The ops after the crop, in lightly's order, on a float batch in [0, 1]."""
    x = _where(p["flip"], x.flip(-1), x)
    x = color_jitter(x, p["jitter"], p["factors"], p["order"])
    x = _where(p["gray"], rgb_to_grayscale(x).expand_as(x), x)
    blurred = p["blur"].nonzero().squeeze(1)
    if len(blurred):
        k = min(kernel_size, 2 * (min(x.shape[-2:]) // 2) - 1)  # reflect padding needs k < size
        sigma = p["sigma"][blurred].to(x.dtype).view(-1, 1).expand(-1, 2)
        x = x.clone()
        x[blurred] = gaussian_blur2d(x[blurred], (k, k), sigma, border_type="reflect")
    thresholds = torch.where(p["solarize"], SOLARIZE_THRESHOLD, 2.0).to(x.dtype)  # 2: none solarized
    return solarize(x, thresholds)


class BatchedViews:
    """Device side: a collated (view1, view2) pair of :class:`CropAndParams` dicts -> two normalised batches."""

    def __init__(self, recipes: Sequence[ViewRecipe], mean: Sequence[float], std: Sequence[float]):
        self.size = recipes[0].input_size
        self.kernel_sizes = [r.kernel_size for r in recipes]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def view(self, batch: dict[str, torch.Tensor], kernel_size: int, device: torch.device) -> torch.Tensor:
        image = batch["image"].to(device, non_blocking=True)
        p = unpack(batch["params"].to(device, non_blocking=True))
        x = apply_params(resize_regions(image, p["crop"], self.size) / 255, p, kernel_size)
        return (x - self.mean.to(device)) / self.std.to(device)

    def __call__(self, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = batch
        return self.view(v1, self.kernel_sizes[0], device), self.view(v2, self.kernel_sizes[1], device)
