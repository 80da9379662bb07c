"""augment.backend=batched: the BYOL recipe's distributions, each op against the PIL op, pure views, resume.

Tolerances: the PIL path rounds to uint8 after every op, the batched ops stay in float, so an op
on the same parameters differs by rounding (≤ 1-2 grey levels); PIL's hue goes through an 8-bit
HSV and its Gaussian blur is three box blurs, hence the wider bounds for those two. The crop's
resize (Pillow's filter as matrices on the device, selfsup.ssl.crop_canvas) is within 1 grey level
of torchvision's RandomResizedCrop on the same region (Pillow rounds between its two passes).
"""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from selfsup.config import load_config
from selfsup.ssl.batched_views import CropAndParams, apply_params, sample_params, unpack, view_recipes
from selfsup.ssl.crop_canvas import canvas_size, resize_regions
from selfsup.ssl.pipeline import build_pipeline
from selfsup.ssl.settings import AugmentSettings, PretrainConfig
from selfsup.ssl.train import train

N = 2000


def recipes(size=224):
    return view_recipes(AugmentSettings(min_scale=0.08), size)


def draws(recipe, n=N):
    return unpack(torch.stack([sample_params(recipe) for _ in range(n)]))


def within_binomial(flags, p):
    """The rate of ``flags`` within 4.5 standard deviations of p (a false alarm about once in 10^5)."""
    sd = math.sqrt(p * (1 - p) / len(flags))
    return abs(flags.float().mean().item() - p) <= 4.5 * sd + 1e-9


@pytest.mark.parametrize("view", [0, 1])
def test_apply_rates_follow_the_byol_recipe(view):
    p = draws(recipes()[view])
    expected = {
        "flip": 0.5,
        "jitter": 0.8,
        "gray": 0.2,
        "blur": (1.0, 0.1)[view],
        "solarize": (0.0, 0.2)[view],
    }
    for key, rate in expected.items():
        assert within_binomial(p[key], rate), (key, p[key].float().mean())


def test_jitter_factors_sigmas_and_orders_cover_the_recipe_ranges():
    p = draws(recipes()[0])
    f = p["factors"]
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        values = f[:, column]
        assert low <= values.min() and values.max() <= high
        # uniform: each quarter of the range holds a quarter of the draws
        counts = torch.histc(values, bins=4, min=low, max=high)
        assert all(within_binomial(torch.arange(N) < c, 0.25) for c in counts.tolist())
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert all(sorted(o.tolist()) == [0, 1, 2, 3] for o in p["order"])
    firsts = torch.bincount(p["order"][:, 0], minlength=4)
    assert all(within_binomial(torch.arange(N) < c, 0.25) for c in firsts.tolist())


def test_blur_sigmas_scale_with_the_input_size():
    p = draws(recipes(32)[0], 500)
    assert p["sigma"].max() <= 2.0 * 32 / 224 + 1e-6


def photo(size=48, seed=0):
    """A smooth random RGB image (blocks of colour, upsampled): closer to a photo than noise."""
    g = np.random.default_rng(seed)
    small = Image.fromarray(g.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BILINEAR)


def identity_params(n=1, **changes):
    p = {
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.zeros(n, dtype=torch.bool),
        "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
        "order": torch.arange(4).repeat(n, 1),
        "gray": torch.zeros(n, dtype=torch.bool),
        "blur": torch.zeros(n, dtype=torch.bool),
        "sigma": torch.ones(n),
        "solarize": torch.zeros(n, dtype=torch.bool),
    }
    return {**p, **changes}


def batched(image, params, kernel_size=13):
    x = TF.pil_to_tensor(image).float().unsqueeze(0) / 255
    return apply_params(x, params, kernel_size)[0] * 255


def levels(image):
    return TF.pil_to_tensor(image).float()


def jitter_only(op, factor):
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    factors[0, op] = factor
    order = torch.tensor([[op] + [i for i in range(4) if i != op]])
    return identity_params(jitter=torch.ones(1, dtype=torch.bool), factors=factors, order=order)


PIL_JITTER = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


@pytest.mark.parametrize(
    "op, factor, mean_tol, max_tol",
    [
        (0, 1.3, 0.6, 1),
        (0, 0.7, 0.6, 1),
        (1, 1.35, 0.6, 2),
        (1, 0.65, 0.6, 2),
        (2, 1.2, 0.6, 2),
        (2, 0.8, 0.6, 2),
        (3, 0.08, 2.0, 8),
        (3, -0.05, 2.0, 8),
    ],
)
def test_each_jitter_op_matches_the_pil_op_on_the_same_factor(op, factor, mean_tol, max_tol):
    image = photo()
    ours, pil = batched(image, jitter_only(op, factor)), levels(PIL_JITTER[op](image, factor))
    diff = (ours - pil).abs()
    assert diff.mean() <= mean_tol and diff.max() <= max_tol + 1e-3, (diff.mean(), diff.max())


