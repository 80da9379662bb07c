"""MoCo v3 (Chen, Xie & He, 2021): encoders, momentum update and the symmetric contrastive loss.

Follows the official ``moco/builder.py``: the base encoder is backbone + projector, the momentum
encoder an EMA copy of both without gradients, the predictor sits on the base branch only. The
forward pass first moves the momentum encoder (m·ema + (1−m)·online, lightly's
``update_momentum`` computes exactly this), then computes the keys, gathers them from every
process without gradient and returns ``ctr(q1, k2) + ctr(q2, k1)``.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.utils import update_momentum
from torch import nn

from selfsup.models import create_backbone, is_vit
from selfsup.ssl.heads import predictor, projector
from selfsup.ssl.settings import PretrainConfig, resolve_recipe


def contrastive_loss(q: torch.Tensor, k_all: torch.Tensor, temperature: float, rank: int = 0) -> torch.Tensor:
    """InfoNCE of local queries (N, C) against the keys of all processes (W·N, C), times 2T.

    The positive key of query i on process ``rank`` is row ``N·rank + i`` of ``k_all``. Logits are
    computed in float32 whatever the autocast dtype (the softmax over W·N keys is the fragile part).
    """
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmul in bf16/fp16
        q = F.normalize(q.float(), dim=1)
        k_all = F.normalize(k_all.float(), dim=1)
        logits = q @ k_all.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
        return F.cross_entropy(logits, labels) * (2 * temperature)


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys of every process concatenated in rank order (no gradient), and this process's rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), dist.get_rank()


class Encoder(nn.Module):
    """Backbone (pooled/CLS features, no classifier) followed by the projector."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class MoCoV3(nn.Module):
    """Base encoder + predictor, momentum encoder; ``forward(x1, x2, m)`` returns the loss.

    Args:
        backbone: a timm model built with ``num_classes=0`` (its output is the CLS/pooled feature).
        dim, mlp_dim: projector/predictor output and hidden widths (paper: 256 and 4096).
        temperature: T of the loss (paper: 0.2 for ViTs, 1.0 for ResNets).
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        proj_layers: int | None = None,
        pred_layers: int = 2,
    ):
        super().__init__()
        vit = is_vit(backbone)
        self.temperature = temperature
        self.base_encoder = Encoder(
            backbone, projector(int(backbone.num_features), mlp_dim, dim, vit, proj_layers)
        )
        self.predictor = predictor(dim, mlp_dim, vit, pred_layers)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        return self.base_encoder.backbone

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        update_momentum(self.base_encoder, self.momentum_encoder, m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, rank = gather_keys(self.momentum_encoder(x1))
            k2, _ = gather_keys(self.momentum_encoder(x2))
        return contrastive_loss(q1, k2, self.temperature, rank) + contrastive_loss(
            q2, k1, self.temperature, rank
        )


def build_model(config: PretrainConfig) -> MoCoV3:
    """The MoCo v3 module of a run's config (the official init comes with ``model.init=moco_v3``).

    The recipe keys left null in ``config`` are filled with the backbone kind's values here
    (:func:`~selfsup.ssl.settings.resolve_recipe`): build the model before anything reads them.
    """
    backbone = create_backbone(config.model)
    resolve_recipe(config, is_vit(backbone))
    m = config.moco
    return MoCoV3(backbone, m.dim, m.mlp_dim, m.temperature, m.proj_layers, m.pred_layers)
