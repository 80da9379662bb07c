"""Tent: only the norms' affine parameters move, entropy falls on a shifted batch, reset is exact."""

import torch
from torch import nn

from selfsup.models import BackboneSpec, create_backbone
from selfsup.tta.tent import Tent, softmax_entropy, vit_lr


def tiny_vit():
    torch.manual_seed(0)
    return create_backbone(
        BackboneSpec("vit_tiny_patch16_224", 32, 8, extra={"depth": 2, "embed_dim": 32, "num_heads": 2}), 10
    )


def shifted_batch(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g) * 2.0 + 0.7  # a distribution shift: scaled and offset


def test_softmax_entropy_equals_its_formula():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    p = logits.softmax(1)
    assert torch.allclose(softmax_entropy(logits), -(p * p.log()).sum(1))
    assert abs(softmax_entropy(logits)[0] - torch.log(torch.tensor(2.0))) < 1e-6


def test_tent_updates_only_the_norm_affine_parameters_and_lowers_entropy():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = shifted_batch()
    with torch.no_grad():
        entropy_before = softmax_entropy(model.eval()(x)).mean()
    tent = Tent(model, lr=vit_lr(len(x)) * 50)
    for _ in range(5):
        tent(x)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    norms = {
        f"{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, nn.LayerNorm)
        for p in ("weight", "bias")
    }
    assert changed and changed <= norms
    assert not model.training  # eval mode: no dropout or drop path during adaptation
    with torch.no_grad():
        assert softmax_entropy(model(x)).mean() < entropy_before


def test_reset_restores_the_original_weights_and_optimizer_exactly():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tent = Tent(model, lr=0.01)
    x = shifted_batch()
    first = tent(x)
    tent(x)
    tent.reset()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(tent(x), first)  # the same first step again: momentum buffers were reset too
