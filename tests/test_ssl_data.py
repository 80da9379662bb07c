"""Which images each process sees, and that a view depends only on (seed, epoch, image)."""

import pytest
import torch

from selfsup.data import build_dataset
from selfsup.sampling import GlobalBatchSampler, sample_seed
from selfsup.ssl.augment import TwoViews, byol_views
from selfsup.ssl.settings import AugmentSettings


def test_rank_slices_concatenate_to_the_single_process_batch():
    single = list(GlobalBatchSampler(50, 8, seed=1))
    ranks = [list(GlobalBatchSampler(50, 8, rank=r, world_size=2, seed=1)) for r in (0, 1)]
    assert len(single) == 6  # drop_last: 50 // 8
    assert all(a + b == s for a, b, s in zip(*ranks, single))


def test_epochs_differ_and_a_resumed_sampler_continues_the_same_order():
    sampler = GlobalBatchSampler(50, 8, seed=1)
    sampler.set_position(epoch=2)
    full = list(sampler)
    sampler.set_position(epoch=2, start_step=4)
    assert list(sampler) == full[4:]
    sampler.set_position(epoch=3)
    assert list(sampler) != full


def test_views_depend_only_on_seed_epoch_and_index_and_leave_global_rngs_alone():
    dataset, info = build_dataset("synthetic", "train", None, synthetic_size=8)
    views = TwoViews(dataset, *byol_views(AugmentSettings(min_scale=0.08), 32, info.mean, info.std))
    items = [(i, sample_seed(0, 1, i)) for i in range(4)]
    first = [views[item] for item in items]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    second = [views[item] for item in reversed(items)][::-1]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not torch.equal(first[0][0], first[0][1])  # the two views differ
    assert not torch.equal(views[(0, sample_seed(0, 2, 0))][0], first[0][0])  # and so do epochs


def test_blur_is_scaled_to_the_image_size():
    """BYOL's sigma (0.1, 2.0) is for 224 px; at 32 px the same relative blur is 7x smaller."""
    from lightly.transforms.gaussian_blur import GaussianBlur

    def sigmas(view):
        return next(t for t in view.transform.transforms if isinstance(t, GaussianBlur)).sigmas

    view1, _ = byol_views(AugmentSettings(min_scale=0.08), 32, (0.5,) * 3, (0.25,) * 3)
    assert sigmas(view1) == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    view1, _ = byol_views(AugmentSettings(min_scale=0.08), 224, (0.5,) * 3, (0.25,) * 3)
    assert sigmas(view1) == (0.1, 2.0)
    absolute = AugmentSettings(min_scale=0.08, blur_sigmas=(0.1, 1.0), blur_reference_size=None)
    assert sigmas(byol_views(absolute, 32, (0.5,) * 3, (0.25,) * 3)[0]) == (0.1, 1.0)


def test_pretraining_uses_every_image_of_a_folder_without_val_unless_told_to_hold_out(tmp_path):
    import numpy as np
    from PIL import Image

    from selfsup.config import load_config
    from selfsup.ssl.pipeline import build_pipeline
    from selfsup.ssl.settings import PretrainConfig

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    sizes = {}
    for hold_out in ("false", "true"):
        cfg = load_config(
            PretrainConfig,
            None,
            [
                f"dataset=imagefolder:{tmp_path}",
                "batch_size=4",
                "num_workers=0",
                f"hold_out_val={hold_out}",
                "val_fraction=0.2",
                "augment.min_scale=0.08",  # a recipe key the model would resolve
            ],
        )
        sizes[hold_out] = len(build_pipeline(cfg, 0, 1, torch.device("cpu")).dataset)
    assert sizes == {"false": 20, "true": 16}
