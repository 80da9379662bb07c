"""MoCo v3 pretraining: ``train(config) -> PretrainResult``, the MoCo step wired into the core loop.

Per step, as the official ``main_moco.py``: set lr (warm-up + cosine) and momentum (cosine to 1)
from the fractional epoch, forward both views (the momentum encoder moves first), backward, AdamW
or LARS step by the backbone's kind (:class:`MocoStep`, :func:`make_optimizer`). Resume, the save
cadence, SIGTERM/SIGINT saves, the NaN/inf policy and the run log are the shared loop's (:mod:`selfsup.loop`); this module adds the kNN monitor and the
backbone export at the end.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.optim import Lars

from selfsup.accel import released
from selfsup.backbones.hooks import auxiliary_losses, set_training_progress
from selfsup.checkpoint import timm_call
from selfsup.imagefolder import report_corrupt
from selfsup.loop import (
    RunSettings,
    TrainingDiverged,
    TrainingRun,
    disk_errors_as_usage_errors,
    on_main,
    start_process,
)
from selfsup.schedules import apply_lr, scaled_lr, warmup_cosine
from selfsup.ssl.builder import MoCoV3, build_model
from selfsup.ssl.export import export_backbone, export_latest
from selfsup.ssl.monitor import KnnMonitor
from selfsup.ssl.pipeline import Pipeline, build_pipeline, data_options
from selfsup.ssl.released import write_run
from selfsup.ssl.schedules import moco_momentum
from selfsup.ssl.settings import RESUMABLE_CHANGES, PretrainConfig
from selfsup.ssl.syncbn import convert_batchnorm

__all__ = ["MocoStep", "PretrainResult", "TrainingDiverged", "train"]

BAR_FIELDS = {
    "loss": "{loss:.4f}",
    "lr": "{lr:.2e}",
    "m": "{momentum:.4f}",
    "img_s": "{images_per_s:.0f}",
    "data": "{data_s:.3f}s",
}
DIVERGENCE_ADVICE = "lower optim.base_lr, set optim.clip_grad or use mixed_precision=no"


@dataclass
class PretrainResult:
    status: str  # "finished" | "interrupted" | "exported" | "imported"
    out: Path
    step: int
    total_steps: int
    backbone: Path | None = None
    last_loss: float | None = None
    nan_skipped: int = 0
    signal: int | None = None
    monitor: list[dict[str, Any]] = field(default_factory=list)
    timm_call: str = ""  # how stock timm rebuilds the exported backbone


@dataclass
class MocoStep:
    """One iteration of ``main_moco.py``: lr and m from the fractional epoch, loss and its backward
    (:meth:`forward`), then clipping and the optimizer step (:meth:`update`, when the loss is finite)."""

    config: PretrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # the prepared MoCoV3 (DDP-wrapped with W processes)
    optimizer: torch.optim.Optimizer
    # (batch, device) -> (x1, x2): the batched views' device ops (augment.backend=batched); None: move only
    to_device: Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor], progress: float):
        c, o = self.config, self.config.optim
        lr = warmup_cosine(progress, scaled_lr(o.base_lr, c.batch_size), o.warmup_epochs, c.epochs)
        m = moco_momentum(progress, c.moco.momentum, c.epochs, c.moco.momentum_cosine)
        apply_lr(self.optimizer, lr)
        if self.to_device is not None:
            x1, x2 = self.to_device(batch, self.accelerator.device)
        else:
            x1, x2 = (x.to(self.accelerator.device, non_blocking=True) for x in batch)
        moco = self.accelerator.unwrap_model(self.model)
        set_training_progress(moco, progress)  # schedules inside a backbone (DynamicConv's temperature)
        self.optimizer.zero_grad(set_to_none=True)  # also drops the gradients of a skipped NaN step
        with auxiliary_losses(moco) as aux:
            loss = self.model(x1, x2, m)
            extra = aux.total()  # a backbone's own term (SkipNet's compute penalty)
        loss = loss if extra is None else loss + extra
        self.accelerator.backward(loss)
        return loss.detach(), {"lr": lr, "momentum": m}

    def update(self, loss: torch.Tensor) -> None:
        if self.config.optim.clip_grad is not None:
            moco = self.accelerator.unwrap_model(self.model)
            self.accelerator.clip_grad_norm_(moco.parameters(), self.config.optim.clip_grad)
        self.optimizer.step()


def train(config: PretrainConfig) -> PretrainResult:
    """Run (or continue) the pretraining ``config`` describes; see the module docstring.

    A disk error the user can fix is one :class:`~selfsup.errors.UsageError` line naming the last
    good checkpoint (:func:`selfsup.loop.disk_errors_as_usage_errors`).
    """
    with disk_errors_as_usage_errors(config.out):
        if config.export_only:
            return PretrainResult("exported", Path(config.out), 0, 0, backbone=export_latest(config))
        if config.import_run:  # a released MoCo v3 run as out's first checkpoint (selfsup.ssl.released)
            _, step, total = write_run(config, make_optimizer)
            return PretrainResult("imported", Path(config.out), step, total)
        accelerator = start_process(config)
        model = build_model(config)  # first: it resolves the recipe of the backbone's kind
        pipeline = build_pipeline(
            config, accelerator.process_index, accelerator.num_processes, accelerator.device
        )
        # Every exit path (error, divergence, signal, success) stops the DataLoader workers: they
        # ignore SIGTERM (see selfsup.workers), so a process left waiting for them would never exit.
        with contextlib.closing(pipeline):
            return _run(config, accelerator, pipeline, model)


def make_optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """The official optimizers (``main_moco.py``): AdamW with weight decay on every trainable parameter
    (ViTs), or LARS with weight decay and trust-ratio adaptation only for weights of 2+ dimensions
    (convolutional backbones; biases and norms get plain momentum SGD). timm's ``Lars`` forms the trust
    ratio as 0.001·‖w‖ / (‖g‖ + wd·‖w‖) where the official code uses ‖g + wd·w‖ in the denominator:
    equal when g and w are aligned, and at wd = 1e-6 the two differ by at most wd·‖w‖/‖g‖."""
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=o.betas, weight_decay=o.weight_decay)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},  # no wd: no adaptation either
    ]
    return Lars(groups, lr=0.0, momentum=o.momentum, trust_coeff=0.001)


def _run(
    config: PretrainConfig, accelerator: Accelerator, pipeline: Pipeline, model: MoCoV3
) -> PretrainResult:
    if accelerator.num_processes > 1:
        model = convert_batchnorm(model, accelerator.device)
    optimizer = make_optimizer(model, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = TrainingRun(
        accelerator,
        RunSettings.of(config),
        pipeline.steps_per_epoch,
        stage="pretrain",
        resumable=RESUMABLE_CHANGES,
        images_per_step=config.batch_size,
        bar_fields=BAR_FIELDS,
        advice=DIVERGENCE_ADVICE,
    )
    checkpoint = run.start(config, pipeline.facts(), dataset=pipeline.dataset)
    if checkpoint is not None and not pipeline.indexed and accelerator.is_main_process:
        print(
            f"warning: resuming a stream of shards at step {run.position.step}: the stream restarts from the "
            "start of its shards instead of skipping the samples already seen (see docs/data.md)",
            file=sys.stderr,
        )
    result = PretrainResult("finished", Path(config.out), run.position.step, run.end)
    backbone = accelerator.unwrap_model(model).backbone
    monitoring = Monitoring(
        config, accelerator, run, result, _monitor(config, pipeline, accelerator), backbone
    )
    model.train()
    with run:
        step = MocoStep(config, accelerator, model, optimizer, pipeline.to_device)
        result.status = run.steps(step, pipeline.batches, monitoring.at_epoch)
        if result.status == "finished":

            def export() -> None:  # main process only; a failure there stops every process
                backbone = released(accelerator, model).backbone
                result.backbone = export_backbone(backbone, config, run.position.data)
                result.timm_call = timm_call(result.backbone)
                if pipeline.indexed:
                    report_corrupt(pipeline.dataset)

            on_main(accelerator, export)
    result.step, result.nan_skipped = run.position.step, run.position.nan_skipped
    result.signal, result.last_loss = run.signal, run.last_loss
    return result


def _monitor(config: PretrainConfig, pipeline: Pipeline, accelerator: Accelerator) -> KnnMonitor | None:
    """The kNN monitor of the main process, when asked for and the data is an indexed, labelled set."""
    if config.monitor_every <= 0 or not accelerator.is_main_process:
        return None
    if not pipeline.indexed:
        print(
            "note: the kNN monitor is off for a stream of shards (it needs an indexed, labelled set); "
            "evaluate exported checkpoints with probe instead",
            file=sys.stderr,
        )
        return None
    return KnnMonitor(
        config.dataset,
        data_options(config),
        config.model.img_size,
        config.monitor_train_size,
        config.monitor_val_size,
        config.monitor_k,
    )


@dataclass
class Monitoring:
    """The epoch hook: the kNN accuracy of the backbone every ``monitor_every`` epochs (and before a fresh
    run's first step with ``monitor_at_start``), logged as an event; collective (every process waits)."""

    config: PretrainConfig
    accelerator: Accelerator
    run: TrainingRun
    result: PretrainResult
    monitor: KnnMonitor | None
    backbone: torch.nn.Module  # the training model's, evaluated as it is now

    def at_epoch(self, epoch: int) -> None:  # 0: before a fresh run's first step; e: after epoch e
        config = self.config
        due = (
            config.monitor_at_start
            if epoch == 0
            else config.monitor_every and epoch % config.monitor_every == 0
        )
        if not due:
            return
        if self.monitor is not None:
            top1 = self.monitor(self.backbone, self.accelerator.device)
            record = {
                "event": "monitor",
                "epoch": epoch,
                "at_step": self.run.position.step,
                f"knn_top1_k{config.monitor_k}": top1,
            }
            self.result.monitor.append(record)
            self.run.log.event(record)
        self.accelerator.wait_for_everyone()
