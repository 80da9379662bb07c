"""The seed's 2021 architectures as backbones: each builds at 32 px and its paper size, trains, counts
parameters and MACs within a stated tolerance of its paper's table, and survives a checkpoint round
trip (stock timm rebuilds it after ``import selfsup.architectures``), pretrains with MoCo v3 and goes
through the probe, fine-tuning and ONNX export. DynamicConv's per-sample
kernels equal a loop over samples; SkipNet's gates skip per sample and a skipped block costs nothing."""

import copy
import json
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

import selfsup.architectures  # noqa: F401
from selfsup.backbones.dynamic_conv import DynamicConv2d
from selfsup.backbones.hooks import auxiliary_losses, set_training_progress
from selfsup.backbones.skipnet import GatedBlock
from selfsup.checkpoint import CheckpointMeta, load_backbone, save_checkpoint, timm_call
from selfsup.flops import count_macs, count_params
from selfsup.models import BackboneSpec, create_backbone

SMALL = {  # the CPU-sized variant of each architecture, at 32 px
    "botnet": BackboneSpec("botnet_tiny", 32, pos_embed="learned"),
    "t2t_vit": BackboneSpec("t2t_vit_t_tiny", 32, pos_embed="sincos", init="moco_v3"),
    "dynamic_conv": BackboneSpec("dy_resnet_tiny", 32, pos_embed="learned"),
    "skipnet": BackboneSpec("skip_resnet38", 32, pos_embed="learned"),
}

# (model, img_size, paper params M, tolerance, paper MMACs, tolerance, source) for the paper-sized variants
PAPER = [
    # BoT50: 20.8M (paper, Table of BoT50 vs R50); MACs at 224 checked against timm's ResNet-50 below
    ("botnet50", 224, 20.8, 0.02, None, None),
    # T2T-ViT-7/12/14 (paper Table 2 / official README): 4.3M, 6.9M, 21.5M; T2T-ViT_t-14 6.1G MACs
    ("t2t_vit_t_7", 224, 4.3, 0.02, None, None),
    ("t2t_vit_t_12", 224, 6.9, 0.02, None, None),
    ("t2t_vit_t_14", 224, 21.5, 0.02, 6100, 0.02),
    # DY-ResNet-18 42.7M / 1.85G and DY-MobileNetV2 x1.0 11.1M / 312.9M (paper, ImageNet table). timm's
    # ResNet-18 has 11.7M parameters against the paper's 11.1M: 7% for the DY-ResNet's parameters.
    ("dy_resnet18", 224, 42.7, 0.07, 1850, 0.02),
    ("dy_mobilenetv2_100", 224, 11.1, 0.02, 312.9, 0.02),
    # CIFAR ResNet-110 (He et al.): 1.7M parameters, 253M MACs; SkipNet's gates add under 4%
    ("skip_resnet110", 32, 1.7, 0.04, 253, 0.02),
]


@pytest.mark.parametrize("kind", list(SMALL))
def test_small_variant_trains_and_round_trips(kind, tmp_path):
    spec = SMALL[kind]
    torch.manual_seed(0)
    model = create_backbone(spec, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    set_training_progress(model, 0.5)
    with auxiliary_losses(model) as aux:
        out = model(x)
        extra = aux.total()
    loss = out.logsumexp(1).mean()
    assert (extra is not None) == (kind == "skipnet")
    (loss + (extra if extra is not None else 0)).backward()
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), [
        n for n, p in model.named_parameters() if p.grad is None
    ]
    # checkpoint round trip: the project loader and stock timm (after the registering import) agree
    model.eval()
    meta = CheckpointMeta(
        backbone=spec.to_dict(),
        img_size=32,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        stage="finetune",
        num_classes=10,
        class_names=[str(i) for i in range(10)],
    )
    path = save_checkpoint(tmp_path / kind, model.state_dict(), meta, model)
    loaded, _ = load_backbone(path, num_classes=10)
    rebuilt = eval(timm_call(path), {"timm": timm}).eval()  # the line the sidecar documents
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(loaded.eval()(x), expected, atol=1e-5)
        assert torch.allclose(rebuilt(x), expected, atol=1e-5)


