"""L1 structured pruning with torch-pruning (DepGraph): parameters really leave the model.

Importance is the L1 norm of each prunable group's weights (Li et al., ICLR 2017, "Pruning Filters for
Efficient ConvNets"; torch-pruning's ``GroupMagnitudeImportance(p=1)``). CNNs lose output channels
(DepGraph keeps residual-coupled layers consistent); ViTs lose whole attention heads and MLP hidden
neurons while the residual width, the patch embedding and the classifier stay whole. The share to
remove is searched until the measured MACs reach the target share of the original's.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch_pruning as tp
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.models.byobnet import SelfAttnBlock
from timm.models.vision_transformer import Attention
from torch import nn

from selfsup.backbones.dynamic_conv import DynamicConv2d
from selfsup.backbones.hooks import auxiliary_losses
from selfsup.backbones.skipnet import GatedBlock
from selfsup.errors import UsageError
from selfsup.flops import count_macs, count_params
from selfsup.models import is_vit


@dataclass
class PruneResult:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    steps: int  # bisection steps of the search
    ratio: float  # the share of each prunable group removed

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example`` in eval mode (PyTorch's FLOP counter:
    it sees inside every layer, the project's dynamic convolutions and timm's attention included;
    for SkipNet, the blocks this example's gates run)."""
    return count_macs(model, example), count_params(model)


def _heads(model: nn.Module) -> list[nn.Module]:
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = heads if isinstance(heads, tuple) else (heads,)
    return [h for h in heads if isinstance(h, nn.Module)]


def _ignored(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs keep their width: the classifier; BoTNet's self-attention blocks (their
    attention and convolutions: DepGraph's group search does not finish through them); and for ViTs
    everything but the qkv projections (heads) and the MLPs' first layers (hidden neurons), so the
    residual width stays."""
    if not is_vit(model):
        attention_blocks = [m for m in model.modules() if isinstance(m, SelfAttnBlock)]
        inside = [
            m for b in attention_blocks for m in b.modules() if isinstance(m, nn.Conv2d | BottleneckAttn)
        ]
        return _heads(model) + inside
    keep = {m for blk in model.blocks for m in (blk.attn.qkv, blk.mlp.fc1)}
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) and m not in keep]


def sync_attention(model: nn.Module, num_heads: dict[nn.Module, int]) -> None:
    """timm's attention reshapes by its own attributes: set them to the pruned qkv's sizes."""
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv in num_heads:
            module.num_heads = int(num_heads[module.qkv])
            module.head_dim = module.qkv.out_features // (3 * module.num_heads)
            module.attn_dim = module.num_heads * module.head_dim
            module.scale = module.head_dim**-0.5


def _traced_forward(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """The forward pass DepGraph traces: SkipNet's gates in their straight-through (training) form,
    so the gates' layers are on the graph (in eval mode their decisions carry no gradient); the rest
    of the model, BatchNorm included, stays in eval mode."""
    gates = [m for m in model.modules() if isinstance(m, GatedBlock)]
    for gate in gates:
        gate.training = True
    try:
        with auxiliary_losses(model) as aux:
            out = model(example)
            aux.discard()  # the straight-through pass trains nothing: its penalty is dropped
    finally:
        for gate in gates:
            gate.training = False
    return out


def _prune_once(model: nn.Module, example: torch.Tensor, ratio: float) -> None:
    """One torch-pruning step removing ``ratio`` of every prunable group (heads: at least one stays)."""
    kwargs = {}
    if is_vit(model):
        attention = [m for m in model.modules() if isinstance(m, Attention)]
        fewest = min(m.num_heads for m in attention)
        kwargs = dict(
            num_heads={m.qkv: m.num_heads for m in attention},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=min(ratio, 1 - 1 / fewest),
        )
    with warnings.catch_warnings():  # cls_token/pos_embed: on the residual width, which is not pruned
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            forward_fn=_traced_forward,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=ratio,
            iterative_steps=1,
            ignored_layers=_ignored(model),
            **kwargs,
        )
        pruner.step()
    if is_vit(model):
        sync_attention(model, pruner.num_heads)


def prune_l1(model: nn.Module, example: torch.Tensor, target: float, search_steps: int = 12) -> PruneResult:
    """Prune ``model`` in place so that its measured MACs are at most ``target`` x the original's, as
    close to it as the structure allows: the share of each group to remove is searched by bisection
    on copies (heads come in whole units, so the MACs move in steps), then applied once."""
    if any(isinstance(m, DynamicConv2d) for m in model.modules()):
        raise UsageError(
            "L1 pruning of dynamic convolutions (DY-ResNet, DY-MobileNetV2) is not supported: torch-pruning's "
            "dependency graph does not follow a layer whose kernels are mixed per sample; compress it with "
            "--quantize int8-dynamic|int8-static only"
        )
    model.eval()
    macs0, params0 = count(model, example)
    low, high = 0.0, 0.95
    for _ in range(search_steps):
        ratio = (low + high) / 2
        trial = copy.deepcopy(model)
        _prune_once(trial, example, ratio)
        if count(trial, example)[0] <= target * macs0:
            high = ratio
        else:
            low = ratio
    _prune_once(model, example, high)
    macs, params = count(model, example)
    return PruneResult(macs0, macs, params0, params, search_steps, high)
