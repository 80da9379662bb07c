"""Fine-tuning: ``train(config) -> FinetuneResult``, the core's classifier step wired into the core loop.

The step (:class:`selfsup.classifier.ClassifierStep`, as MAE's ``engine_finetune.py`` and DeiT's
``train_one_epoch``) is configured here: lr from the fractional epoch (warm-up + cosine to
``min_lr``, times each layer-decay group's ``lr_scale``; LP-FT's head-only epochs first), mixup/cutmix,
soft-target or label-smoothed cross-entropy, the teacher's term when distilling, ``accum_steps``
passes, clipping, EMA. Resume, the save cadence, SIGTERM/SIGINT saves, the NaN/inf policy and the
run log are the core loop's (:mod:`selfsup.loop`). Validation after every ``eval_every`` epochs and
at the end; the best and the last classifier are exported as project checkpoints that stock timm
loads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from selfsup.accel import released
from selfsup.checkpoint import CheckpointMeta, inherited_source, save_checkpoint, source_line, timm_call
from selfsup.classifier import ClassifierStep, Distillation
from selfsup.config import to_dict
from selfsup.finetune.model import (
    Start,
    Teacher,
    build_start,
    low_res_note,
    uses_distillation_token,
    warn_teacher_kind,
)
from selfsup.finetune.pipeline import Pipeline, build_pipeline, load_training_data
from selfsup.finetune.settings import RESUMABLE_CHANGES, FinetuneConfig
from selfsup.finetune.validation import Evaluation, append_metrics, evaluate, write_report
from selfsup.imagefolder import report_corrupt
from selfsup.loop import (
    RunSettings,
    TrainingDiverged,
    TrainingRun,
    disk_errors_as_usage_errors,
    on_main,
    start_process,
)
from selfsup.models import is_vit
from selfsup.runstate import truncate_log
from selfsup.schedules import scaled_lr, warmup_cosine
from selfsup.transforms import eval_crop_pct, is_low_res

__all__ = ["FinetuneResult", "TrainingDiverged", "finetune_step", "train"]

BAR_FIELDS = {"loss": "{loss:.4f}", "lr": "{lr:.2e}", "img_s": "{images_per_s:.0f}"}
DIVERGENCE_ADVICE = "lower optim.base_lr, set optim.clip_grad (e.g. 1.0) or use mixed_precision=no"


@dataclass
class FinetuneResult:
    status: str  # "finished" | "interrupted"
    out: Path
    step: int
    total_steps: int
    best: Path | None = None
    last: Path | None = None
    best_top1: float | None = None
    last_top1: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    nan_skipped: int = 0
    signal: int | None = None
    timm_call: str = ""


def param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-D parameters and the model's ``no_weight_decay()`` names
    (position embedding, tokens); with ``layer_decay``, one group per depth carrying ``lr_scale``."""
    o = config.optim
    skip = set(getattr(model, "no_weight_decay", set)())
    if o.layer_decay is not None:
        return param_groups_layer_decay(model, o.weight_decay, skip, layer_decay=o.layer_decay)
    return param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=skip)


def lr_at(config: FinetuneConfig, progress: float) -> tuple[float, bool]:
    """(lr, head only) at fractional epoch ``progress``: LP-FT trains the head alone for
    ``lp_epochs`` (cosine over them), then everything (warm-up + cosine over the rest)."""
    o, peak = config.optim, scaled_lr(config.optim.base_lr, config.batch_size, reference=512)
    lp = config.lp_epochs
    if progress < lp:
        return warmup_cosine(progress, peak, 0.0, lp, o.min_lr), True
    return warmup_cosine(progress - lp, peak, o.warmup_epochs, config.epochs - lp, o.min_lr), False


def finetune_step(
    config: FinetuneConfig,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    mixup: Mixup | None,
    criterion: nn.Module,
    teacher: Teacher | None = None,
    ema: ModelEmaV3 | None = None,
    steps_per_epoch: int = 1,
) -> ClassifierStep:
    """The core's classifier step configured by ``config``: its schedule (:func:`lr_at`), accumulation,
    clipping and distillation."""
    o, d = config.optim, config.distill
    return ClassifierStep(
        accelerator,
        model,
        optimizer,
        functools.partial(lr_at, config),
        criterion,
        mixup,
        teacher,
        Distillation(d.kind, d.alpha, d.temperature),
        ema,
        o.accum_steps,
        o.clip_grad,
        steps_per_epoch,
    )


def _criterion(config: FinetuneConfig) -> nn.Module:
    if config.mixes:
        return SoftTargetCrossEntropy()  # mixup builds the smoothed soft targets
    if config.augment.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(config.augment.label_smoothing)
    return nn.CrossEntropyLoss()


def _mixup(config: FinetuneConfig, num_classes: int) -> Mixup | None:
    a = config.augment
    if not config.mixes:
        return None
    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mixup_prob,
        switch_prob=a.mixup_switch_prob,
        label_smoothing=a.label_smoothing,
        num_classes=num_classes,
    )