@pytest.mark.parametrize("name,size,params,p_tol,macs,m_tol", PAPER, ids=[p[0] for p in PAPER])
def test_paper_sized_variant_matches_the_papers_counts(name, size, params, p_tol, macs, m_tol):
    model = timm.create_model(name, num_classes=10 if size == 32 else 1000)
    assert count_params(model) / 1e6 == pytest.approx(params, rel=p_tol)
    x = torch.randn(1, 3, size, size)
    if name.startswith("skip_"):  # every gate open: the network the paper's count describes
        for block in model.gated_blocks():
            nn.init.constant_(block.gate[-1].weight, 0.0)
    counted = count_macs(model, x) / 1e6
    if macs is not None:
        assert counted == pytest.approx(macs, rel=m_tol)
    if name == "botnet50":  # c5 attention instead of 3x3 convolutions: ResNet-50's MACs within 5%
        assert counted == pytest.approx(count_macs(timm.create_model("resnet50"), x) / 1e6, rel=0.05)
    model.train()
    with auxiliary_losses(model) as aux:
        loss = model(torch.randn(2, 3, size, size)).sum()
        extra = aux.total()
    (loss if extra is None else loss + extra).backward()


def test_dynamic_conv_per_sample_kernels_equal_a_loop_over_samples():
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 6, 3, stride=2, padding=1, groups=2, bias=True)
    set_training_progress(layer, 10.0)  # temperature 1: sharp, sample-dependent attention
    x = torch.randn(5, 8, 9, 9) + 3 * torch.randn(5, 8, 1, 1)  # samples with their own channel means
    batched = layer(x)
    pi = layer.kernel_attention(x)
    assert not torch.allclose(pi[0], pi[1])
    for i in range(5):  # direct: this sample's weighted kernel in a plain convolution
        weight = torch.einsum("k,koihw->oihw", pi[i], layer.weight)
        bias = pi[i] @ layer.bias
        direct = nn.functional.conv2d(x[i : i + 1], weight, bias, 2, 1, 1, 2)
        assert torch.allclose(batched[i : i + 1], direct, atol=1e-5)


def test_dynamic_conv_temperature_anneals_from_30_to_1():
    layer = DynamicConv2d(4, 4, 1, anneal_epochs=10)
    for epochs, expected in [(0, 30.0), (5, 15.5), (10, 1.0), (20, 1.0)]:
        set_training_progress(layer, epochs)
        assert float(layer.temperature) == pytest.approx(expected)


def _set_gate(block: GatedBlock, is_open: bool) -> None:
    """A gate that ignores its input: always open or always closed."""
    with torch.no_grad():
        block.gate[4].weight.zero_()
        block.gate[4].bias.fill_(10.0 if is_open else -10.0)


def test_skipnet_gates_skip_per_sample_and_skipped_blocks_cost_nothing():
    torch.manual_seed(0)
    model = timm.create_model("skip_resnet38", num_classes=10).eval()
    blocks = model.gated_blocks()
    target = blocks[2]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.layers[:3](torch.relu(model.bn1(model.conv1(x))))
        pooled = h[:, 0].mean((1, 2))
        # a gate reading the first channel's mean: open above the two samples' midpoint, closed below
        target.gate[2].weight.zero_()
        target.gate[2].weight[0, 0] = 1.0
        target.gate[2].bias.zero_()
        target.gate[2].bias[0] = -pooled.mean()
        target.gate[4].weight.zero_()
        target.gate[4].weight[0, 0] = 1e4
        target.gate[4].bias.fill_(-1.0)
        p = target.open_probability(h)
        assert ((p > 0.5) == (pooled > pooled.mean())).all() and (p > 0.5).sum() == 1
        # per sample: each output equals that sample's run alone, a closed sample's its shortcut
        y = target(h)
        for i in range(2):
            alone = target.block(h[i : i + 1]) if p[i] > 0.5 else target.block.shortcut(h[i : i + 1])
            assert torch.allclose(y[i : i + 1], alone, atol=1e-6)
    # FLOPs: a closed block runs its gate only; an open one its convolutions too
    channels = target.block.conv1.in_channels
    closed, opened = GatedBlock(target.block, channels).eval(), GatedBlock(target.block, channels).eval()
    _set_gate(closed, False)
    _set_gate(opened, True)
    one = h[:1]
    gate_only = count_macs(closed.gate, one)
    assert gate_only > 0 and count_macs(closed, one) == gate_only
    assert count_macs(opened, one) == gate_only + count_macs(target.block, one)
    # the usage report: this block closed for both samples, the others as their gates decide
    for block in blocks:
        _set_gate(block, block is not target)
    model.reset_usage()
    with torch.no_grad():
        model(x)
    usage = model.usage(32)
    assert usage["executed_share"] == pytest.approx((len(blocks) - 1) / len(blocks))
    saved = count_macs(target.block, one)  # the skipped identity block's convolutions
    assert usage["macs_full"] - usage["macs_per_input"] == pytest.approx(saved, rel=1e-6)


