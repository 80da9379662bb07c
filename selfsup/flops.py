"""Multiply-accumulates of one forward pass, counted by PyTorch's own ``FlopCounterMode``.

Attention is run through the math backend while counting: the fused CPU kernel of
``scaled_dot_product_attention`` has no FLOP formula registered and would count as zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs (FLOPs / 2) of ``model(x)`` in eval mode, without gradients; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
