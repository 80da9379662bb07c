"""BatchNorm statistics over the global batch when several processes train together.

MoCo v3 converts every BatchNorm to ``torch.nn.SyncBatchNorm`` under DDP (official
``main_moco.py``). PyTorch's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on
GPU"), so on CPU (gloo) each BatchNorm1d/2d (and timm's BatchNormAct2d) becomes its ``AllReduce``
version, which computes the same statistics with a differentiable all-reduce (written here because
no maintained library syncs BatchNorm over gloo). Either way a W-process run normalises with the
statistics of the whole batch, as a 1-process run does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn

from selfsup.errors import UsageError


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


class _AllReduceStats:
    """Training-time mean and variance over every process's samples (all dims but the channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        return self._after_norm(self._normalise(x))

    def _after_norm(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast per channel
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=x32.dtype, device=x.device)
        stats = torch.cat([x32.sum(dims), (x32 * x32).sum(dims), count])
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
        y = (x32 - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class AllReduceBatchNorm1d(_AllReduceStats, nn.BatchNorm1d):
    """BatchNorm1d whose training-time mean and variance cover all processes' samples."""


class AllReduceBatchNorm2d(_AllReduceStats, nn.BatchNorm2d):
    """BatchNorm2d whose training-time mean and variance cover all processes' pixels."""


class AllReduceBatchNormAct2d(_AllReduceStats, BatchNormAct2d):
    """timm's BatchNormAct2d (BoTNet, timm ResNets) with the statistics of all processes."""

    def _after_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(y))


# Converted by changing the instance's class: parameters, buffers (and timm's act/drop) stay as they are.
_CPU_VERSIONS = {
    nn.BatchNorm1d: AllReduceBatchNorm1d,
    nn.BatchNorm2d: AllReduceBatchNorm2d,
    BatchNormAct2d: AllReduceBatchNormAct2d,
}


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm on accelerators (timm's converter, which knows its BatchNormAct2d); on CPU,
    the all-reduce versions of BatchNorm1d, BatchNorm2d and BatchNormAct2d, converted in place."""
    if device.type != "cpu":
        return timm_convert_sync_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:  # all checked before any is converted: no half-converted model
        if type(module) not in (*_CPU_VERSIONS, *_CPU_VERSIONS.values()):
            raise UsageError(
                f"{type(module).__name__} has no multi-process CPU version (BatchNorm1d, BatchNorm2d and "
                "timm's BatchNormAct2d have): train this model in one process, or on GPUs"
            )
    for module in norms:
        module.__class__ = _CPU_VERSIONS.get(type(module), type(module))
    return model


__all__ = ["AllReduceBatchNorm1d", "AllReduceBatchNorm2d", "AllReduceBatchNormAct2d", "convert_batchnorm"]