def test_skipnet_training_gates_are_hard_forward_and_penalised():
    torch.manual_seed(0)
    model = timm.create_model("skip_resnet38", num_classes=10, skip_penalty=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    with auxiliary_losses(model) as aux:
        model(x)
        penalty = aux.total()
        assert penalty is not None and aux.total() is None  # taken once, then cleared
    penalty.backward()
    grads = [b.gate[4].weight.grad for b in model.gated_blocks()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # straight-through reaches the gates
    with torch.no_grad(), auxiliary_losses(model) as aux:
        model(x)
        assert aux.total() is None  # no gradients, nothing recorded (e.g. a momentum encoder)
    with torch.no_grad():
        model(x)  # ... so such a pass needs no scope


def _open_all_but(model: nn.Module, closed: int) -> float:
    """The first ``closed`` gates shut, the others open; the share of gated blocks executed."""
    blocks = model.gated_blocks()
    for i, block in enumerate(blocks):
        _set_gate(block, i >= closed)
    return (len(blocks) - closed) / len(blocks)


def test_skipnet_penalty_joins_the_classifier_step_loss():
    """Fine-tuning's and recovery's loss: the task's plus skip_penalty x the share executed (the
    value the drained side-effect list gave), with gradients through the straight-through gates."""
    from selfsup.classifier import ClassifierStep

    torch.manual_seed(0)
    model = timm.create_model("skip_resnet38", num_classes=10, skip_penalty=0.5).train()
    share = _open_all_but(model, 3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with auxiliary_losses(model) as aux:
        task = nn.functional.cross_entropy(model(x), y)
        aux.discard()
    step = ClassifierStep(SimpleNamespace(unwrap_model=lambda m: m), model, None, None)
    loss = step.loss(x, y)
    assert loss.item() == pytest.approx(task.item() + 0.5 * share, abs=1e-6)
    loss.backward()
    assert model.gated_blocks()[0].gate[4].bias.grad.abs().sum() > 0


def test_skipnet_penalty_joins_the_moco_loss(tmp_path):
    """Pretraining's loss: the base encoder's penalty only (the momentum encoder runs without gradients)."""
    from selfsup.config import load_config
    from selfsup.ssl.schedules import moco_momentum
    from selfsup.ssl.settings import PretrainConfig
    from selfsup.ssl.train import MocoStep, build_model

    config = load_config(PretrainConfig, None, [*MOCO_DIGITS, "model.arch=skip_resnet38", f"out={tmp_path}"])
    torch.manual_seed(0)
    moco = build_model(config).train()
    share = _open_all_but(moco.backbone, 2)
    reference = copy.deepcopy(moco)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    m = moco_momentum(0.0, config.moco.momentum, config.epochs, config.moco.momentum_cosine)
    with auxiliary_losses(reference) as aux:
        task = reference(x1, x2, m)
        aux.discard()
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), unwrap_model=lambda net: net, backward=torch.Tensor.backward
    )
    step = MocoStep(config, accelerator, moco, torch.optim.SGD(moco.parameters(), lr=0.0))
    loss, _ = step.forward((x1, x2), 0.0)
    assert loss.item() == pytest.approx(task.item() + moco.backbone.skip_penalty * share, abs=1e-5)


def test_a_forgotten_skipnet_penalty_is_an_error():
    model = timm.create_model("skip_resnet38", num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    outside = "training forward outside `with selfsup.backbones.hooks.auxiliary_losses"
    with pytest.raises(RuntimeError, match=outside):
        model(x)  # no scope to collect the penalty
    untaken = "SkipResNet recorded an auxiliary loss that was never taken"
    with pytest.raises(RuntimeError, match=untaken), auxiliary_losses(model):
        model(x)
    # an error inside the scope is the one reported, not hidden by the untaken term
    with pytest.raises(ValueError, match="the step's own error"), auxiliary_losses(model):
        model(x)
        raise ValueError("the step's own error")
    with auxiliary_losses(model) as aux:
        with pytest.raises(RuntimeError, match="cannot nest"), auxiliary_losses(model):
            pass
        model(x)
        assert aux.total() is not None
    model.eval()
    model(x)  # evaluation records nothing: no scope needed


def test_skipnet_has_timms_head_api():
    torch.manual_seed(0)
    model = timm.create_model("skip_resnet38", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"
    assert model.no_weight_decay() == set()  # timm's 1-D rule is all (the official code decays the rest)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        assert pooled.shape == (2, model.num_features) and torch.allclose(
            pooled, fmap.mean((2, 3)), atol=1e-6
        )
        assert torch.allclose(model(x), model.fc(pooled))
        model.reset_classifier(0)  # no head: the pooled features
        assert model(x).shape == (2, model.num_features) and torch.allclose(model(x), pooled)
        model.reset_classifier(5, "catavgmax")  # timm's pools: average and max side by side
        assert model.fc.in_features == model.head_hidden_size == 2 * model.num_features
        assert torch.allclose(
            model.forward_head(fmap, pre_logits=True), torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1)
        )
        model.reset_classifier(3)  # the pool is kept
        assert model.global_pool.pool_type == "catavgmax" and model(x).shape == (2, 3)
        model.reset_classifier(0, "")  # no pool: the feature map
        assert torch.equal(model(x), fmap)
    assert timm.create_model("skip_resnet38", global_pool="max").global_pool.pool_type == "max"


def test_skipnet_grad_checkpointing_recomputes_the_blocks_not_the_gates(monkeypatch):
    from selfsup.backbones import skipnet

    calls = []
    real = skipnet.checkpoint
    monkeypatch.setattr(skipnet, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    x = torch.randn(4, 3, 32, 32)
    runs = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("skip_resnet38", num_classes=10, drop_path_rate=0.2).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)  # the same drop-path masks, replayed by the recomputation
        with auxiliary_losses(model) as aux:
            out = model(x)
            penalty = aux.total()
        (out.logsumexp(1).mean() + penalty).backward()
        runs.append((out, penalty, [p.grad for p in model.parameters()]))
    assert len(calls) == 18  # each block once (the first and the 17 gated); each decision recorded once
    (out0, penalty0, grads0), (out1, penalty1, grads1) = runs
    assert torch.equal(out0, out1) and torch.equal(penalty0, penalty1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads0, grads1))


