"""Backbones by name through ``timm.create_model``, with the MoCo v3 ViT specifics as options.

MoCo v3 (Chen, Xie & He, 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers") changes three things in a standard ViT, each an option here:

* a fixed 2-D sin-cos position embedding instead of a learned one (``pos_embed="sincos"``);
* ViT-S with 12 heads instead of timm's 6 (``num_heads=12``, see :data:`MOCO_V3_ARCHS`);
* a random, frozen patch projection (``frozen_patch_embed=True``);
* the official initialisation of ``vits.py`` (``init="moco_v3"``).

The init is part of the spec so that a random-init baseline built from a checkpoint's sidecar
starts from the same distribution the pretrained weights started from.

Backbones are created without a classifier (``num_classes=0``) unless asked; stages add heads.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import timm
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import init_weights_vit_moco
from torch import nn

import selfsup.architectures  # noqa: F401  (registers BoTNet, T2T-ViT, DynamicConv, SkipNet with timm)
from selfsup.config import setting
from selfsup.errors import UsageError

PosEmbed = Literal["learned", "sincos"]
Init = Literal["timm", "moco_v3"]

# Short names for the MoCo v3 architectures (official code: vits.py). ViT-S uses 12 heads there.
MOCO_V3_ARCHS: dict[str, dict[str, Any]] = {
    "moco_vit_small": {"arch": "vit_small_patch16_224", "num_heads": 12},
    "moco_vit_base": {"arch": "vit_base_patch16_224"},
    "moco_vit_tiny": {"arch": "vit_tiny_patch16_224"},  # CPU-sized: 192 wide, 3 heads
}


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone; recorded in every checkpoint's sidecar.

    ``arch`` is any ``timm`` model name or a key of :data:`MOCO_V3_ARCHS`. ``img_size`` and
    ``patch_size`` apply to ViTs (e.g. 32 and 4 for CIFAR-sized images). ``extra`` is passed to
    ``timm.create_model`` unchanged (e.g. ``{"depth": 6}`` for a shallower ViT).
    """

    arch: str = "moco_vit_small"
    img_size: int = setting(224, ge=1)
    patch_size: int | None = setting(None, ge=1)
    num_heads: int | None = setting(None, ge=1)
    pos_embed: PosEmbed = "sincos"
    frozen_patch_embed: bool = False
    init: Init = "timm"
    drop_path_rate: float = setting(0.0, ge=0, lt=1)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**data)


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def _timm_kwargs(spec: BackboneSpec) -> tuple[str, dict[str, Any]]:
    alias = MOCO_V3_ARCHS.get(spec.arch, {})
    name = alias.get("arch", spec.arch)
    kwargs: dict[str, Any] = {k: v for k, v in alias.items() if k != "arch"}
    if name.startswith(("vit_", "deit_")) or "vit" in name or "botnet" in name:  # fixed-size inputs
        kwargs["img_size"] = spec.img_size
        if spec.patch_size is not None:
            kwargs["patch_size"] = spec.patch_size
    if spec.num_heads is not None:
        kwargs["num_heads"] = spec.num_heads
    if spec.drop_path_rate:
        kwargs["drop_path_rate"] = spec.drop_path_rate
    kwargs.update(spec.extra)
    return name, kwargs


def patch_grid_problem(spec: BackboneSpec) -> str | None:
    """Why a ViT's ``img_size`` does not tile into whole patches (timm would drop the remainder
    silently), or None. The patch size is the spec's, else the one the timm name states (``patch16``)."""
    name, kwargs = _timm_kwargs(spec)
    found = re.search(r"patch(\d+)", name)
    patch = kwargs.get("patch_size") or (int(found.group(1)) if found else None)
    if "img_size" not in kwargs or not patch or spec.img_size % patch == 0:
        return None
    return (
        f"image size {spec.img_size} is not a multiple of {spec.arch}'s patch size {patch}: the patch grid "
        f"would drop the last {spec.img_size % patch} px; pick a size that is (e.g. {spec.img_size // patch * patch or patch})"
    )


