"""BatchNorm statistics over the global batch when several processes train together.

MoCo v3 converts every BatchNorm to ``torch.nn.SyncBatchNorm`` under DDP (official
``main_moco.py``). PyTorch's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on
GPU"), so on CPU (gloo) each BatchNorm1d becomes :class:`AllReduceBatchNorm1d`, which computes
the same statistics with a differentiable all-reduce. Either way a W-process run normalises
with the statistics of the whole batch, as a 1-process run does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients (again all-reduced)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-time mean and variance cover all processes' samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        x32 = x.float()
        count = torch.tensor([float(x.shape[0])], dtype=torch.float32, device=x.device)
        stats = torch.cat([x32.sum(0), (x32 * x32).sum(0), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm on accelerators, :class:`AllReduceBatchNorm1d` on CPU (BatchNorm1d only)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_allreduce(model)


def _to_allreduce(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, AllReduceBatchNorm1d):
        new = AllReduceBatchNorm1d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:  # the same Parameter objects: requires_grad (False in the momentum encoder) is kept
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.BatchNorm1d):
        raise NotImplementedError(
            f"{type(module).__name__} has no CPU multi-process version; use BatchNorm1d heads"
        )
    for name, child in module.named_children():
        setattr(module, name, _to_allreduce(child))
    return module


__all__ = ["AllReduceBatchNorm1d", "convert_batchnorm"]
