"""The supervised classification step, shared by fine-tuning and compression's recovery training.

Per step, as MAE's ``engine_finetune.py`` and DeiT's ``train_one_epoch``: lr from the fractional
epoch, mixup/cutmix, forward, loss (the criterion, plus a backbone's auxiliary loss, plus the
teacher's term when distilling), backward in ``accum_steps`` passes, then, only for a finite loss,
the head-only rule, clipping, the optimizer step and the EMA update. The core loop
(:class:`selfsup.loop.TrainingRun`) drives it through the ``Step`` protocol: :meth:`forward`
computes the loss and its gradients, :meth:`update` applies them.

Fine-tuning configures everything (layer-decayed AdamW groups, LP-FT's head epochs, mixup, label
smoothing, EMA, DeiT or Hinton distillation); recovery is the plain configuration (cross-entropy, an
optional Hinton teacher, no clipping, no EMA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from selfsup.backbones.hooks import auxiliary_losses, set_training_progress
from selfsup.checkpoint import HEAD_PREFIXES
from selfsup.distill import distillation_loss
from selfsup.schedules import apply_lr


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


@dataclass(frozen=True)
class Distillation:
    """A teacher's term: ``hinton`` (soft targets, mixed by ``alpha``) or ``deit`` (hard labels on the
    student's distillation head); see :mod:`selfsup.distill`."""

    kind: str = "hinton"
    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class ClassifierStep:
    """One optimizer step of a classifier. ``schedule(progress) -> (lr, head_only)``: the lr at the
    fractional epoch and whether only the head trains then (LP-FT's linear-probe epochs)."""

    accelerator: Accelerator
    model: nn.Module  # prepared
    optimizer: torch.optim.Optimizer
    schedule: Callable[[float], tuple[float, bool]]
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    mixup: Callable | None = None
    teacher: nn.Module | None = None
    distill: Distillation = Distillation()
    ema: nn.Module | None = None  # timm's ModelEmaV3
    accum_steps: int = 1
    clip_grad: float | None = None
    steps_per_epoch: int = 1
    head_only: bool = False
    step_index: int = 0

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with auxiliary_losses(self.accelerator.unwrap_model(self.model)) as aux:
            out = self.model(images)
            extra = aux.total()  # e.g. SkipNet's compute penalty
        heads = out if isinstance(out, tuple) else (out,)  # a distilled DeiT: class and distillation head
        tasks = [self.criterion(head, targets) for head in heads]
        if extra is not None:
            tasks = [task + extra for task in tasks]
        if self.teacher is None:
            return sum(tasks) / len(heads)
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(images).float()
        return self._distilled(heads, tasks, teacher_logits)

    def _distilled(self, heads, tasks, teacher_logits: torch.Tensor) -> torch.Tensor:
        d = self.distill
        if d.kind == "deit":  # the class head learns the labels, the distillation head the teacher's argmax
            return distillation_loss(
                "deit",
                tasks[0],
                heads[0],
                teacher_logits,
                alpha=d.alpha,
                temperature=d.temperature,
                dist_logits=heads[1],
            )
        # hinton: every head learns from the labels and the teacher's soft targets
        return sum(
            distillation_loss("hinton", task, head, teacher_logits, alpha=d.alpha, temperature=d.temperature)
            for head, task in zip(heads, tasks)
        ) / len(heads)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor], progress: float):
        lr, self.head_only = self.schedule(progress)
        self.step_index = round(progress * self.steps_per_epoch)
        set_training_progress(
            self.accelerator.unwrap_model(self.model), progress
        )  # e.g. DynamicConv's temperature
        apply_lr(self.optimizer, lr)
        device = self.accelerator.device
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        self.optimizer.zero_grad(set_to_none=True)  # also drops the gradients of a skipped NaN step
        passes = self.accum_steps
        losses = []
        for i, (x, y) in enumerate(zip(images.chunk(passes), labels.chunk(passes))):
            sync = i == passes - 1  # all-reduce the gradients once, after the last pass
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                loss = self.loss(x, y)
                self.accelerator.backward(loss / passes)
            losses.append(loss.detach().float())
        return torch.stack(losses).mean(), {"lr": lr, "head_only": self.head_only}

    def update(self, loss: torch.Tensor) -> None:
        net = self.accelerator.unwrap_model(self.model)
        if self.head_only:
            for name, p in net.named_parameters():
                if not is_head(name):
                    p.grad = None  # AdamW leaves a parameter without gradient untouched (no decay either)
        if self.clip_grad is not None:
            self.accelerator.clip_grad_norm_(net.parameters(), self.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(net, step=self.step_index)
