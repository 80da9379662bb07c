"""The input pipeline: the dataset, two augmented views per image, this process's batch per step.

Map-style datasets go through :class:`~selfsup.sampling.GlobalBatchSampler` (exact resume,
W processes = 1 process); streams of WebDataset shards are read in order per process, with
``length_per_epoch`` images counted as one epoch. DataLoader workers are persistent, memory is
pinned on GPUs, incomplete batches are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from selfsup.data import DataOptions, DatasetInfo, build_dataset, is_map_style
from selfsup.errors import UsageError
from selfsup.sampling import EndlessBatches, GlobalBatchSampler, global_batch_loader, make_loader
from selfsup.ssl.augment import StreamViews, TwoViews, byol_views
from selfsup.ssl.batched_views import BatchedViews, CropAndParams, view_recipes
from selfsup.ssl.settings import PretrainConfig
from selfsup.workers import stop_workers


def data_options(config: PretrainConfig) -> DataOptions:
    return DataOptions(
        root=config.data_root,
        on_corrupt="replace",  # every batch keeps its size (keys are all-gathered)
        shuffle=True,  # shard streams: shuffle shards and samples (indexed data has its own sampler)
        val_fraction=config.val_fraction,
        synthetic_size=config.synthetic_size,
        synthetic_classes=config.synthetic_classes,
    )


@dataclass
class Pipeline:
    dataset: Any
    info: DatasetInfo
    steps_per_epoch: int
    loader: DataLoader
    sampler: GlobalBatchSampler | None  # None for streams
    stream: EndlessBatches | None = None
    # (batch, device) -> (x1, x2) on the device; batched views finish there (augment.backend=batched)
    to_device: Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def indexed(self) -> bool:
        return self.sampler is not None

    def batches(self, epoch: int, first_step: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The (view1, view2) batches of ``epoch`` from step ``first_step`` on."""
        if self.sampler is None:
            assert self.stream is not None
            return self.stream.take(self.steps_per_epoch - first_step)
        self.sampler.set_position(epoch, first_step)
        return self.loader

    def facts(self) -> dict[str, Any]:
        """What the exported checkpoint needs to know about the data."""
        i = self.info
        return {
            "mean": list(i.mean),
            "std": list(i.std),
            "num_classes": i.num_classes,
            "dataset": i.name,
            "classes": list(i.classes),
        }

    def close(self) -> None:
        """Stop the DataLoader's worker processes now (:func:`selfsup.workers.stop_workers`); safe twice."""
        stop_workers(self.loader)
        if self.stream is not None:
            self.stream.close()


def build_pipeline(config: PretrainConfig, rank: int, world: int, device: torch.device) -> Pipeline:
    # Pretraining uses no labels: one class is fine, and without hold_out_val every image is used.
    options = replace(data_options(config), need_labels=False, hold_out=config.hold_out_val)
    dataset, info = build_dataset(config.dataset, "train", None, options)
    view1, view2, to_device = _views(config, info)
    if is_map_style(dataset):
        loader, sampler = global_batch_loader(
            TwoViews(dataset, view1, view2),
            config.batch_size,
            rank,
            world,
            config.seed,
            config.num_workers,
            device,
        )
        pipeline = Pipeline(dataset, info, sampler.steps_per_epoch(), loader, sampler)
        size = len(dataset)
    else:
        if not config.length_per_epoch:
            raise UsageError(
                f"{config.dataset} is a stream of shards: set length_per_epoch=<images per epoch>"
            )
        views = StreamViews(dataset, view1, view2, config.seed, rank)
        loader = make_loader(
            views, config.num_workers, device, batch_size=config.batch_size // world, drop_last=True
        )
        steps = config.length_per_epoch // config.batch_size
        pipeline = Pipeline(dataset, info, steps, loader, None, EndlessBatches(loader))
        size = config.length_per_epoch
    pipeline.to_device = to_device
    if pipeline.steps_per_epoch == 0:
        raise UsageError(
            f"batch_size={config.batch_size} is larger than the dataset ({size} images per epoch)"
        )
    return pipeline


def _views(config: PretrainConfig, info: DatasetInfo):
    """The workers' two view transforms, and what finishes them on the device (None: nothing, PIL)."""
    if config.augment.backend == "pil":
        return (*byol_views(config.augment, config.model.img_size, info.mean, info.std), None)
    recipes = view_recipes(config.augment, config.model.img_size)
    return CropAndParams(recipes[0]), CropAndParams(recipes[1]), BatchedViews(recipes, info.mean, info.std)
