"""What every test-time adaptation method shares: the model in test-time mode, the entropy, the
parameters adapted, the counted passes and the exact reset.

An adapter is called on a batch of normalized images and returns that batch's logits, adapting on
the way (or not: :class:`Source`). ``reset()`` puts back the weights and optimizer state it started
from, bit for bit (the reset protocol, before each corruption).
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


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_time_mode(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout, no drop path), no gradients anywhere, and every BatchNorm normalizing
    with the test batch's own statistics, keeping no running averages (Tent's setting)."""
    model.eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
            module.running_mean, module.running_var = None, None
    return model


def norm_affine_parameters(model: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.Parameter]:
    """The weight and bias of every normalization layer whose name does not start with ``skip``."""
    return [
        p
        for name, module in model.named_modules()
        if isinstance(module, NORMS) and not (skip and f"{name}.".startswith(skip))
        for p in (module.weight, module.bias)
        if p is not None
    ]


def adapted_norms(model: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.Parameter]:
    """The model in test-time mode and the norm affine parameters an entropy method adapts (Tent,
    ETA/EATA, SAR); a model without any is a clear error."""
    params = norm_affine_parameters(test_time_mode(model), skip)
    if not params:
        where = " outside the frozen layers" if skip else ""
        raise ValueError(f"the model has no normalization layer with affine parameters{where} to adapt")
    return params


def entropy_margin(num_classes: int, coefficient: float = 0.4) -> float:
    """EATA's and SAR's reliability threshold E0 = 0.4 ln C (C classes)."""
    return coefficient * float(torch.log(torch.tensor(float(num_classes))))


def num_classes_of(model: nn.Module) -> int:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = head[0] if isinstance(head, tuple) else head
    if not isinstance(head, nn.Linear):
        raise ValueError("test-time adaptation needs a classifier: the model has no linear head")
    return head.out_features


class Adapter:
    """Base class: ``adapter(images) -> logits``; ``reset()``; counts forward and backward passes
    (one forward or backward over one batch counts one, whatever the batch size)."""

    name = "adapter"

    def __init__(self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None):
        self.model, self.params, self.optimizer = model, params, optimizer
        for p in params:
            p.requires_grad_(True)
        self.forwards = self.backwards = 0
        self._saved = (
            copy.deepcopy(model.state_dict()),
            (copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # every method runs the model in eval mode (BatchNorm aside), so a backbone's training term
        # (SkipNet's compute penalty) is never recorded: it is no part of TTA's objectives
        self.forwards += 1
        return self.model(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards += 1
        loss.backward()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        self.model.load_state_dict(self._saved[0])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._saved[1])


class Source(Adapter):
    """No adaptation: the model as trained (the row every method is compared with)."""

    name = "source"

    def __init__(self, model: nn.Module):
        model.eval().requires_grad_(False)
        super().__init__(model, [], None)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)


class NormStats(Adapter):
    """BatchNorm with the test batch's statistics instead of the training averages, nothing learned
    (Schneider et al. 2020; Tent's "BN" baseline). A no-op for LayerNorm, so only offered for
    models with BatchNorm."""

    name = "norm"

    def __init__(self, model: nn.Module):
        if not has_batchnorm(model):
            raise ValueError(
                "the norm method re-estimates BatchNorm statistics and the model has no BatchNorm "
                "(LayerNorm normalizes each token by itself already): use tent, eata or sar"
            )
        super().__init__(test_time_mode(model), [], None)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)
