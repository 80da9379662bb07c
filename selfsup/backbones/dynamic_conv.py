"""Dynamic convolution (Chen et al., 2020, "Dynamic Convolution: Attention over Convolution Kernels").

Each dynamic layer holds K kernels; per input, an attention branch (global average pool -> FC ->
ReLU -> FC -> softmax of logits / temperature) weighs them, and the weighted sum runs as that
sample's kernel. The B per-sample kernels run as one grouped convolution (the batch folded into
the channels), the paper's efficient form. The temperature starts at 30 and is annealed to 1 over
the first epochs of training (the paper: linearly over 10 epochs), so all kernels learn before the
attention sharpens: training stages call :func:`selfsup.backbones.hooks.set_training_progress`
each step, which :meth:`DynamicConv2d.set_training_progress` follows.

timm's CondConv (``CondConv2d``) is the nearest relative and is not used: its routing is one linear
layer and a sigmoid per expert (no squeeze, no softmax, no temperature). Written by hand for that
reason.

Models: ``dy_resnet18`` and ``dy_mobilenetv2_100`` (the paper's DY-ResNet-18 and DY-MobileNetV2 x1.0:
timm's ResNet-18 / MobileNetV2 with every convolution but the stem's made dynamic; MobileNetV2's
last 1x1 stays static too, which is what the paper's parameter count implies), and
``dy_resnet_tiny`` for 32 px images (one BasicBlock per stage, widths 16-128, a 3x3 stride-1 stem
without max pool).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from selfsup.backbones.cfgs import timm_cfg

TEMPERATURE_START = 30.0
ANNEAL_EPOCHS = 10.0


class DynamicConv2d(nn.Module):
    """A ``Conv2d`` with K kernels mixed per sample by softmax attention over pooled features."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_kernels: int = 4,
        reduction: int = 4,
        anneal_epochs: float = ANNEAL_EPOCHS,
    ):
        super().__init__()
        k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.num_kernels, self.anneal_epochs = num_kernels, anneal_epochs
        hidden = max(in_channels // reduction, 4)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_kernels),
        )
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_channels)) if bias else None
        self.register_buffer("temperature", torch.tensor(TEMPERATURE_START))
        for kernel in self.weight:  # each kernel initialised as a Conv2d's would be
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))

    def set_training_progress(self, epochs: float) -> None:
        """Temperature from 30 at epoch 0 down to 1 at ``anneal_epochs``, linearly, then 1."""
        share = min(max(epochs / self.anneal_epochs, 0.0), 1.0) if self.anneal_epochs > 0 else 1.0
        self.temperature.fill_(TEMPERATURE_START + (1.0 - TEMPERATURE_START) * share)

    def kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) softmax weights of the kernels for each sample."""
        return torch.softmax(self.attention(x) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        pi = self.kernel_attention(x)
        if torch.compiler.is_exporting():  # ONNX/torch.export: a grouped convolution fixes the batch size
            return self._mixed_outputs(x, pi)
        weight = (pi @ self.weight.flatten(1)).reshape(b * self.out_channels, -1, *self.kernel_size)
        bias = (pi @ self.bias).flatten() if self.bias is not None else None
        y = F.conv2d(
            x.reshape(1, -1, h, w),
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups * b,
        )
        return y.reshape(b, self.out_channels, *y.shape[-2:])

    def _mixed_outputs(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """The same result by linearity, sum_k pi_k (W_k * x + b_k): the K static kernels as one
        convolution, then the per-sample mix. K times the MACs, but no batch size in the graph."""
        k, out = self.num_kernels, self.out_channels
        weight = self.weight.reshape(k * out, *self.weight.shape[2:])
        bias = self.bias.reshape(-1) if self.bias is not None else None
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        y = y.reshape(x.shape[0], k, out, *y.shape[-2:])
        return (pi[:, :, None, None, None] * y).sum(1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, num_kernels={self.num_kernels}"
        )


def make_dynamic(model: nn.Module, skip: tuple[str, ...] = (), **options) -> nn.Module:
    """Every ``nn.Conv2d`` of ``model`` not named in ``skip`` replaced by a :class:`DynamicConv2d` of
    the same geometry (fresh weights)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Conv2d) or name in skip:
            continue
        if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
            raise ValueError(
                f"{name}: only zero-padded convolutions with explicit padding can be made dynamic"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            child,
            DynamicConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
                **options,
            ),
        )
    return model


