"""Two asymmetric BYOL views per image, each a pure function of (seed, epoch, image index).

The recipe (official ``main_moco.py``, "follow BYOL's augmentation recipe"): RandomResizedCrop
(scale 0.08–1), colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur
σ∈[0.1, 2] px at 224 px (scaled to the input size: the same blur relative to the image) with p 1.0 / 0.1, solarize p 0 / 0.2, horizontal flip. lightly's
``BYOLView1Transform`` / ``BYOLView2Transform`` have exactly these defaults; they flip before the
colour ops instead of after, which changes nothing in distribution (every later op commutes with
a flip).

Both views of an image are a pure function of (seed, epoch, index): see :mod:`selfsup.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from torch.utils.data import Dataset, get_worker_info

from selfsup.sampling import sample_seed, seed_all, seeded
from selfsup.ssl.settings import AugmentSettings


def byol_views(
    settings: AugmentSettings, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[Callable, Callable]:
    """The two view transforms (PIL image -> normalised tensor); ``min_scale`` must be resolved
    (the pretraining stage fills it from the backbone's recipe when it builds the model)."""
    if settings.min_scale is None:
        raise ValueError(
            "augment.min_scale is unresolved: build the model first (ssl.settings.resolve_recipe)"
        )
    b, c, s, h = settings.jitter
    scale = input_size / settings.blur_reference_size if settings.blur_reference_size else 1.0
    common = dict(
        input_size=input_size,
        cj_prob=settings.jitter_prob,
        cj_bright=b,
        cj_contrast=c,
        cj_sat=s,
        cj_hue=h,
        min_scale=settings.min_scale,
        random_gray_scale=settings.gray_prob,
        sigmas=tuple(sigma * scale for sigma in settings.blur_sigmas),
        hf_prob=settings.flip_prob,
        normalize={"mean": list(mean), "std": list(std)},
    )
    view1 = BYOLView1Transform(
        gaussian_blur=settings.blur_prob[0], solarization_prob=settings.solarize_prob[0], **common
    )
    view2 = BYOLView2Transform(
        gaussian_blur=settings.blur_prob[1], solarization_prob=settings.solarize_prob[1], **common
    )
    return view1, view2


class TwoViews(Dataset):
    """Wraps a labelled dataset of PIL images; ``dataset[(index, seed)]`` -> (view1, view2).

    Indices come from :class:`~selfsup.sampling.GlobalBatchSampler` as (index, seed) pairs.
    Labels are dropped: pretraining never sees them.
    """

    def __init__(self, dataset: Any, view1: Callable, view2: Callable):
        self.dataset = dataset
        self.view1 = view1
        self.view2 = view2

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        image = self.dataset[index][0]
        with seeded(seed):
            return self.view1(image), self.view2(image)


class StreamViews(torch.utils.data.IterableDataset):
    """Two views of each image of a stream (WebDataset shards), for data too big for an index.

    A stream has no per-image index, so each DataLoader worker of each process seeds the
    generators once, from (seed, rank, worker, pass): the views are reproducible from the start
    of a pass, but a resumed run restarts its stream rather than continuing it mid-shard.
    """

    def __init__(self, stream: Any, view1: Callable, view2: Callable, seed: int = 0, rank: int = 0):
        self.stream = stream
        self.view1 = view1
        self.view2 = view2
        self.seed = seed
        self.rank = rank
        self.passes = 0

    def __iter__(self):
        worker = get_worker_info()
        seed_all(sample_seed(self.seed, self.passes, self.rank * 1024 + (worker.id if worker else 0)))
        self.passes += 1
        for image, _label in self.stream:
            yield self.view1(image), self.view2(image)