MOCO_DIGITS = [
    "dataset=digits",
    "batch_size=16",
    "epochs=1",
    "max_steps=3",
    "moco.dim=16",
    "moco.mlp_dim=32",
    "num_workers=0",
    "threads=1",
    "progress_bar=false",
    "resume=never",
    "model.img_size=32",
    "model.frozen_patch_embed=false",
    "augment.blur_sigmas=[0.1, 0.5]",
]


@pytest.mark.parametrize("kind", list(SMALL))
@pytest.mark.slow
def test_three_moco_v3_steps_on_digits_then_probe_and_finetune(kind, tmp_path):
    from selfsup.config import load_config
    from selfsup.ssl.settings import PretrainConfig
    from selfsup.ssl.train import train

    arch = SMALL[kind].arch
    config = load_config(PretrainConfig, None, [*MOCO_DIGITS, f"model.arch={arch}", f"out={tmp_path}"])
    result = train(config)
    assert result.status == "finished" and result.step == 3 and result.last_loss is not None
    assert torch.isfinite(torch.tensor(result.last_loss))
    recipe = "adamw" if kind == "t2t_vit" else "lars"  # the backbone's kind picks the recipe
    assert config.optim.name == recipe and config.moco.temperature == (0.2 if recipe == "adamw" else 1.0)
    loaded, meta = load_backbone(result.backbone)
    assert meta.spec.arch == arch and loaded.num_features > 0
    # the next stages take it: the kNN probe and fine-tuning (2 steps)
    from selfsup.eval import cli as probe_cli
    from selfsup.finetune.settings import FinetuneConfig
    from selfsup.finetune.train import train as finetune

    probe_cli.main(
        [
            "--checkpoint",
            str(result.backbone),
            "--dataset",
            "digits",
            "--method",
            "knn",
            "--out",
            str(tmp_path / "probe"),
        ]
    )
    knn = json.loads((tmp_path / "probe" / "metrics.json").read_text())["models"][0]["knn"]
    assert 0 <= knn["20"]["top1"] <= 100
    tuned = finetune(
        load_config(
            FinetuneConfig,
            None,
            [
                f"checkpoint={result.backbone}", "dataset=digits", "epochs=2", "optim.warmup_epochs=1",
                "max_steps=2", "batch_size=16", "num_workers=0", "threads=1", "progress_bar=false",
                f"out={tmp_path / 'finetune'}",
            ],
        )
    )  # fmt: skip
    assert tuned.status == "finished" and tuned.last is not None


@pytest.mark.parametrize("kind", list(SMALL))
def test_onnx_export_matches_torch_at_any_batch_size(kind, tmp_path):
    """The deployment path of the compression stage: SkipNet exports its dense form (every block
    runs, the gate selects), DynamicConv its K-output form (no batch size in the graph)."""
    from selfsup.compress.quantize import check_export, export_onnx

    torch.manual_seed(0)
    model = create_backbone(SMALL[kind], num_classes=10).eval()
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / f"{kind}.onnx")
    assert check_export(model, path, torch.randn(5, 3, 32, 32)) < 1e-4