def train(config: FinetuneConfig) -> FinetuneResult:
    """Run (or continue) the fine-tuning ``config`` describes; see the module docstring."""
    config.check_start()
    with disk_errors_as_usage_errors(config.out):
        # `accelerate launch` (and torchrun) set WORLD_SIZE: the batch checks need no process group
        data = load_training_data(config, world=int(os.environ.get("WORLD_SIZE", "1")))
        info = data[1]
        start = build_start(config, info)
        teacher = None
        if config.distill.teacher is not None:
            warn_teacher_kind(start.model, config.distill.kind)
            teacher = Teacher(config.distill.teacher, info, start.mean, start.std, start.spec.img_size)
        accelerator = start_process(config)
        pipeline = build_pipeline(
            config,
            start.spec.img_size,
            start.mean,
            start.std,
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
            data,
        )
        with contextlib.closing(pipeline):
            return _run(config, accelerator, pipeline, start, teacher)


def _facts(config: FinetuneConfig, start: Start, pipeline: Pipeline) -> list[str]:
    spec = start.spec
    facts = [
        f"Start: {start.description}. Dataset {pipeline.info.name}: {pipeline.train_size} training and "
        f"{pipeline.val_size} validation images, {pipeline.info.num_classes} classes.",
        f"Model {spec.arch} at {spec.img_size} px"
        + (f", patch {spec.patch_size}" if spec.patch_size else "")
        + f"; {config.epochs} epochs, global batch {config.batch_size}, precision {config.mixed_precision}.",
    ]
    if is_low_res(spec.img_size) and is_vit(start.model):  # patches are a ViT matter
        facts.append(f"**{low_res_note(spec.img_size, spec.patch_size)}.**")
    if config.distill.teacher:
        facts.append(f"Distilled from {config.distill.teacher} ({config.distill.kind}).")
    if line := source_line(inherited_source(config.checkpoint, start.parent_sha256)):
        facts.append(line)  # weights imported from a released file
    return facts


def _run(
    config: FinetuneConfig,
    accelerator: Accelerator,
    pipeline: Pipeline,
    start: Start,
    teacher: Teacher | None,
) -> FinetuneResult:
    model, optimizer, ema = _prepare(config, accelerator, pipeline, start)
    if teacher is not None:
        teacher.to(accelerator.device)
    run = _training_run(config, accelerator, pipeline, ema)
    state = FinetuneRun(config, accelerator, pipeline, start, model, ema, run)
    model.train()
    with run:
        step = finetune_step(
            config,
            accelerator,
            model,
            optimizer,
            _mixup(config, pipeline.info.num_classes),
            _criterion(config),
            teacher,
            ema,
            pipeline.steps_per_epoch,
        )
        state.result.status = run.steps(step, pipeline.batches, state.at_epoch)
        if state.result.status == "finished":
            state.finish()
    return state.summary()


def _prepare(config: FinetuneConfig, accelerator: Accelerator, pipeline: Pipeline, start: Start):
    """(prepared model, optimizer, EMA or None); the validation loader is prepared in place."""
    model = start.model
    if uses_distillation_token(model):
        model.set_distilled_training(True)  # training returns both heads; evaluation their mean
    if accelerator.is_main_process and is_low_res(start.spec.img_size) and is_vit(model):
        print(f"note: {low_res_note(start.spec.img_size, start.spec.patch_size)}", file=sys.stderr)
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=0.0, betas=config.optim.betas)
    model, optimizer, pipeline.val = accelerator.prepare(model, optimizer, pipeline.val)
    # Drop path and mixup draw per process from seed + rank (as DeiT); the data is seeded per sample.
    set_seed(config.seed + accelerator.process_index)
    if config.ema_decay is None:
        return model, optimizer, None
    # timm's warm-up (decay 1 - (1 + step)^-3/4 up to ema_decay) keeps the EMA of a short run
    # from staying near the initial weights and the fresh head
    ema = ModelEmaV3(
        accelerator.unwrap_model(model), decay=config.ema_decay, use_warmup=True, device=accelerator.device
    )
    return model, optimizer, ema


def _training_run(
    config: FinetuneConfig, accelerator: Accelerator, pipeline: Pipeline, ema: ModelEmaV3 | None
) -> TrainingRun:
    """The core loop for this run, started (resumed under ``resume=auto``)."""
    run = TrainingRun(
        accelerator,
        RunSettings.of(config),
        pipeline.steps_per_epoch,
        stage="finetune",
        resumable=RESUMABLE_CHANGES,
        images_per_step=config.batch_size,
        bar_fields=BAR_FIELDS,
        advice=DIVERGENCE_ADVICE,
        modules={"ema": ema},  # saved as ema.safetensors: never pickled
    )
    info = pipeline.info
    run.start(
        config,
        {"dataset": info.name, "classes": list(info.classes), "best_top1": None, "last_top1": None},
        same_data=("classes",),  # an image folder whose classes changed cannot continue this head
        dataset=pipeline.train.dataset,
    )
    return run


