"""Tent (Wang et al., ICLR 2021, "Fully Test-Time Adaptation by Entropy Minimization").

At test time, per batch: predict, and take one optimizer step on the mean prediction entropy of that
same forward pass, updating only the affine parameters of the normalization layers. Facts from the
paper and its reference implementation (DequanWang/tent): SGD with momentum 0.9 (its ImageNet setting;
its CIFAR setting, ``cfgs/tent.yaml``, is Adam, lr 1e-3, betas (0.9, 0.999), no weight decay, batches of
200: ``optimizer="adam"``); BatchNorm layers
normalise with the test batch's statistics (no running averages); the rest of the network stays in
eval mode, so dropout and drop path are off. For ViTs the norms are LayerNorms (their statistics are
per token already); the lr rule for ViTs, (0.001 / 64) x batch size, is SAR's (mr-eggplant/SAR, used
there for Tent, EATA and SAR alike).
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.tta.adapter import Adapter, adapted_norms, softmax_entropy

__all__ = ["Tent", "softmax_entropy", "vit_lr"]


def vit_lr(batch_size: int) -> float:
    """The ViT lr of SAR's reference code for Tent, EATA and SAR: 0.001 per 64 images."""
    return 0.001 / 64 * batch_size


class Tent(Adapter):
    """``tent(images) -> logits``: predicts and adapts; ``reset()`` restores the original weights and
    optimizer state exactly."""

    name = "tent"

    def __init__(
        self, model: nn.Module, lr: float, momentum: float = 0.9, steps: int = 1, optimizer: str = "sgd"
    ):
        params = adapted_norms(model)
        if optimizer == "adam":  # the reference's CIFAR setting (betas: its BETA and torch's default)
            step = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        else:
            step = torch.optim.SGD(params, lr=lr, momentum=momentum)
        super().__init__(model, params, step)
        self.steps = steps

    @torch.enable_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            logits = self.forward(images)
            loss = softmax_entropy(logits).mean()
            self.optimizer.zero_grad(set_to_none=True)
            self.backward(loss)
            self.optimizer.step()
        return logits.detach()  # the prediction of the pass that adapted (as the reference code)
