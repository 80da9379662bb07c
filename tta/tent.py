"""Tent (Wang et al., ICLR 2021, "Fully Test-Time Adaptation by Entropy Minimization").

At test time, per batch: predict, and take one optimizer step on the mean prediction entropy of that
same forward pass, updating only the affine parameters of the normalization layers. Facts from the
paper and its reference implementation (DequanWang/tent): SGD with momentum 0.9; BatchNorm layers
normalise with the test batch's statistics (no running averages); the rest of the network stays in
eval mode, so dropout and drop path are off. For ViTs the norms are LayerNorms (their statistics are
per token already) and the lr scales with the batch, (0.001 / 64) x batch size.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits), in nats."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weight and bias of every normalization layer (the parameters Tent adapts)."""
    return [
        p
        for module in model.modules()
        if isinstance(module, NORMS)
        for p in (module.weight, module.bias)
        if p is not None
    ]


def vit_lr(batch_size: int) -> float:
    """Tent's lr for ViTs: 0.001 per 64 images."""
    return 0.001 / 64 * batch_size


class Tent:
    """``tent(images) -> logits``: predicts and adapts; ``reset()`` restores the original weights and
    optimizer state exactly (the reset protocol, before each corruption)."""

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, steps: int = 1):
        self.model, self.steps = model, steps
        model.eval().requires_grad_(False)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()  # normalise with the test batch's statistics ...
                module.track_running_stats = False  # ... and keep no running averages
                module.running_mean, module.running_var = None, None
        self.params = norm_affine_parameters(model)
        if not self.params:
            raise ValueError("the model has no normalization layer with affine parameters for Tent to adapt")
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self._saved = copy.deepcopy(model.state_dict()), copy.deepcopy(self.optimizer.state_dict())

    @torch.enable_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            logits = self.model(images)
            loss = softmax_entropy(logits).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return logits.detach()  # the prediction of the pass that adapted (as the reference code)

    def reset(self) -> None:
        self.model.load_state_dict(self._saved[0])
        self.optimizer.load_state_dict(self._saved[1])