@dataclass
class FinetuneRun:
    """One fine-tuning run's state and its evaluation, export and report steps.

    Best and last: ``run.position.data`` holds ``best_top1`` / ``last_top1`` / ``evaluated_at`` across
    resumes (checkpointed); ``evaluations`` holds the :class:`Evaluation` objects this process
    computed, "best" only if an evaluation in this process's life beat the stored best (else the
    best classifier was exported before a resume, and the report uses "last").
    """

    config: FinetuneConfig
    accelerator: Accelerator
    pipeline: Pipeline
    start: Start
    model: nn.Module  # prepared
    ema: ModelEmaV3 | None
    run: TrainingRun
    evaluations: dict[str, Evaluation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.config.out)
        self.metrics_path = self.out / "metrics.jsonl"
        self.net = self.accelerator.unwrap_model(self.model)
        self.val_loader = self.pipeline.val  # the prepared loader owns the workers that close() stops
        # collective: a refusal (a corrupt log line) stops every process, not the main one alone
        on_main(self.accelerator, lambda: truncate_log(self.metrics_path, self.run.position.step))
        self.result = FinetuneResult("finished", self.out, self.run.position.step, self.run.end)

    def export(self, name: str, weights: nn.Module) -> Path:
        start, info = self.start, self.pipeline.info
        meta = CheckpointMeta(
            backbone=start.spec.to_dict(),
            img_size=start.spec.img_size,
            mean=start.mean,
            std=start.std,
            stage="finetune",
            num_classes=info.num_classes,
            class_names=list(info.classes),
            config=to_dict(self.config),
            parent_sha256=start.parent_sha256,
            source=inherited_source(self.config.checkpoint, start.parent_sha256),  # an imported file
        )
        crop = eval_crop_pct(start.spec.img_size, info.image_size)  # the crop validation used
        return save_checkpoint(self.out / name, weights.state_dict(), meta, weights, crop_pct=crop)

    def at_epoch(self, epoch: int) -> None:
        if epoch > 0 and (epoch % self.config.eval_every == 0 or epoch == self.config.epochs):
            self.validate(epoch)

    def validate(self, epoch: float) -> None:
        """Evaluate (and the EMA), log, update best/last, and on the main process append the metrics
        and export the classifier if it is the new best."""
        current = evaluate(self.accelerator, self.model, self.val_loader)
        record = {
            "event": "eval",
            "epoch": round(epoch, 4),
            "at_step": self.run.position.step,
            **current.summary(),
        }
        if self.ema is not None:
            record.update(evaluate(self.accelerator, self.ema.module, self.val_loader).summary("ema_"))
        self.run.log.event(record)
        self.result.history.append(record)
        data = self.run.position.data
        improved = data.get("best_top1") is None or current.top1 > data["best_top1"]
        self.evaluations["last"] = current
        data["last_top1"], data["evaluated_at"] = current.top1, self.run.position.step
        if improved:
            data["best_top1"] = current.top1
            self.evaluations["best"] = current

        def write() -> None:
            append_metrics(self.metrics_path, record)
            if improved:
                self.export("best", self.net)

        on_main(self.accelerator, write)

    def finish(self) -> None:
        """The last evaluation (a run ended by max_steps mid-epoch), then the exports and the report."""
        run = self.run
        if run.position.data.get("evaluated_at") != run.position.step:
            self.validate(run.position.step / self.pipeline.steps_per_epoch)  # max_steps ended mid-epoch
            run.save()  # the final checkpoint records it: a rerun does not evaluate again
        if not self.evaluations:  # resumed from the final checkpoint: evaluated before, not recorded again
            self.evaluations["last"] = evaluate(self.accelerator, self.model, self.val_loader)
        on_main(self.accelerator, self._write_outputs)

    def _write_outputs(self) -> None:
        result, info = self.result, self.pipeline.info
        result.last = self.export("last", released(self.accelerator, self.model))
        if self.ema is not None:
            self.export("ema", released(self.accelerator, self.ema.module))
        # resumed from another run's checkpoint into a new out=, no evaluation may have beaten the
        # stored best: that classifier is in the other folder
        best = self.out / "best.safetensors"
        result.best = best if best.is_file() else None
        result.timm_call = timm_call(result.best or result.last)
        which = "best" if "best" in self.evaluations else "last"  # see the class docstring
        write_report(
            self.out,
            f"Fine-tuning report: {info.name}",
            _facts(self.config, self.start, self.pipeline),
            _read_history(self.metrics_path),
            self.evaluations[which],
            which,
            list(info.classes),
        )
        report_corrupt(self.pipeline.train.dataset.dataset)

    def summary(self) -> FinetuneResult:
        result, position = self.result, self.run.position
        result.step, result.nan_skipped, result.signal = position.step, position.nan_skipped, self.run.signal
        result.best_top1 = position.data.get("best_top1")
        result.last_top1 = position.data.get("last_top1")
        return result


def _read_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