class DyResNet(ResNet):
    """timm's ResNet with dynamic convolutions everywhere but the stem; ``small_stem``: a 3x3
    stride-1 stem without max pool, for 32 px images."""

    def __init__(
        self,
        *args,
        small_stem: bool = False,
        num_kernels: int = 4,
        anneal_epochs: float = ANNEAL_EPOCHS,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if small_stem:
            width = self.conv1.out_channels
            self.conv1 = nn.Conv2d(self.conv1.in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
            self.feature_info[0]["reduction"] = 1
        make_dynamic(self, skip=("conv1",), num_kernels=num_kernels, anneal_epochs=anneal_epochs)


class DyMobileNetV2(EfficientNet):
    """timm's MobileNetV2 with dynamic convolutions everywhere but the stem and the last 1x1."""

    def __init__(self, *args, num_kernels: int = 4, anneal_epochs: float = ANNEAL_EPOCHS, **kwargs):
        super().__init__(*args, **kwargs)
        # The last 1x1 (320 -> 1280 features) stays static: dynamic, the model has 12.4M parameters
        # against the paper's 11.1M; static, 11.15M (MACs agree either way: 310-312 vs 313M)
        make_dynamic(
            self, skip=("conv_stem", "conv_head"), num_kernels=num_kernels, anneal_epochs=anneal_epochs
        )


def _cfg(**kwargs) -> dict:
    return timm_cfg(**{"interpolation": "bilinear", "first_conv": "conv1", "classifier": "fc", **kwargs})


default_cfgs = generate_default_cfgs(
    {
        "dy_resnet18": _cfg(),
        "dy_resnet_tiny": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
        "dy_mobilenetv2_100": _cfg(first_conv="conv_stem", classifier="classifier"),
    }
)


@register_model
def dy_resnet18(pretrained: bool = False, **kwargs) -> DyResNet:
    """DY-ResNet-18: ResNet-18, K = 4 kernels in every convolution after the stem."""
    return build_model_with_cfg(
        DyResNet, "dy_resnet18", pretrained, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs
    )


@register_model
def dy_resnet_tiny(pretrained: bool = False, **kwargs) -> DyResNet:
    """CPU-sized DY-ResNet for 32 px images: one BasicBlock per stage, widths 16-128."""
    args = dict(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16, small_stem=True
    )
    return build_model_with_cfg(DyResNet, "dy_resnet_tiny", pretrained, **{**args, **kwargs})


@register_model
def dy_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DyMobileNetV2:
    """DY-MobileNetV2 x1.0: timm's ``mobilenetv2_100`` layout, dynamic after the stem."""
    arch_def = [
        ["ds_r1_k3_s1_c16"],
        ["ir_r2_k3_s2_e6_c24"],
        ["ir_r3_k3_s2_e6_c32"],
        ["ir_r4_k3_s2_e6_c64"],
        ["ir_r3_k3_s1_e6_c96"],
        ["ir_r3_k3_s2_e6_c160"],
        ["ir_r1_k3_s1_e6_c320"],
    ]
    args = dict(
        block_args=decode_arch_def(arch_def),
        num_features=1280,
        stem_size=32,
        fix_stem=True,
        round_chs_fn=round_channels,
        act_layer=nn.ReLU6,
    )
    return build_model_with_cfg(DyMobileNetV2, "dy_mobilenetv2_100", pretrained, **{**args, **kwargs})
