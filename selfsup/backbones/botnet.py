"""BoTNet (Srinivas et al., 2021, "Bottleneck Transformers for Visual Recognition") from timm's blocks.

A ResNet whose last stage replaces each bottleneck's 3x3 convolution by multi-head self-attention
(4 heads, relative position logits along height and width; the strided first block pools 2x2 after
attention). timm builds it (``ByobNet`` with ``BottleneckAttn``); what this module adds is the
paper's BoT50 layout and a CPU-sized variant:

* ``botnet50``: ResNet-50's stages (3, 4, 6, 3), 7x7 stem and max pool, ReLU, self-attention in all
  three c5 blocks: the paper's BoT50. (timm's ``botnet50ts_256`` interleaves attention into c3-c5
  with SiLU and a tiered stem; ``botnet26t_256`` is a smaller hybrid. Both are usable by name too.)
* ``botnet_tiny``: for 32-64 px images. The paper's stem divides by 4 and c5 by 32, so at 32 px
  attention would see a single token; here a 3x3 stride-2 stem without pooling and three stages
  leave a 4x4 map (16 tokens) at 32 px and 8x8 at 64 px for the attention stage.

Self-attention with relative positions fixes the input size: pass ``img_size`` (the stages do, from
the model spec).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

from selfsup.backbones.cfgs import timm_cfg

MODEL_CFGS = {
    "botnet50": ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=3, c=256, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=4, c=512, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=6, c=1024, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=3, c=2048, s=2, gs=0, br=0.25),
        ),
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        fixed_input_size=True,
        self_attn_layer="bottleneck",
        self_attn_kwargs=dict(num_heads=4),
    ),
    "botnet_tiny": ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=96, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=2, c=192, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=2, c=384, s=2, gs=0, br=0.25),
        ),
        stem_chs=32,
        stem_type="3x3",
        stem_pool="",
        fixed_input_size=True,
        self_attn_layer="bottleneck",
        self_attn_kwargs=dict(num_heads=4),
    ),
}


def _cfg(**kwargs) -> dict:
    return timm_cfg(
        **{"fixed_input_size": True, "first_conv": "stem.conv", "classifier": "head.fc", **kwargs}
    )


default_cfgs = generate_default_cfgs(
    {"botnet50": _cfg(), "botnet_tiny": _cfg(input_size=(3, 32, 32), crop_pct=1.0)}
)


def _create(variant: str, pretrained: bool, **kwargs) -> ByobNet:
    return build_model_with_cfg(
        ByobNet,
        variant,
        pretrained,
        model_cfg=MODEL_CFGS[variant],
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


@register_model
def botnet50(pretrained: bool = False, **kwargs) -> ByobNet:
    """The paper's BoT50 (224 px by default)."""
    kwargs.setdefault("img_size", 224)
    return _create("botnet50", pretrained, **kwargs)


@register_model
def botnet_tiny(pretrained: bool = False, **kwargs) -> ByobNet:
    """CPU-sized BoTNet for 32-64 px images (32 px by default)."""
    kwargs.setdefault("img_size", 32)
    return _create("botnet_tiny", pretrained, **kwargs)
