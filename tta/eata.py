"""ETA and EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting").

Tent's entropy step on the norms' affine parameters, restricted to reliable, non-redundant samples:
keep samples whose entropy is below E0 = 0.4 ln C; of those, drop the ones whose prediction is too
similar (|cosine| >= ``d_margin``) to an exponential average (0.9) of past mean predictions; weight
each kept sample's entropy by 1 / exp(E - E0). EATA adds an anti-forgetting term,
alpha * sum F (theta - theta0)^2, with F the diagonal Fisher information of the adapted parameters,
estimated on clean images with the model's own predictions as labels. Facts from the reference
implementation (mr-eggplant/EATA): E0 coefficient 0.4, d_margin 0.05 (ImageNet; 0.4 for CIFAR-10),
alpha 2000, Fisher from 2,000 clean samples, each batch's squared gradient averaged over batches;
no step when no sample survives the filters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.tta.adapter import (
    Adapter,
    adapted_norms,
    entropy_margin,
    num_classes_of,
    softmax_entropy,
)


def fisher_information(
    model: nn.Module, params: list[nn.Parameter], clean_batches: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """Diagonal Fisher of ``params``: the mean over batches of the squared gradient of the
    cross-entropy against the model's own predicted labels (EATA's estimate)."""
    fishers = [torch.zeros_like(p) for p in params]
    for p in params:
        p.requires_grad_(True)
    count = 0
    with torch.enable_grad():
        for images in clean_batches:
            logits = model(images)  # in test-time mode: no backbone term recorded (see Adapter.forward)
            loss = F.cross_entropy(logits, logits.argmax(1))
            grads = torch.autograd.grad(loss, params)
            for f, g in zip(fishers, grads):
                f += g.detach() ** 2
            count += 1
    if count == 0:
        raise ValueError("EATA's Fisher information needs at least one batch of clean images")
    return [f / count for f in fishers]


class EATA(Adapter):
    """``fishers=None`` is ETA (no anti-forgetting term)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        e_margin_coeff: float = 0.4,
        d_margin: float = 0.05,
        fisher_alpha: float = 2000.0,
        clean_batches: Iterable[torch.Tensor] | None = None,
        momentum: float = 0.9,
    ):
        params = adapted_norms(model)
        self.e_margin = entropy_margin(num_classes_of(model), e_margin_coeff)
        self.d_margin, self.fisher_alpha = d_margin, fisher_alpha
        self.fishers = self.anchors = None
        if clean_batches is not None:
            self.fishers = fisher_information(model, params, clean_batches)
            self.anchors = [p.detach().clone() for p in params]
        self.name = "eata" if self.fishers is not None else "eta"
        super().__init__(model, params, torch.optim.SGD(params, lr=lr, momentum=momentum))
        self.mean_probs: torch.Tensor | None = None  # EMA of the kept samples' mean prediction
        self.kept = self.seen = 0  # samples that took part in a step, samples seen

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the reliable and non-redundant samples, and the probabilities of those."""
        entropy = softmax_entropy(logits).detach()
        reliable = torch.nonzero(entropy < self.e_margin).flatten()
        probs = logits[reliable].detach().softmax(1)
        if self.mean_probs is not None and len(reliable):
            similarity = F.cosine_similarity(self.mean_probs.unsqueeze(0), probs, dim=1)
            keep = torch.nonzero(similarity.abs() < self.d_margin).flatten()
            reliable, probs = reliable[keep], probs[keep]
        return reliable, probs

    def _update_mean_probs(self, probs: torch.Tensor) -> None:
        if len(probs) == 0:
            return
        mean = probs.mean(0)
        self.mean_probs = mean if self.mean_probs is None else 0.9 * self.mean_probs + 0.1 * mean

    def anti_forgetting(self) -> torch.Tensor:
        return self.fisher_alpha * sum(
            (f * (p - a) ** 2).sum() for f, p, a in zip(self.fishers, self.params, self.anchors)
        )

    @torch.enable_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.forward(images)
        kept, probs = self.select(logits)
        self.seen += len(images)
        self.kept += len(kept)
        self._update_mean_probs(probs)
        if len(kept):
            entropy = softmax_entropy(logits[kept])
            loss = (entropy * torch.exp(self.e_margin - entropy.detach())).mean()
            if self.fishers is not None:
                loss = loss + self.anti_forgetting()
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(loss)
            self.optimizer.step()
        return logits.detach()

    # reset() restores weights and optimizer only: the mean-prediction EMA carries over, as in the
    # reference (its reset between corruptions keeps ``current_model_probs``)