def test_the_jitter_order_is_per_sample():
    image = photo()
    x = TF.pil_to_tensor(image).float().unsqueeze(0).repeat(2, 1, 1, 1) / 255
    factors = torch.tensor([[1.4, 0.6, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    p = identity_params(2, jitter=torch.ones(2, dtype=torch.bool), factors=factors, order=order)
    out = apply_params(x, p, 13)
    for i, ops in enumerate(([0, 1], [1, 0])):
        ref = x[i]
        for op in ops:
            ref = PIL_JITTER[op](ref, factors[i, op].item())  # torchvision's tensor ops, one sample
        assert torch.allclose(out[i], ref, atol=1e-4)  # grey weights 0.299 vs 0.2989


def test_flip_grayscale_and_solarize_match_pil():
    image = photo()
    cases = [
        ("flip", ImageOps.mirror(image), 0),
        ("gray", image.convert("L").convert("RGB"), 1),
        ("solarize", ImageOps.solarize(image, 128), 0),
    ]
    for key, pil, tol in cases:
        ours = batched(image, identity_params(**{key: torch.ones(1, dtype=torch.bool)}))
        assert (ours - levels(pil)).abs().max() <= tol + 1e-3, key


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_matches_pil_gaussian_blur_on_the_same_sigma(sigma):
    image = photo(64)
    p = identity_params(blur=torch.ones(1, dtype=torch.bool), sigma=torch.tensor([sigma]))
    ours, pil = batched(image, p), levels(image.filter(ImageFilter.GaussianBlur(radius=sigma)))
    inner = (ours - pil).abs()[:, 8:-8, 8:-8]  # PIL and kornia pad the border differently
    assert inner.mean() <= 1.0 and inner.max() <= 4, (inner.mean(), inner.max())


def test_crops_are_torchvision_random_resized_crops_within_one_grey_level():
    """Same random numbers -> same region as torchvision's op; the device resize matches PIL's on it,
    both for regions on the canvas (resized on the device) and longer ones (resized on the CPU)."""
    g = np.random.default_rng(1)
    image = Image.fromarray(g.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((120, 90), Image.BILINEAR)
    recipe = recipes(32)[0]
    crop, reference = CropAndParams(recipe), T.RandomResizedCrop(32, scale=(recipe.min_scale, 1.0))
    on_device = []
    for seed in range(24):
        torch.manual_seed(seed)
        box = reference.get_params(image, reference.scale, reference.ratio)
        torch.manual_seed(seed)
        out = crop(image)
        view = resize_regions(out["image"][None], unpack(out["params"][None])["crop"], 32)[0]
        diff = (view - levels(TF.resized_crop(image, *box, [32, 32]))).abs()
        assert diff.mean() <= 0.5 and diff.max() <= 1 + 1e-3, (box, diff.mean(), diff.max())
        on_device.append(max(box[2:]) <= canvas_size(32))
    assert any(on_device) and not all(on_device)  # both paths ran


def tiny(*extra):
    return load_config(
        PretrainConfig, None, [*TINY_PRETRAIN, "augment.backend=batched", "num_workers=0", *extra]
    )


def first_views(config, rank=0, world=1):
    from selfsup.ssl.builder import build_model

    build_model(config)  # resolves augment.min_scale
    pipeline = build_pipeline(config, rank, world, torch.device("cpu"))
    batch = next(iter(pipeline.batches(epoch=1, first_step=1)))
    return pipeline.to_device(batch, torch.device("cpu"))


def test_views_are_a_pure_function_of_seed_epoch_and_index(tmp_path):
    config = tiny(f"out={tmp_path}")
    a, b = first_views(config), first_views(config)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    halves = [first_views(config, rank, 2) for rank in (0, 1)]
    for view in (0, 1):
        assert torch.equal(torch.cat([h[view] for h in halves]), a[view])
    assert not torch.equal(a[0], a[1])  # the two views differ


def losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "event" not in r]


def test_a_batched_run_resumes_exactly(tmp_path):
    common = ["mixed_precision=no", "resume=auto"]
    straight = train(tiny(*common, "max_steps=2", f"out={tmp_path / 'a'}"))
    train(tiny(*common, "max_steps=1", f"out={tmp_path / 'b'}"))
    resumed = train(tiny(*common, "max_steps=2", f"out={tmp_path / 'b'}"))
    assert straight.status == resumed.status == "finished"
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 2
    assert all(math.isfinite(loss) for _, loss in losses(tmp_path / "a"))
