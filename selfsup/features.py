"""Frozen-backbone features for the later stages: CLS token, mean patch token, last-n CLS tokens.

``cls_last4`` concatenates the (final-norm) CLS tokens of the last 4 blocks, DINO's linear-probe
feature for ViT-S. Non-ViT backbones (ResNets, ConvNeXts) offer their pooled output as ``cls``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from selfsup.errors import UsageError
from selfsup.models import is_vit

FEATURE_KINDS = ("cls", "patch_mean", "cls_lastN (e.g. cls_last4)")
_LAST_N = re.compile(r"^cls_last(\d+)$")


def check_feature_kind(kind: str, model: nn.Module | None = None) -> str:
    if kind not in ("cls", "patch_mean") and not _LAST_N.match(kind):
        raise UsageError(f"unknown feature kind '{kind}'; expected one of {', '.join(FEATURE_KINDS)}")
    if model is not None and kind != "cls" and not is_vit(model):
        raise UsageError(f"feature kind '{kind}' needs a ViT backbone; use 'cls' (pooled output) instead")
    if model is not None and (m := _LAST_N.match(kind)) and int(m.group(1)) > len(model.blocks):
        raise UsageError(f"feature kind '{kind}' asks for more blocks than the model's {len(model.blocks)}")
    return kind


def feature_dim_for(model: nn.Module, kind: str) -> int:
    m = _LAST_N.match(kind)
    return int(model.num_features) * (int(m.group(1)) if m else 1)


def extract(model: nn.Module, images: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """Features of ``images`` (B, 3, H, W) -> (B, D); call under ``torch.no_grad()`` for frozen use."""
    if not is_vit(model):
        if kind != "cls":
            check_feature_kind(kind, model)
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if kind == "cls":
        return model.forward_features(images)[:, 0]
    if kind == "patch_mean":
        return model.forward_features(images)[:, model.num_prefix_tokens :].mean(dim=1)
    m = _LAST_N.match(kind)
    if not m:
        check_feature_kind(kind)
    n = int(m.group(1))  # type: ignore[union-attr]
    blocks = model.forward_intermediates(
        images, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    return torch.cat([prefix[:, 0] for _patches, prefix in blocks], dim=-1)
