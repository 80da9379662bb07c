"""What a training step tells a backbone and asks of it, for architectures that need it.

* :func:`set_training_progress`: the fractional epoch, for schedules inside the model (DynamicConv's
  attention temperature, annealed from 30 to 1).
* :func:`auxiliary_losses`: the scope of a training step's forward passes, which collects the terms
  the model adds to that step's loss (SkipNet's compute penalty on the share of blocks executed)::

      with auxiliary_losses(model) as aux:
          loss = criterion(model(images), labels)
          extra = aux.total()  # None for models without a term
      loss = loss if extra is None else loss + extra

  The models keep returning logits only (timm's interface, which DDP, EMA and the distillation
  heads expect); the term cannot be lost silently instead: a training forward that records one
  outside the scope raises, and so does a scope that ends with a term neither taken nor discarded.

Every training stage calls both once per step (models without them ignore the calls). A module
takes part in the scope through three methods: ``open_auxiliary_loss()``, ``take_auxiliary_loss()``
(the term since the last take, or ``None``) and ``close_auxiliary_loss()`` (whether anything
recorded was left untaken).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def set_training_progress(model: nn.Module, epochs: float) -> None:
    for module in model.modules():
        hook = getattr(module, "set_training_progress", None)
        if callable(hook):
            hook(epochs)


class AuxiliaryLosses:
    """The modules of one :func:`auxiliary_losses` scope; :meth:`total` drains what they recorded."""

    def __init__(self, owners: list[nn.Module]):
        self.owners = owners

    def total(self) -> torch.Tensor | None:
        """The sum of the terms recorded since the last call (``None`` when there are none)."""
        terms = [term for term in (owner.take_auxiliary_loss() for owner in self.owners) if term is not None]
        return torch.stack(terms).sum() if terms else None

    def discard(self) -> None:
        """Drop the recorded terms on purpose: the passes trained nothing (e.g. tracing for pruning)."""
        self.total()


@contextlib.contextmanager
def auxiliary_losses(model: nn.Module) -> Iterator[AuxiliaryLosses]:
    """Collect the auxiliary terms of ``model``'s training forwards inside the block (see the module
    docstring); raises ``RuntimeError`` if the block ends normally with a term not drained."""
    owners = [m for m in model.modules() if callable(getattr(m, "open_auxiliary_loss", None))]
    for owner in owners:
        owner.open_auxiliary_loss()
    finished = False
    try:
        yield AuxiliaryLosses(owners)
        finished = True
    finally:
        undrained = [type(owner).__name__ for owner in owners if owner.close_auxiliary_loss()]
    if finished and undrained:  # an error inside the block is the one to report
        raise RuntimeError(
            f"{', '.join(undrained)} recorded an auxiliary loss that was never taken: call aux.total() "
            "and add it to the loss (or aux.discard()) inside `with auxiliary_losses(model) as aux`"
        )
