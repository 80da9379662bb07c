"""T2T-ViT (Yuan et al., 2021, "Tokens-to-Token ViT"): progressive soft splits before a plain ViT.

The tokens-to-token module replaces the ViT's single patch projection: the image is cut into
overlapping patches (``nn.Unfold``, a *soft split*), a small transformer layer re-structures the
tokens, they are folded back into a 2-D map and split again, shrinking the sequence each time, then
projected to the ViT's width. Everything after the embedding is timm's ``VisionTransformer``
(blocks, class token, position embedding, head), so the stages' ViT code (sin-cos position
embedding, layer decay, head/MLP pruning) applies unchanged.

Written here because no maintained library ships it (timm has no T2T-ViT). The paper's
``Token_transformer`` is a layer whose width changes (input ``dim`` -> ``token_dim``): its value
path replaces the residual. We scale attention by the per-head query width (the official code
uses the input width: same parameters, a different constant).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from selfsup.backbones.cfgs import timm_cfg

# (kernel, stride, padding) of each soft split: the paper's (7,4),(3,2),(3,2) at 224 px (stride 16,
# 14x14 tokens) and, for 32 px images, (3,2),(3,2),(3,1) (stride 4: 8x8 tokens, as a patch-4 ViT).
PAPER_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
SMALL_SPLITS = ((3, 2, 1), (3, 2, 1), (3, 1, 1))


class TokenTransformer(nn.Module):
    """A transformer layer from width ``dim`` to ``out_dim``: attention's value path is the residual."""

    def __init__(self, dim: int, out_dim: int, num_heads: int = 1, mlp_ratio: float = 1.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, out_dim * 3, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = v.transpose(1, 2).reshape(b, n, -1) + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class T2TEmbed(nn.Module):
    """The tokens-to-token module, with the interface of timm's ``PatchEmbed`` (``img_size``,
    ``patch_size`` = the total stride, ``grid_size``, ``num_patches``) so ``VisionTransformer`` takes it
    as its ``embed_layer``."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
        splits: tuple[tuple[int, int, int], ...] = PAPER_SPLITS,
        token_dim: int = 64,
        **_: object,  # PatchEmbed's other options (bias, dynamic padding) do not apply
    ):
        super().__init__()
        stride = math.prod(s for _, s, _ in splits)
        if patch_size is not None and to_2tuple(patch_size) != (stride, stride):
            raise ValueError(
                f"T2T-ViT's soft splits {splits} have total stride {stride}, not patch_size={patch_size}"
            )
        self.splits = tuple(tuple(s) for s in splits)
        self.img_size = to_2tuple(img_size)
        self.patch_size = (stride, stride)
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.unfolds = nn.ModuleList(nn.Unfold(k, stride=s, padding=p) for k, s, p in self.splits)
        widths = [in_chans * self.splits[0][0] ** 2] + [token_dim * k * k for k, _, _ in self.splits[1:]]
        self.layers = nn.ModuleList(TokenTransformer(w, token_dim) for w in widths[:-1])
        self.project = nn.Linear(widths[-1], embed_dim)

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        h, w = img_size
        for k, s, p in self.splits:
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.unfolds[0](x).transpose(1, 2)
        (h, w), sizes = (h, w), []
        for k, s, p in self.splits:
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            sizes.append((h, w))
        for layer, unfold, (gh, gw) in zip(self.layers, self.unfolds[1:], sizes):
            x = layer(x)  # re-structurize: tokens -> a 2-D map -> the next soft split
            x = unfold(x.transpose(1, 2).reshape(b, -1, gh, gw)).transpose(1, 2)
        return self.project(x)


def _cfg(**kwargs) -> dict:
    return timm_cfg(
        **{"crop_pct": 0.9, "first_conv": "patch_embed.unfolds.0", "classifier": "head", **kwargs}
    )


default_cfgs = generate_default_cfgs(
    {
        "t2t_vit_t_7": _cfg(),
        "t2t_vit_t_12": _cfg(),
        "t2t_vit_t_14": _cfg(),
        "t2t_vit_t_tiny": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    }
)


def _create(variant: str, pretrained: bool, defaults: dict, **kwargs) -> VisionTransformer:
    splits = tuple(tuple(s) for s in kwargs.pop("t2t_splits", defaults.pop("t2t_splits", PAPER_SPLITS)))
    token_dim = kwargs.pop("token_dim", defaults.pop("token_dim", 64))
    kwargs = {**defaults, **kwargs}
    kwargs.setdefault("patch_size", math.prod(s for _, s, _ in splits))
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        embed_layer=partial(T2TEmbed, splits=splits, token_dim=token_dim),
        **kwargs,
    )


# Sizes from the paper's table (T2T-ViT-7/12/14: width, depth, heads, MLP ratio; token_dim 64). The
# `_t` names are the official repo's for transformer layers in the T2T module; its default Performer
# layers (a linear-attention approximation, fewer MACs on the 3136 tokens at 224 px) are not built.
@register_model
def t2t_vit_t_7(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create(
        "t2t_vit_t_7", pretrained, dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0), **kwargs
    )


@register_model
def t2t_vit_t_12(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create(
        "t2t_vit_t_12", pretrained, dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0), **kwargs
    )


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create(
        "t2t_vit_t_14", pretrained, dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0), **kwargs
    )


@register_model
def t2t_vit_t_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CPU-sized, for 32 px images: the small ViT's width and depth after a stride-4 T2T module."""
    defaults = dict(
        img_size=32,
        embed_dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        t2t_splits=SMALL_SPLITS,
        token_dim=32,
    )
    return _create("t2t_vit_t_tiny", pretrained, defaults, **kwargs)
