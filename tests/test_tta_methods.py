"""ETA/EATA, SAR, MEMO and the shared adapter base, each against a direct computation."""

import copy
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
from selfsup.tta.sar import SAM, SAR, frozen_prefixes, sar_lr
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


# --- SAR against a direct restatement of the reference step (mr-eggplant/SAR: sar.py, sam.py) --------


class ReferenceSAM(torch.optim.Optimizer):
    """davda54/sam as SAR's reference uses it (sam.py, non-adaptive): SGD with momentum inside, sharing
    its param groups; ``first_step`` saves w and climbs, ``second_step`` puts w back and steps."""

    def __init__(self, params, lr, rho=0.05):
        super().__init__(params, {"rho": rho, "lr": lr, "momentum": 0.9})
        self.base_optimizer = torch.optim.SGD(self.param_groups, lr=lr, momentum=0.9)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack(
                [p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]
            ),
            p=2,
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * scale.to(p))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


class ReferenceSAR:
    """sar.py's SAR.forward and forward_and_adapt_sar restated: both forwards on the whole batch, the
    first filter applied to the second pass, the EMA of the second loss, and a recovery that reloads the
    model and the SAM optimizer's state (not the inner SGD's momentum) and keeps the EMA. ``bound``
    stands for the reference's literal 0.2."""

    def __init__(self, model, params, lr, margin, bound):
        self.model, self.margin, self.bound, self.ema = model, margin, bound, None
        self.optimizer = ReferenceSAM(params, lr)
        self.saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    @torch.enable_grad()
    def __call__(self, x):
        self.optimizer.zero_grad()
        outputs = self.model(x)
        entropys = softmax_entropy(outputs)
        filter_ids_1 = torch.where(entropys < self.margin)
        entropys[filter_ids_1].mean(0).backward()
        self.optimizer.first_step()
        entropys2 = softmax_entropy(self.model(x))[filter_ids_1]
        loss_second = entropys2[torch.where(entropys2 < self.margin)].mean(0)
        if not np.isnan(loss_second.item()):
            self.ema = (
                loss_second.item() if self.ema is None else 0.9 * self.ema + (1 - 0.9) * loss_second.item()
            )
        loss_second.backward()
        self.optimizer.second_step()
        if self.ema is not None and self.ema < self.bound:
            self.model.load_state_dict(self.saved[0], strict=True)
            self.optimizer.load_state_dict(self.saved[1])
        return outputs.detach()


def tiny_resnet(classes=10):
    """A timm ResNet at 32 px: its last stage sees 1x1 maps, where BatchNorm needs two samples."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=classes)


def sar_pair(make, lr=0.05, coeff=1.0, bound=0.0):
    """The project's SAR and the restated reference on two copies of one model, adapting the same
    parameters (by name) from the same weights."""
    model = make()
    reference_model = copy.deepcopy(model)
    sar = SAR(model, lr, e_margin_coeff=coeff, reset_below=bound)
    names = [n for n, p in model.named_parameters() if any(p is q for q in sar.params)]
    reference_model.train().requires_grad_(False)  # the reference's configure_model
    for module in reference_model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
    lookup = dict(reference_model.named_parameters())
    params = [lookup[n].requires_grad_(True) for n in names]
    return sar, ReferenceSAR(reference_model, params, lr, sar.e_margin, bound)


def assert_same_steps(sar, reference, batches, atol=1e-6):
    for x in batches:
        ours, theirs = sar(x), reference(x)
        assert torch.allclose(ours, theirs, atol=atol)
        ours_state, theirs_state = sar.model.state_dict(), reference.model.state_dict()
        assert all(torch.allclose(ours_state[k], theirs_state[k], atol=atol) for k in ours_state)
        assert (sar.loss_ema is None) == (reference.ema is None)
        assert reference.ema is None or sar.loss_ema == pytest.approx(reference.ema, abs=1e-6)


def entropies(model, x):
    with torch.no_grad():
        return softmax_entropy(copy.deepcopy(model)(x))


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit], ids=["batchnorm", "layernorm"])
def test_sar_steps_as_the_reference_with_some_samples_reliable(make):
    sar, reference = sar_pair(make)
    x = batch(8, 3)
    sar.e_margin = reference.margin = float(entropies(reference.model, x).median())  # about half reliable
    assert_same_steps(sar, reference, [x, batch(8, 4), batch(8, 5)])
    assert 0 < sar.kept < 24


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit], ids=["batchnorm", "layernorm"])
def test_sar_steps_as_the_reference_with_one_reliable_sample(make):
    """One reliable sample: the second pass still sees the whole batch (a BatchNorm layer on a 1x1 map
    of one sample would raise), then keeps that sample."""
    sar, reference = sar_pair(make)
    x = batch(6, 7)
    lowest = entropies(reference.model, x).sort().values
    sar.e_margin = reference.margin = float(lowest[:2].mean())  # between the lowest two
    assert_same_steps(sar, reference, [x])
    assert sar.kept <= 1 and sar.forwards == 2


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit], ids=["batchnorm", "layernorm"])
def test_sar_recovery_keeps_the_momentum_as_the_reference(make):
    """A recovery after the first step (any loss is below the bound), then a step without one: the
    reference's first step after a recovery carries the momentum of the steps before it."""
    sar, reference = sar_pair(make, bound=100.0)
    assert_same_steps(sar, reference, [batch(8, 1)])
    assert sar.recoveries == 1
    momentum = [sar.optimizer.state[p]["momentum_buffer"] for p in sar.params]
    assert any(bool(m.abs().sum() > 0) for m in momentum)  # kept through the recovery
    sar.reset_below = reference.bound = 0.0
    assert_same_steps(sar, reference, [batch(8, 2)])
    sar.reset()
    assert not sar.optimizer.state  # reset() (a new corruption) empties it, as a fresh reference optimizer


def test_sar_doubles_the_default_lr_at_batch_size_1_only():
    assert sar_lr(None, 1) == pytest.approx(2 * 0.001 / 64)
    assert sar_lr(None, 64) == pytest.approx(0.001) and sar_lr(None, 16) == pytest.approx(0.001 / 4)
    assert sar_lr(0.01, 1) == 0.01  # a given lr is taken as it is
