"""Backbone factory: MoCo v3 ViT specifics and the feature API."""

import math

import pytest
import timm
import torch
from timm.layers import trunc_normal_
from torch import nn

from selfsup.errors import UsageError
from selfsup.features import extract, feature_dim_for
from selfsup.models import (
    BackboneSpec,
    create_backbone,
    moco_v3_init,
    set_sincos_pos_embed,
    sincos_pos_embed,
)

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 4}


def test_sincos_pos_embed_matches_the_formula():
    dim, h, w = 16, 3, 5
    pos = sincos_pos_embed((h, w), dim)[0]
    assert pos.shape == (1 + h * w, dim) and torch.all(pos[0] == 0)
    quarter = dim // 4
    omega = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    for token, (row, col) in enumerate((r, c) for r in range(h) for c in range(w)):
        expected = (
            [math.sin(row * o) for o in omega]
            + [math.cos(row * o) for o in omega]
            + [math.sin(col * o) for o in omega]
            + [math.cos(col * o) for o in omega]
        )
        assert torch.allclose(pos[1 + token], torch.tensor(expected), atol=1e-6)


def test_moco_vit_small_has_12_heads_and_fixed_sincos():
    model = create_backbone(BackboneSpec("moco_vit_small", img_size=32, patch_size=4, extra={"depth": 1}))
    assert model.blocks[0].attn.num_heads == 12 and model.num_features == 384
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed, sincos_pos_embed((8, 8), 384))


def test_frozen_patch_embed_is_uniform_within_the_xavier_bound_and_has_no_grad():
    model = create_backbone(
        BackboneSpec("vit_small_patch16_224", img_size=32, patch_size=4, frozen_patch_embed=True, extra=TINY)
    )
    weight = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 32))
    assert not weight.requires_grad and weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert torch.all(model.patch_embed.proj.bias == 0)


def test_moco_v3_init_is_timms_moco_rule_with_the_draws_of_vits_py():
    """What the docstring of ``moco_v3_init`` says differs from timm's ``weight_init="moco"``: only
    where the random draws fall (the rule per Linear is timm's), so one seed gives other values."""
    spec = BackboneSpec("vit_small_patch16_224", img_size=32, patch_size=8, init="moco_v3", extra=TINY)
    name, kwargs = spec.arch, dict(img_size=32, patch_size=8, num_classes=0, **TINY)
    linears = {f"{n}.weight" for n, m in create_backbone(spec).named_modules() if isinstance(m, nn.Linear)}

    # the same seed, every parameter: only the Linear weights and the CLS token differ (biases zero,
    # norms, the sin-cos table and the patch projection's construction-time init are equal)
    torch.manual_seed(0)
    ours = create_backbone(spec).state_dict()
    torch.manual_seed(0)
    theirs = timm.create_model(name, weight_init="moco", **kwargs)
    set_sincos_pos_embed(theirs)
    theirs = theirs.state_dict()
    assert ours.keys() == theirs.keys()
    assert {k for k in ours if not torch.equal(ours[k], theirs[k])} == linears | {"cls_token"}

    # timm's moco pass draws the position embedding and the CLS token, then the Linears: consuming
    # those two draws first, ours gives timm's Linear weights bit for bit
    def after_default_init(init) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs)
        torch.manual_seed(1)
        init(model)
        return model.state_dict()

    def timm_draws_first(model: nn.Module) -> None:
        trunc_normal_(torch.empty_like(model.pos_embed), std=0.02)
        torch.empty_like(model.cls_token).normal_(std=1e-6)
        moco_v3_init(model)

    timm_pass = after_default_init(lambda model: model.init_weights("moco", needs_reset=False))
    ours_pass = after_default_init(moco_v3_init)
    aligned = after_default_init(timm_draws_first)
    assert all(torch.equal(aligned[k], timm_pass[k]) for k in linears)
    assert not any(torch.equal(ours_pass[k], timm_pass[k]) for k in linears)


@pytest.mark.parametrize("kind,width", [("cls", 32), ("patch_mean", 32), ("cls_last2", 64)])
def test_feature_kinds(kind, width):
    model = create_backbone(
        BackboneSpec("vit_small_patch16_224", img_size=32, patch_size=8, extra=TINY)
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = extract(model, x, kind)
        tokens = model.forward_features(x)
    assert feats.shape == (3, width) == (3, feature_dim_for(model, kind))
    if kind == "cls":
        assert torch.allclose(feats, tokens[:, 0])
    if kind == "patch_mean":
        assert torch.allclose(feats, tokens[:, 1:].mean(1))
    if kind == "cls_last2":  # the last block's normed CLS is forward_features' CLS
        assert torch.allclose(feats[:, 32:], tokens[:, 0], atol=1e-5)


def test_non_vit_backbones_offer_pooled_features_only():
    model = create_backbone(BackboneSpec("resnet18", pos_embed="learned")).eval()
    with torch.no_grad():
        assert extract(model, torch.randn(2, 3, 64, 64), "cls").shape == (2, 512)
    with pytest.raises(UsageError, match="needs a ViT"):
        extract(model, torch.randn(2, 3, 64, 64), "patch_mean")


def test_unknown_architecture_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown architecture 'vit_smal'"):
        create_backbone(BackboneSpec("vit_smal"))
