"""What a training step tells a backbone and asks of it, for architectures that need it.

* :func:`set_training_progress`: the fractional epoch, for schedules inside the model (DynamicConv's
  attention temperature, annealed from 30 to 1).
* :func:`auxiliary_loss`: a term the model adds to the loss of the step whose forward passes it
  saw (SkipNet's compute penalty on the share of blocks executed).

Every training stage calls both once per step (models without them ignore the calls).
"""

from __future__ import annotations

import torch
from torch import nn


def set_training_progress(model: nn.Module, epochs: float) -> None:
    for module in model.modules():
        hook = getattr(module, "set_training_progress", None)
        if callable(hook):
            hook(epochs)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the modules' auxiliary losses since the last call (each module clears its own)."""
    terms = []
    for module in model.modules():
        take = getattr(module, "take_auxiliary_loss", None)
        if callable(take):
            term = take()
            if term is not None:
                terms.append(term)
    return torch.stack(terms).sum() if terms else None
