"""MoCo v3's projector and predictor MLPs (official ``moco/builder.py``, ``_build_mlp``).

Every layer is ``Linear(bias=False)``; hidden layers are followed by BatchNorm1d + ReLU, the last
layer by an affine-free BatchNorm1d. ViTs use a 3-layer projector and a 2-layer predictor, both
with that final BN; ResNets a 2-layer projector and a predictor without the final BN.

lightly's ``MoCoProjectionHead`` (no BN) and ``BYOLPredictionHead`` (bias, no final BN) differ
from this, so we use lightly's generic :class:`~lightly.models.modules.heads.ProjectionHead` with
explicit blocks, which reproduces the official layer sequence exactly.
"""

from __future__ import annotations

from lightly.models.modules.heads import ProjectionHead
from torch import nn


def mlp_head(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Module:
    """``num_layers`` Linear layers ``in -> hidden -> ... -> out`` in the official BN pattern."""
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {num_layers}")
    blocks = []
    for layer in range(num_layers):
        d_in = in_dim if layer == 0 else hidden_dim
        last = layer == num_layers - 1
        d_out = out_dim if last else hidden_dim
        if last:
            norm = nn.BatchNorm1d(d_out, affine=False) if last_bn else None
            blocks.append((d_in, d_out, norm, None, False))
        else:
            blocks.append((d_in, d_out, nn.BatchNorm1d(d_out), nn.ReLU(inplace=True), False))
    return ProjectionHead(blocks)


def projector(
    in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, vit: bool = True, num_layers: int | None = None
) -> nn.Module:
    """3 layers for ViTs, 2 for ResNets (official ``MoCo_ViT`` / ``MoCo_ResNet``)."""
    return mlp_head(num_layers or (3 if vit else 2), in_dim, hidden_dim, out_dim, last_bn=True)


def predictor(dim: int = 256, hidden_dim: int = 4096, vit: bool = True, num_layers: int = 2) -> nn.Module:
    """2 layers; the final affine-free BN only for ViTs (official ``MoCo_ResNet`` drops it)."""
    return mlp_head(num_layers, dim, hidden_dim, dim, last_bn=vit)