def create_backbone(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
    """Build ``spec`` at random initialisation (weights come from selfsup checkpoints, never a hub)."""
    name, kwargs = _timm_kwargs(spec)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise UsageError(
            f"unknown architecture '{spec.arch}': not a timm model name nor one of "
            f"{', '.join(MOCO_V3_ARCHS)}" + (f" (similar: {', '.join(close)})" if close else "")
        )
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise UsageError(f"architecture '{name}' does not accept these options {kwargs}: {err}") from None
    if is_vit(model):
        if spec.init == "moco_v3":
            moco_v3_init(model)
        if spec.pos_embed == "sincos":
            set_sincos_pos_embed(model)
        if spec.frozen_patch_embed:
            if not hasattr(model.patch_embed, "proj"):
                raise UsageError(
                    f"frozen_patch_embed needs a patch projection; '{spec.arch}' embeds tokens another way: "
                    "set model.frozen_patch_embed=false"
                )
            freeze_patch_embed(model)
    elif spec.pos_embed == "sincos" and spec.arch in MOCO_V3_ARCHS:
        raise UsageError(f"pos_embed=sincos needs a ViT, '{spec.arch}' is not one")
    return model


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos embedding, shape (1, prefix + H*W, dim), zeros for prefix tokens.

    Per token at (row, col): [sin(row·w), cos(row·w), sin(col·w), cos(col·w)] with
    w_i = 10000^(-i / (dim/4)). timm's builder produces exactly this order with
    ``interleave_sin_cos=True`` (checked against the formula in the tests).
    """
    grid = build_sincos2d_pos_embed(list(grid_size), dim=dim, temperature=10000.0, interleave_sin_cos=True)
    prefix = torch.zeros(num_prefix_tokens, dim)
    return torch.cat([prefix, grid], dim=0).unsqueeze(0)


def set_sincos_pos_embed(model: nn.Module) -> None:
    """Replace a timm ViT's learned position embedding by the fixed sin-cos one (no gradient)."""
    pos = model.pos_embed
    grid = model.patch_embed.grid_size
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    with torch.no_grad():
        pos.copy_(sincos_pos_embed(grid, pos.shape[-1], prefix))
    pos.requires_grad_(False)


def freeze_patch_embed(model: nn.Module) -> None:
    """MoCo v3's random patch projection: Xavier-uniform over the flattened kernel, then frozen.

    Freezing the projection was the paper's fix for training instability (Sec. 4.2).
    """
    proj = model.patch_embed.proj
    fan = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3] + proj.weight.shape[0]
    bound = math.sqrt(6.0 / fan)
    with torch.no_grad():
        nn.init.uniform_(proj.weight, -bound, bound)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    for p in proj.parameters():
        p.requires_grad_(False)


def moco_v3_init(model: nn.Module) -> None:
    """The official ``vits.py`` initialisation: Q, K and V each Xavier-uniform (not the fused qkv
    matrix as one), other Linears Xavier-uniform, zero biases, then the CLS token N(0, 1e-6).

    The rule per Linear is timm's (``init_weights_vit_moco``, used here); what differs from timm's
    ``weight_init="moco"`` is only where the random draws fall, so one seed gives other values from
    the same distributions: timm draws at construction, instead of its default init, the position
    embedding and CLS token before the Linears; here (as ``vits.py``, which re-initialises a
    constructed timm ViT) the draws follow timm's default init, Linears first, CLS token last. Kept
    for that reason: checkpoints' random-init baselines rebuild the values their runs started from.

    One difference from ``vits.py``: its Xavier-uniform patch projection is drawn here only with
    ``frozen_patch_embed`` (:func:`freeze_patch_embed`, after this function, as in ``vits.py``);
    otherwise the projection keeps timm's construction-time convolution init.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            init_weights_vit_moco(module, name, needs_reset=False)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)


def timm_rebuild_args(
    model: nn.Module, spec: BackboneSpec, num_classes: int = 0
) -> tuple[str, dict[str, Any]]:
    """The timm model name and every constructor argument that shapes ``model``'s weights.

    Written into checkpoint sidecars so stock ``timm.create_model`` rebuilds the same network
    without this package: a MoCo v3 ViT-S has 12 heads where timm's ``vit_small_patch16_224`` has
    6 (same keys, same shapes, different outputs), so nothing may be left to timm's defaults.
    """
    name, kwargs = _timm_kwargs(spec)
    kwargs = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}  # training-only
    kwargs["num_classes"] = num_classes
    if is_vit(model):
        block = model.blocks[0]
        img = tuple(model.patch_embed.img_size)
        patch = tuple(model.patch_embed.patch_size)
        kwargs.update(
            img_size=img[0] if img[0] == img[1] else list(img),
            patch_size=patch[0] if patch[0] == patch[1] else list(patch),
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_heads=int(block.attn.num_heads),
            mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
            qkv_bias=block.attn.qkv.bias is not None,
            class_token=model.cls_token is not None,
            reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
            no_embed_class=bool(getattr(model, "no_embed_class", False)),
            global_pool=model.global_pool,
        )
    return name, kwargs


def timm_pretrained_cfg(
    name: str, num_classes: int, img_size: int, mean, std, crop_pct: float = 1.0, file: str | None = None
) -> dict[str, Any]:
    """A ``pretrained_cfg`` in timm's shape, for ``pretrained_cfg_overlay`` (``num_classes`` must
    match the model's, or timm loads non-strictly and would hide missing keys)."""
    cfg: dict[str, Any] = {
        "architecture": name,
        "num_classes": num_classes,
        "input_size": [3, img_size, img_size],
        "mean": list(mean),
        "std": list(std),
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "license": "see the producing run",
    }
    if file is not None:
        cfg["file"] = file
    return cfg
