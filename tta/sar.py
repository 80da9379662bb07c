"""SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World").

Entropy minimisation made stable for small and mixed batches: only reliable samples (entropy below
E0 = 0.4 ln C) take part, before and after a sharpness-aware (SAM) perturbation of radius rho = 0.05
around an SGD step with momentum 0.9; the norms of the last blocks and the final norm are left alone;
and when an exponential average (0.9) of the post-perturbation loss falls below 0.2 the model has
collapsed onto confident predictions and is put back to its original state. Facts from the reference
implementation (mr-eggplant/SAR); the blocks left alone are derived from the depth (the reference's
ViT-B skips blocks 9-11 of 12: the last quarter), not written out.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.tta.adapter import (
    Adapter,
    adapted_norms,
    entropy_margin,
    num_classes_of,
    softmax_entropy,
)


def frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The modules SAR does not adapt: the last quarter of a ViT's blocks (the last stage of a
    ResNet) and the final norm (``norm``/``fc_norm``)."""
    skip = ["norm.", "fc_norm."]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        depth = len(blocks)
        skip += [f"blocks.{i}." for i in range(depth - depth // 4, depth)]
    elif hasattr(model, "layer4"):
        skip.append("layer4.")
    return tuple(skip)


class SAM:
    """Sharpness-aware minimisation around a base optimizer (Foret et al., ICLR 2021): climb to
    w + rho g/||g||, take the gradient there, step from w. Written here because none of the project's
    libraries (torch, timm) ships it; two calls, as the reference's ``first_step``/``second_step``."""

    def __init__(self, params: list[nn.Parameter], base: torch.optim.Optimizer, rho: float = 0.05):
        self.params, self.base, self.rho = params, base, rho
        self._offsets: list[torch.Tensor | None] = []

    @torch.no_grad()
    def ascend(self) -> None:
        grads = [p.grad for p in self.params]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads if g is not None]), 2)
        scale = self.rho / (norm + 1e-12)
        self._offsets = []
        for p, g in zip(self.params, grads):
            offset = None if g is None else g * scale
            if offset is not None:
                p.add_(offset)
            self._offsets.append(offset)
            p.grad = None

    @torch.no_grad()
    def descend(self) -> None:
        for p, offset in zip(self.params, self._offsets):
            if offset is not None:
                p.sub_(offset)  # back to w; the base optimizer steps with the perturbed gradient
        self.base.step()
        self.base.zero_grad(set_to_none=True)


class SAR(Adapter):
    name = "sar"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        rho: float = 0.05,
        e_margin_coeff: float = 0.4,
        reset_below: float = 0.2,
        momentum: float = 0.9,
    ):
        params = adapted_norms(model, frozen_prefixes(model))
        base = torch.optim.SGD(params, lr=lr, momentum=momentum)
        super().__init__(model, params, base)
        self.sam = SAM(params, base, rho)
        self.e_margin, self.reset_below = entropy_margin(num_classes_of(model), e_margin_coeff), reset_below
        self.loss_ema: float | None = None
        self.recoveries = self.kept = self.seen = 0

    @torch.enable_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.forward(images)
        self.seen += len(images)
        entropy = softmax_entropy(logits)
        reliable = torch.nonzero(entropy.detach() < self.e_margin).flatten()
        if len(reliable) == 0:
            # nothing reliable: no gradient, but the reference still steps, on momentum alone (its
            # mean over no samples back-propagates zeros), and checks for recovery
            for p in self.params:
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._recover_if_collapsed()
            return logits.detach()
        self.backward(entropy[reliable].mean())
        self.sam.ascend()
        second = softmax_entropy(self.forward(images[reliable]))
        still = torch.nonzero(second.detach() < self.e_margin).flatten()
        # none reliable after the perturbation: a zero gradient, so the step is momentum's alone (as
        # the reference, whose mean over no samples back-propagates nothing)
        loss = second[still].mean() if len(still) else second.sum() * 0.0
        if len(still):
            value = float(loss.detach())
            self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        self.backward(loss)
        self.kept += len(still)
        self.sam.descend()
        self._recover_if_collapsed()
        return logits.detach()

    def _recover_if_collapsed(self) -> None:
        """Model recovery: back to the original weights when the loss EMA says the model collapsed
        onto confident predictions. The EMA survives the recovery (as in the reference), so recovery
        repeats until the loss rises again."""
        if self.loss_ema is not None and self.loss_ema < self.reset_below:
            ema = self.loss_ema
            self.reset()
            self.loss_ema = ema
            self.recoveries += 1

    def reset(self) -> None:
        """Before a new corruption (reset protocol): weights, optimizer and loss EMA."""
        super().reset()
        self.loss_ema = None
