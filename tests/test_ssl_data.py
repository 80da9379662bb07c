"""Which images each process sees, and that a view depends only on (seed, epoch, image)."""

import torch

from selfsup.data import build_dataset
from selfsup.ssl.augment import TwoViews, byol_views, sample_seed
from selfsup.ssl.sampling import GlobalBatchSampler
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
    views = TwoViews(dataset, *byol_views(AugmentSettings(), 32, info.mean, info.std))
    items = [(i, sample_seed(0, 1, i)) for i in range(4)]
    first = [views[item] for item in items]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    second = [views[item] for item in reversed(items)][::-1]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not torch.equal(first[0][0], first[0][1])  # the two views differ
    assert not torch.equal(views[(0, sample_seed(0, 2, 0))][0], first[0][0])  # and so do epochs
