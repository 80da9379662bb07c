"""ETA/EATA, SAR, MEMO and the shared adapter base, each against a direct computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.models import BackboneSpec, create_backbone
from selfsup.tta.adapter import NormStats, Source, entropy_margin, norm_affine_parameters, softmax_entropy
from selfsup.tta.eata import EATA, fisher_information
from selfsup.tta.memo import MEMO, marginal_entropy
from selfsup.tta.sar import SAM, SAR, frozen_prefixes
from selfsup.tta.tent import Tent

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_vit(depth=4, classes=10):
    torch.manual_seed(0)
    spec = BackboneSpec(
        "vit_tiny_patch16_224", 32, 8, extra={"depth": depth, "embed_dim": 32, "num_heads": 2}
    )
    return create_backbone(spec, classes)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 2.0 + 0.7


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ADAPTERS = {
    "tent": lambda m: Tent(m, lr=0.05),
    "eta": lambda m: EATA(m, 0.05, e_margin_coeff=1.0, d_margin=1.0),
    "eata": lambda m: EATA(m, 0.05, e_margin_coeff=1.0, d_margin=1.0, clean_batches=[batch(8, 5)]),
    "sar": lambda m: SAR(m, 0.05, e_margin_coeff=1.0, reset_below=0.0),
    "memo": lambda m: MEMO(m, MEAN, STD, lr=1e-3, views=4),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_reset_restores_the_original_weights_and_replays_exactly(name):
    model = tiny_vit()
    before = state(model)
    adapter = ADAPTERS[name](model)
    x, y = batch(), batch(seed=1)
    adapter(x)
    second = adapter(y)  # depends on the first step (and its momentum)
    adapter.reset()
    assert same(state(model), before)
    if name != "memo":  # MEMO's views are seeded by the image's position in the stream
        adapter(x)
        assert torch.equal(adapter(y), second)


def test_the_entropy_methods_change_the_model_and_count_their_passes():
    for name in ("tent", "eta", "eata", "sar"):
        model = tiny_vit()
        before = state(model)
        adapter = ADAPTERS[name](model)
        adapter(batch())
        assert not same(state(model), before), name
        assert adapter.forwards >= 1 and adapter.backwards >= 1
    source = Source(tiny_vit())
    source(batch())
    assert (source.forwards, source.backwards) == (1, 0)


def test_the_entropy_margin_is_a_share_of_ln_c():
    assert entropy_margin(1000) == pytest.approx(0.4 * math.log(1000))
    assert entropy_margin(10, 0.7) == pytest.approx(0.7 * math.log(10))


def test_eata_keeps_reliable_non_redundant_samples_and_weights_them_by_their_entropy():
    model = tiny_vit()
    eata = EATA(model, 0.0, e_margin_coeff=0.4, d_margin=0.5)
    logits = torch.tensor([[8.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0.0] * 10, [0, 9.0, 0, 0, 0, 0, 0, 0, 0, 0]])
    kept, _ = eata.select(logits)
    assert kept.tolist() == [0, 2]  # the uniform prediction (entropy ln 10) is unreliable
    eata.mean_probs = F.one_hot(torch.tensor(0), 10).float()  # the past: always class 0
    kept, _ = eata.select(logits)
    assert kept.tolist() == [2]  # a prediction like the past mean is redundant
    # the loss of one step: mean over kept samples of E / exp(E - E0)
    x = batch(4)
    eata = EATA(tiny_vit(), 0.0, e_margin_coeff=1.0, d_margin=1.0)
    with torch.no_grad():
        e = softmax_entropy(eata.model(x))
    expected = (e * torch.exp(eata.e_margin - e)).mean()
    seen = {}
    eata.backward = lambda loss: seen.setdefault("loss", loss.detach())
    eata(x)
    assert torch.allclose(seen["loss"], expected, atol=1e-6)


def test_eata_fisher_is_the_mean_squared_gradient_of_the_pseudo_label_loss():
    model = tiny_vit().eval()
    params = norm_affine_parameters(model)
    batches = [batch(4, 1), batch(4, 2)]
    fishers = fisher_information(model, params, batches)
    expected = [torch.zeros_like(p) for p in params]
    for x in batches:
        logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params)
        for e, g in zip(expected, grads):
            e += g**2 / len(batches)
    assert all(torch.allclose(f, e) for f, e in zip(fishers, expected))
    eata = EATA(model, 0.0, clean_batches=batches)
    assert eata.name == "eata" and float(eata.anti_forgetting().detach()) == 0.0  # at the anchor


def test_sar_skips_the_last_quarter_of_the_blocks_and_the_final_norm():
    assert frozen_prefixes(tiny_vit(depth=12)) == (
        "norm.",
        "fc_norm.",
        "blocks.9.",
        "blocks.10.",
        "blocks.11.",
    )
    assert frozen_prefixes(tiny_vit(depth=4))[2:] == ("blocks.3.",)
    model = tiny_vit(depth=4)
    sar = SAR(model, 0.01)
    names = {n for n, p in model.named_parameters() if any(p is q for q in sar.params)}
    assert names and all(n.startswith(("blocks.0.", "blocks.1.", "blocks.2.")) for n in names)
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.LayerNorm) for n in names)


def test_sar_filter_drops_high_entropy_samples_and_takes_no_step_without_reliable_ones():
    model = tiny_vit()
    before = state(model)
    sar = SAR(model, 0.05, e_margin_coeff=0.01)  # nothing is that confident
    sar(batch())
    assert same(state(model), before) and sar.backwards == 0 and sar.kept == 0
    sar = SAR(tiny_vit(), 0.05, e_margin_coeff=1.0)  # everything is reliable (entropy < ln C)
    sar(batch())
    assert sar.kept == 16 and sar.backwards == 2 and sar.forwards == 2


def test_sar_recovery_restores_the_saved_state_when_the_loss_ema_falls_below_the_bound():
    model = tiny_vit()
    before = state(model)
    sar = SAR(model, 0.05, e_margin_coeff=1.0, reset_below=100.0)  # any loss is "collapsed"
    sar(batch())
    assert sar.recoveries == 1 and same(state(model), before)
    assert sar.loss_ema is not None  # kept through a recovery (the reference's), cleared by reset()
    sar.reset()
    assert sar.loss_ema is None


def test_sam_steps_from_the_weights_with_the_gradient_at_the_perturbed_point():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    loss_fn = lambda v: (v**3).sum()  # noqa: E731
    sam = SAM([w], torch.optim.SGD([w], lr=0.1), rho=0.05)
    loss_fn(w).backward()
    g = 3 * torch.tensor([1.0, -2.0]) ** 2
    sam.ascend()
    climbed = torch.tensor([1.0, -2.0]) + 0.05 * g / g.norm()
    assert torch.allclose(w.detach(), climbed)
    loss_fn(w).backward()
    sam.descend()
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 * 3 * climbed**2)


def test_memo_marginal_entropy_and_weights_unchanged_from_one_sample_to_the_next():
    logits = torch.randn(5, 10)
    p = logits.softmax(1).mean(0)
    assert torch.allclose(marginal_entropy(logits), -(p * p.log()).sum(), atol=1e-6)
    model = tiny_vit()
    before = state(model)
    memo = MEMO(model, MEAN, STD, lr=1e-2, views=4)
    seen = []
    original_forward = memo.forward

    def forward(x):  # the weights each view batch and each prediction sees
        seen.append((len(x), state(model)))
        return original_forward(x)

    memo.forward = forward
    out = memo(batch(3))
    assert out.shape == (3, 10) and same(state(model), before)
    views = [s for n, s in seen if n == 4]
    predictions = [s for n, s in seen if n == 1]
    assert len(views) == 3 and all(same(s, before) for s in views)  # every sample starts from the original
    assert not same(predictions[0], before)  # ... and predicts with its own adapted weights
    assert memo.backwards == 3


def test_memo_views_are_seeded_by_the_image_position():
    a = MEMO(tiny_vit(), MEAN, STD, views=3, seed=1)
    b = MEMO(tiny_vit(), MEAN, STD, views=3, seed=1)
    raw = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    views = a.augmented_views(raw, 32)
    assert views.shape == (3, 3, 32, 32) and torch.equal(views, b.augmented_views(raw, 32))
    b.index = 1
    assert not torch.equal(views, b.augmented_views(raw, 32))
    assert a.augmented_views(raw, 64).shape == (3, 3, 64, 64)  # views at the image's size, then resized


def test_norm_statistics_need_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        NormStats(tiny_vit())
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    cnn(torch.randn(2, 3, 8, 8))
    adapter = NormStats(cnn.eval())
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    h = cnn[0](x)
    expected = cnn[3](cnn[2](F.batch_norm(h, None, None, cnn[1].weight, cnn[1].bias, training=True)))
    assert torch.allclose(adapter(x), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["tent", "eata", "sar", "memo"])
def test_a_skipnet_adapts_with_its_gates_in_eval_mode(name):
    """Test-time mode keeps SkipNet's gates in eval mode: they skip per sample and record no training
    penalty, so the adapters need no auxiliary_losses() scope (a training forward would raise)."""
    torch.manual_seed(0)
    model = create_backbone(BackboneSpec("skip_resnet38", 32, pos_embed="learned"), 10)
    before = state(model)
    adapter = ADAPTERS[name](model)
    adapter(batch(4))
    assert not any(block.training for block in model.gated_blocks())
    assert adapter.backwards >= 1 and (name == "memo" or not same(state(model), before))
