"""Recovery training of a pruned classifier through the core loop (:class:`selfsup.loop.TrainingRun`):
a short fine-tune on the training split, optionally distilled from the unpruned model (Hinton's soft
targets, the loss fine-tuning uses: :mod:`selfsup.distill`).

The run lives in ``OUT/recovery`` and has what every training stage has: exact resume (``resume=auto``
continues an interrupted ``compress`` with the same losses an uninterrupted run logs), a checkpoint
each epoch, SIGTERM/SIGINT saving at the next step, the NaN policy, ``log.jsonl``, and 1 or W
processes under ``accelerate launch`` seeing the same global batches (per-sample seeded augmentation,
:mod:`selfsup.sampling`).

Deliberately small: AdamW with a warm-up then cosine schedule, light augmentation (padded crop and
flip for images up to 64 px, random resized crop and flip above). The full fine-tuning recipe (mixup,
RandAugment, layer decay, EMA) is the finetune stage's; a pruned checkpoint can be fine-tuned there
too (``finetune --checkpoint OUT/pruned.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torchvision import transforms as T

from selfsup.accel import released
from selfsup.classifier import ClassifierStep, Distillation
from selfsup.compress.settings import CompressConfig
from selfsup.errors import UsageError
from selfsup.loop import RunSettings, TrainingRun, resume_point
from selfsup.runstate import RUN_KEYS
from selfsup.sampling import SeededImages, global_batch_loader
from selfsup.schedules import warmup_cosine
from selfsup.transforms import is_low_res
from selfsup.workers import stop_workers

# Keys that may change when an interrupted compress resumes its recovery: the steps after it
# (quantization, measurement) and how the run is driven; anything else changes the recovery recipe.
RESUMABLE = RUN_KEYS | {
    "quantize",
    "calibrate",
    "latency_batches",
    "latency_repeats",
    "limit",
    "measure_memory",
}
BAR_FIELDS = {"loss": "{loss:.4f}", "lr": "{lr:.2e}", "img_s": "{images_per_s:.0f}"}
ADVICE = "lower recover_lr or use mixed_precision=no"


def train_transform(img_size: int, native_size: int, mean, std) -> T.Compose:
    if is_low_res(native_size):
        crop = [T.Resize(img_size), T.RandomCrop(img_size, padding=img_size // 8)]
    else:
        crop = [T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def recovery_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: CompressConfig,
    teacher: nn.Module | None = None,
) -> ClassifierStep:
    """The core's classifier step in its plain configuration: cross-entropy (and the teacher's soft
    targets), AdamW at ``recover_lr`` warmed up over a tenth of the epochs (at most one), then cosine."""
    peak, epochs = config.recover_lr, config.recover_epochs

    def schedule(progress: float) -> tuple[float, bool]:
        return warmup_cosine(progress, peak, min(1.0, epochs / 10), epochs), False

    distill = Distillation("hinton", config.kd_alpha, config.kd_temperature)
    return ClassifierStep(accelerator, model, optimizer, schedule, teacher=teacher, distill=distill)


@dataclass
class Recovery:
    status: str  # "finished" | "interrupted"
    step: int
    total_steps: int
    signal: int | None = None


def run_settings(config: CompressConfig) -> RunSettings:
    return RunSettings.of(config, out=f"{config.out}/recovery", epochs=config.recover_epochs)


def _check_batch(config: CompressConfig, train_set) -> None:
    if config.batch_size > len(train_set):
        raise UsageError(
            f"batch_size={config.batch_size} is larger than the training set ({len(train_set)} images): "
            "lower batch_size"
        )


def check_recovery(
    config: CompressConfig, train_set, data: dict, accelerator: Accelerator | None = None
) -> None:
    """Every refusal of the recovery run, raised before anything is written (compress calls it before
    its first file): a batch larger than the training set, and a checkpoint in ``OUT/recovery`` that
    ``resume`` would continue under another recipe, other ``data`` facts or other training images. With
    ``accelerator``, the main process picks the checkpoint and the others check that one."""
    _check_batch(config, train_set)
    resume_point(
        run_settings(config), config, data, RESUMABLE, tuple(data), train_set, accelerator=accelerator
    )


def recover(
    accelerator: Accelerator,
    model: nn.Module,
    train_set,
    transform,
    config: CompressConfig,
    data: dict,
    teacher: nn.Module | None = None,
) -> Recovery:
    """Train ``model`` in place (continuing ``OUT/recovery``'s last checkpoint under ``resume=auto``).

    ``data``: facts of the run a resume must share (class names, the pruned shapes), kept in the
    checkpoint and compared on resume.
    """
    _check_batch(config, train_set)
    loader, sampler = global_batch_loader(
        SeededImages(train_set, transform),
        config.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        config.seed,
        config.num_workers,
        accelerator.device,
    )

    def batches(epoch: int, first_step: int):
        sampler.set_position(epoch, first_step)
        return loader

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.recover_lr, weight_decay=0.05)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    run = TrainingRun(
        accelerator,
        run_settings(config),
        sampler.steps_per_epoch(),
        stage="compress",
        resumable=RESUMABLE,
        images_per_step=config.batch_size,
        bar_fields=BAR_FIELDS,
        advice=ADVICE,
    )
    run.start(config, data, same_data=tuple(data), dataset=train_set)
    step = recovery_step(accelerator, prepared, optimizer, config, teacher)
    prepared.train()
    try:
        with run:
            status = run.steps(step, batches)
    finally:
        stop_workers(loader)
    released(accelerator, prepared).eval()  # `model` again, its forward fp32 for export and measurement
    return Recovery(status, run.position.step, run.end, run.signal)
