"""Fine-tuning's data: the labelled train split through :class:`~selfsup.sampling.GlobalBatchSampler`
(exact resume, W processes = 1 process) and the validation split sharded over the processes.

Unreadable files: a training one is replaced by the next readable image of the (labelled) training
set (:class:`~selfsup.sampling.SeededImages`), a validation one is skipped and not counted
(:class:`~selfsup.imagefolder.MarkSkipped`); both are reported by path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from selfsup.builtin_data import stratified_split
from selfsup.data import DataOptions, DatasetInfo, build_dataset, class_targets, is_map_style
from selfsup.errors import UsageError
from selfsup.finetune.augment import train_transform
from selfsup.finetune.settings import FinetuneConfig
from selfsup.imagefolder import marking_collate, skipped_files
from selfsup.sampling import GlobalBatchSampler, SeededImages, global_batch_loader, make_loader
from selfsup.transforms import eval_transform
from selfsup.workers import stop_workers


def data_options(config: FinetuneConfig) -> DataOptions:
    return DataOptions(
        root=config.data_root,
        # "drop" for both splits: validation skips an unreadable file, and training replaces it in
        # SeededImages, from the training images the sampler draws (batches keep their size for mixup)
        on_corrupt="drop",
        val_fraction=config.val_fraction,
        seed=config.seed,
        synthetic_size=config.synthetic_size,
        synthetic_classes=config.synthetic_classes,
    )


def load_training_data(config: FinetuneConfig, world: int) -> tuple[Any, DatasetInfo]:
    """The (label-fraction) training images, undecoded, and their facts, after the checks that need
    no model or process group: an indexed dataset, a batch that splits evenly and fits the training
    set. Run before anything is written, so a refusal leaves ``out`` untouched."""
    check_batch(config, world)
    train, info = build_dataset(config.dataset, "train", None, data_options(config))
    if not is_map_style(train):
        raise UsageError(
            f"{config.dataset} is a stream of shards; fine-tuning needs an indexed dataset "
            "(an image folder or a registry dataset)"
        )
    if config.label_fraction < 1:
        train = _labelled_share(train, info, config.label_fraction, config.seed)
    if config.batch_size > len(train):
        raise UsageError(
            f"batch_size={config.batch_size} is larger than the training set ({len(train)} images"
            + (f" at label_fraction={config.label_fraction}" if config.label_fraction < 1 else "")
            + "): lower batch_size"
        )
    return train, info


@dataclass
class Pipeline:
    info: DatasetInfo
    train: DataLoader
    val: DataLoader
    sampler: GlobalBatchSampler

    @property
    def train_size(self) -> int:
        """Training images, less the unreadable ones met so far."""
        return _readable_count(self.train.dataset.dataset)

    @property
    def val_size(self) -> int:
        """Validation images, less the unreadable ones (all known once it has been evaluated)."""
        return _readable_count(self.val.dataset)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch()

    def batches(self, epoch: int, first_step: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_position(epoch, first_step)
        return self.train

    def close(self) -> None:
        stop_workers(self.train)
        stop_workers(self.val)


def _readable_count(dataset: Any) -> int:
    return len(dataset) - len(skipped_files(dataset))


def _labelled_share(train: Any, info: DatasetInfo, fraction: float, seed: int) -> Subset:
    """A class-stratified, seeded ``fraction`` of the training images: every class keeps at least one
    (a class with a single image keeps it), the rest is set aside like a validation split."""
    kept, _ = stratified_split(
        class_targets(train), 1 - fraction, seed, class_names=info.classes, name=info.name
    )
    return Subset(train, kept.tolist())


def check_batch(config: FinetuneConfig, world: int) -> None:
    """Mixup/cutmix pair each image with the batch flipped: every micro-batch must be even."""
    per_pass, rest = divmod(config.batch_size // world, config.optim.accum_steps)
    if rest:
        raise UsageError(
            f"batch_size={config.batch_size} over {world} process(es) is {config.batch_size // world} images, "
            f"not divisible by optim.accum_steps={config.optim.accum_steps}"
        )
    if config.mixes and per_pass % 2:
        raise UsageError(
            f"mixup/cutmix need an even number of images per pass, got {per_pass} (batch_size={config.batch_size} "
            f"/ {world} process(es) / accum_steps={config.optim.accum_steps}): use an even batch_size, "
            "or augment.mixup=0 augment.cutmix=0"
        )


def build_pipeline(
    config: FinetuneConfig,
    img_size: int,
    mean,
    std,
    rank: int,
    world: int,
    device: torch.device,
    data: tuple[Any, DatasetInfo] | None = None,
) -> Pipeline:
    """The loaders; ``data``: what :func:`load_training_data` returned (loaded here if not given)."""
    check_batch(config, world)  # again, with the process group's own count
    train, info = data or load_training_data(config, world)
    val, _ = build_dataset(
        config.dataset, "val", eval_transform(img_size, mean, std, info.image_size), data_options(config)
    )
    images = SeededImages(train, train_transform(img_size, mean, std, config.augment))
    train_loader, sampler = global_batch_loader(
        images, config.batch_size, rank, world, config.seed, config.num_workers, device
    )
    val_loader = make_loader(
        val,
        config.num_workers,
        device,
        batch_size=max(1, config.batch_size // world),
        shuffle=False,
        collate_fn=marking_collate(val),  # unreadable images keep their place until the gather
    )
    return Pipeline(info, train_loader, val_loader, sampler)
