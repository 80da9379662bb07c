"""Knowledge-distillation losses, shared by fine-tuning and compression's recovery training.

* Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network": the student matches
  the teacher's softened distribution, KL(p_T || p_S) at temperature T, scaled by T² so its
  gradients keep their size as T changes, mixed with the task loss: (1 − α)·task + α·T²·KL.
* Touvron et al. (2021), DeiT, "hard-label distillation": a distilled student has a second
  (distillation-token) head trained on the teacher's argmax; loss = ½·task(cls head) + ½·CE(dist
  head, argmax teacher). timm's ``deit_*_distilled`` models return both heads in training mode.

timm ships DeiT's models but not its ``DistillationLoss`` (that lives in the DeiT repository), so the
two formulas are written here; each is tested against a direct computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation term: cross-entropy of the distillation head against the teacher's argmax."""
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))


def distillation_loss(
    kind: str,
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    dist_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss with a teacher: ``hinton`` mixes by ``alpha``; ``deit`` halves task and
    hard distillation (``dist_logits`` from the student's distillation head)."""
    if kind == "hinton":
        return (1 - alpha) * task_loss + alpha * hinton_kd(student_logits, teacher_logits, temperature)
    if kind == "deit":
        if dist_logits is None:
            raise ValueError("DeiT distillation needs the student's distillation-head logits")
        return 0.5 * task_loss + 0.5 * hard_distillation(dist_logits, teacher_logits)
    raise ValueError(f"unknown distillation kind {kind!r}")
