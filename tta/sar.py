"""SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World").

Entropy minimisation made stable for small and mixed batches: only reliable samples (entropy below
E0 = 0.4 ln C) take part, before and after a sharpness-aware (SAM) perturbation of radius rho = 0.05
around an SGD step with momentum 0.9; the norms of the last blocks and the final norm are left alone;
and when an exponential average (0.9) of the post-perturbation loss falls below 0.2 the model has
collapsed onto confident predictions and its weights are put back (the SGD momentum stays). Facts from
the reference implementation (mr-eggplant/SAR: sar.py, sam.py, main.py); the blocks left alone are
derived from the depth (the reference's ViT-B skips blocks 9-11 of 12: the last quarter), not written
out. Both forwards see the whole batch, so a BatchNorm model normalizes with the same batch statistics
as the reference's.
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
from selfsup.tta.tent import vit_lr


def sar_lr(lr: float | None, batch_size: int) -> float:
    """SAR's learning rate: ``lr`` when one is given; otherwise the ViT rule (0.001 per 64 images),
    doubled at batch size 1 as the reference does for SAR alone (main.py: ``if args.exp_type == 'bs1'
    and args.method == 'sar': args.lr = 2 * args.lr``, after the per-model rule)."""
    if lr is not None:
        return lr
    return vit_lr(batch_size) * (2 if batch_size == 1 else 1)


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
    libraries (torch, timm) ships it; two calls, as the reference's ``first_step``/``second_step``
    (davda54/sam, non-adaptive): w is kept as a copy and put back exactly, not recomputed."""

    def __init__(self, params: list[nn.Parameter], base: torch.optim.Optimizer, rho: float = 0.05):
        self.params, self.base, self.rho = params, base, rho
        self._origins: list[torch.Tensor | None] = []

    @torch.no_grad()
    def ascend(self) -> None:
        grads = [p.grad for p in self.params]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads if g is not None]), 2)
        scale = self.rho / (norm + 1e-12)
        self._origins = []
        for p, g in zip(self.params, grads):
            self._origins.append(None if g is None else p.detach().clone())
            if g is not None:
                p.add_(g * scale)
            p.grad = None

    @torch.no_grad()
    def descend(self) -> None:
        for p, origin in zip(self.params, self._origins):
            if origin is not None:
                p.copy_(origin)  # back to w; the base optimizer steps with the perturbed gradient
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
        # the whole batch again, then the first filter (the reference's order): a BatchNorm layer
        # normalizes with the statistics of the same images as in the first pass
        second = softmax_entropy(self.forward(images))[reliable]
        still = torch.nonzero(second.detach() < self.e_margin).flatten()
        # none reliable after the perturbation: a zero gradient, so the step is momentum's alone (as
        # the reference, whose mean over no samples back-propagates nothing)
        loss = second[still].mean() if len(still) else second.sum() * 0.0
        if len(still):
            value = float(loss.detach())
            # (1 - 0.9), not 0.1, as the reference writes it: the same float
            self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + (1 - 0.9) * value
        self.backward(loss)
        self.kept += len(still)
        self.sam.descend()
        self._recover_if_collapsed()
        return logits.detach()

    def _recover_if_collapsed(self) -> None:
        """Model recovery: back to the original weights when the loss EMA says the model collapsed
        onto confident predictions. As in the reference: the EMA survives the recovery, so recovery
        repeats until the loss rises again, and so does the SGD momentum (the reference restores the
        model and its SAM wrapper's state, and SAM's state holds no momentum: that is the inner SGD's)."""
        if self.loss_ema is not None and self.loss_ema < self.reset_below:
            self.model.load_state_dict(self._saved[0])
            self.recoveries += 1

    def reset(self) -> None:
        """Before a new corruption (reset protocol): weights, optimizer (momentum included) and loss
        EMA, as the reference's fresh model and optimizer for each corruption."""
        super().reset()
        self.loss_ema = None
