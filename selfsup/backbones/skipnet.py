"""SkipNet (Wang et al., 2018, "SkipNet: Learning Dynamic Routing in Convolutional Networks").

A CIFAR ResNet whose residual blocks each have a gate deciding, per sample, whether the block runs.
The decision is per sample (the seed's sketch skipped the whole batch on the mean gate, with no
gradient through the decision):

* gate: the block's input, globally pooled -> Linear -> ReLU -> Linear -> sigmoid = p; the block
  runs when p > 0.5. (SkipNet's FFGate-II puts a strided 3x3 convolution before the pooling; a
  pooled-feature gate costs a few hundred MACs instead.)
* training: the forward pass uses the hard decision, the backward pass the sigmoid's gradient
  (straight-through, the paper's supervised stage), and a compute penalty ``skip_penalty`` x (the
  share of gated blocks executed) joins the loss through :func:`selfsup.backbones.hooks.auxiliary_losses`,
  the scope every training forward runs in (one outside it raises: the penalty cannot be forgotten).
  The paper's second stage (REINFORCE on the gates) is not built.
* inference: a skipped block does no work: only the samples whose gate opened go through it (a
  skipped downsampling block still applies its 1x1 shortcut, as in the official code).
  :meth:`SkipResNet.usage` reports the measured share of blocks executed and MACs per input.
  An exported graph (ONNX, ``torch.export``) cannot change shape with the data: there every block
  runs and the gate selects its output or the shortcut (the same outputs, no savings).

Every block except the network's first is gated, as in the official code. Written by hand: no
maintained library has per-sample skipping with trainable gates. The network has timm's model API
(``forward_head(pre_logits=)``, ``reset_classifier``, ``global_pool`` through timm's
``create_classifier``, ``set_grad_checkpointing``: each block's convolutions are recomputed in the
backward pass, the gates are not, so every decision is recorded once).

Models: ``skip_resnet110`` (the paper's CIFAR SkipNet-110: 3 groups of 18 BasicBlocks, 16-32-64
channels) and ``skip_resnet38`` (6 blocks per group, CPU-sized).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import nn

from selfsup.backbones.cfgs import timm_cfg


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.grad_checkpointing = False
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.drop_path(self.bn2(self.conv2(out))) + self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self.residual, x)  # the RNG state is replayed: the same drop-path mask
        return self.residual(x)


class GatedBlock(nn.Module):
    """A block behind a per-sample gate; counts what it executed while in eval mode."""

    def __init__(self, block: BasicBlock, channels: int, hidden: int = 16, open_bias: float = 2.0):
        super().__init__()
        self.block = block
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        nn.init.constant_(self.gate[-1].bias, open_bias)  # start with every block open (p = 0.88)
        # this step's straight-through gates (training); None outside an auxiliary_losses() scope
        self.decisions: list[torch.Tensor] | None = None
        self.executed = 0  # samples that ran the block, in eval mode
        self.seen = 0

    def _record(self, decision: torch.Tensor) -> None:
        if self.decisions is None:
            raise RuntimeError(
                "a SkipNet training forward outside `with selfsup.backbones.hooks.auxiliary_losses(model) "
                "as aux`: its compute penalty would never reach the loss (add aux.total() to it)"
            )
        self.decisions.append(decision)

    def open_probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.open_probability(x)
        hard = (p > 0.5).to(x.dtype)
        if self.training:
            g = hard + p - p.detach()  # straight-through: hard forward, sigmoid backward
            if torch.is_grad_enabled():
                self._record(g)
            skip = self.block.shortcut(x)
            return skip + g.view(-1, 1, 1, 1) * (self.block(x) - skip)
        if torch.compiler.is_exporting():  # ONNX/torch.export: no data-dependent shapes; every block runs
            return torch.where(hard.bool().view(-1, 1, 1, 1), self.block(x), self.block.shortcut(x))
        run = hard.nonzero().squeeze(1)
        self.executed += int(run.numel())
        self.seen += x.shape[0]
        y = self.block.shortcut(x)
        if run.numel() == 0:
            return y
        return y.index_copy(0, run, self.block(x.index_select(0, run)).to(y.dtype))


class SkipResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, 3 groups) with gated blocks; timm's classifier interface."""

    def __init__(
        self,
        blocks_per_group: int = 18,
        widths: tuple[int, int, int] = (16, 32, 64),
        num_classes: int = 1000,
        in_chans: int = 3,
        skip_penalty: float = 0.1,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,  # stochastic depth, rising linearly over the blocks (as timm's ResNets)
    ):
        super().__init__()
        self.skip_penalty = skip_penalty
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        channels, total = widths[0], blocks_per_group * len(widths)
        for group, width in enumerate(widths):
            for i in range(blocks_per_group):
                rate = drop_path_rate * (group * blocks_per_group + i) / max(total - 1, 1)
                block = BasicBlock(channels, width, 2 if group > 0 and i == 0 else 1, rate)
                first = group == 0 and i == 0  # the official code always runs the first block
                layers.append(block if first else GatedBlock(block, channels))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.num_features = channels
        self.drop_rate = drop_rate
        self.reset_classifier(num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def gated_blocks(self) -> list[GatedBlock]:
        return [m for m in self.layers if isinstance(m, GatedBlock)]

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head (none for ``num_classes=0``: the pooled features); ``global_pool`` as timm's
        ``SelectAdaptivePool2d`` (``avg``, ``max``, ``avgmax``, ``catavgmax``, ``''`` = the feature
        map), the current one kept when ``None``."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing beyond timm's rule for 1-D parameters (biases, BatchNorm): the official code decays
        every weight, the gates' included."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's convolutions in the backward pass (not the gates: see the module docstring)."""
        for module in self.layers.modules():
            if isinstance(module, BasicBlock):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^conv1|bn1", "blocks": r"^layers\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def open_auxiliary_loss(self) -> None:
        """Start recording the gates' training decisions (see :func:`selfsup.backbones.hooks.auxiliary_losses`)."""
        for block in self.gated_blocks():
            if block.decisions is not None:
                raise RuntimeError("auxiliary_losses() scopes on one SkipNet cannot nest")
            block.decisions = []

    def take_auxiliary_loss(self) -> torch.Tensor | None:
        """``skip_penalty`` x the share of gated blocks executed in the forward passes since the last
        take (with gradients through the straight-through gates); clears the record."""
        decisions = [g for block in self.gated_blocks() for g in block.decisions or ()]
        for block in self.gated_blocks():
            block.decisions = [] if block.decisions is not None else None
        if not decisions or not self.skip_penalty:
            return None
        return self.skip_penalty * torch.cat(decisions).mean()

    def close_auxiliary_loss(self) -> bool:
        """Stop recording; whether decisions were left untaken."""
        blocks = self.gated_blocks()
        pending = any(block.decisions for block in blocks)
        for block in blocks:
            block.decisions = None
        return pending

    def reset_usage(self) -> None:
        for block in self.gated_blocks():
            block.executed = block.seen = 0

    def usage(self, img_size: int) -> dict[str, float]:
        """What the eval-mode passes since :meth:`reset_usage` executed: the share of gated blocks
        run, and MACs per input (measured per block at ``img_size``) against the ungated network's."""
        from selfsup.flops import count_macs

        gated = self.gated_blocks()
        seen = max(gated[0].seen, 1) if gated else 1
        shares = [block.executed / seen for block in gated]
        full = count_macs(_AllOpen(self), torch.zeros(1, 3, img_size, img_size))
        saved, x = 0, torch.zeros(1, 3, img_size, img_size)
        with torch.no_grad():
            x = F.relu(self.bn1(self.conv1(x)))
            for module in self.layers:
                if isinstance(module, GatedBlock):
                    run_macs = count_macs(module.block, x) - count_macs(_Shortcut(module.block), x)
                    saved += (1 - shares[gated.index(module)]) * run_macs
                    x = module.block(x)
                else:
                    x = module(x)
        self.reset_usage()  # the counting passes above must not count as usage
        return {
            "executed_share": sum(shares) / max(len(shares), 1),
            "macs_full": float(full),
            "macs_per_input": float(full - saved),
        }


class _AllOpen(nn.Module):
    """The network with every block run (for the ungated MACs)."""

    def __init__(self, net: SkipResNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.net.bn1(self.net.conv1(x)))
        for module in self.net.layers:
            x = module.block(x) if isinstance(module, GatedBlock) else module(x)
        return self.net.forward_head(x)


class _Shortcut(nn.Module):
    def __init__(self, block: BasicBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.shortcut(x)


def _cfg(**kwargs) -> dict:
    cifar = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear")
    stats = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    return timm_cfg(**{**cifar, **stats, "first_conv": "conv1", "classifier": "fc", **kwargs})


default_cfgs = generate_default_cfgs({"skip_resnet110": _cfg(), "skip_resnet38": _cfg()})


@register_model
def skip_resnet110(pretrained: bool = False, **kwargs) -> SkipResNet:
    """The paper's CIFAR SkipNet-110 (ResNet-110 with gates)."""
    return build_model_with_cfg(SkipResNet, "skip_resnet110", pretrained, blocks_per_group=18, **kwargs)


@register_model
def skip_resnet38(pretrained: bool = False, **kwargs) -> SkipResNet:
    """SkipNet-38: 6 gated blocks per group, CPU-sized."""
    return build_model_with_cfg(SkipResNet, "skip_resnet38", pretrained, blocks_per_group=6, **kwargs)
