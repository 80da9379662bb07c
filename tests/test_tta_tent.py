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


def _layer_norms(model):
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in (m.weight, m.bias)]


def test_tent_adam_takes_the_reference_cifar_step_written_out():
    """optimizer="adam" (Tent's CIFAR setting): two steps equal Adam's update written out by hand on the
    gradients of the mean entropy (bias-corrected moments, betas 0.9 / 0.999, eps 1e-8, no decay), to
    float rounding (1e-6; each update is ~1e-3)."""
    model, x, lr = tiny_vit(), shifted_batch(), 1e-3
    reference = tiny_vit().eval()  # the same weights, stepped by hand
    adapted, by_hand = _layer_norms(model), _layer_norms(reference)
    start = [p.detach().clone() for p in by_hand]
    m1 = [torch.zeros_like(p) for p in by_hand]
    m2 = [torch.zeros_like(p) for p in by_hand]
    tent = Tent(model, lr=lr, optimizer="adam")
    for t in (1, 2):
        grads = torch.autograd.grad(softmax_entropy(reference(x)).mean(), by_hand)
        with torch.no_grad():
            for i, g in enumerate(grads):
                m1[i] = 0.9 * m1[i] + 0.1 * g
                m2[i] = 0.999 * m2[i] + 0.001 * g * g
                by_hand[i] -= lr * (m1[i] / (1 - 0.9**t)) / ((m2[i] / (1 - 0.999**t)).sqrt() + 1e-8)
        tent(x)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(adapted, by_hand))
    assert max((p - s).abs().max().item() for p, s in zip(adapted, start)) > 1e-3  # it moved
