"""MoCo v3's recipe, piece by piece, against the formulas of the paper and the official code."""

import dataclasses
import math

import pytest
import torch
from conftest import REPO
from torch import nn

from selfsup.config import load_config
from selfsup.models import MOCO_V3_ARCHS, BackboneSpec, create_backbone, is_vit, sincos_pos_embed
from selfsup.schedules import scaled_lr
from selfsup.schedules import warmup_cosine as learning_rate
from selfsup.ssl.builder import MoCoV3, build_model, contrastive_loss, gather_keys
from selfsup.ssl.heads import predictor, projector
from selfsup.ssl.schedules import moco_momentum
from selfsup.ssl.settings import PretrainConfig, resolve_recipe
from selfsup.ssl.syncbn import AllReduceBatchNorm1d, convert_batchnorm
from selfsup.ssl.train import make_optimizer

TINY = BackboneSpec(
    "moco_vit_tiny",
    img_size=32,
    patch_size=8,
    frozen_patch_embed=True,
    extra={"depth": 1, "embed_dim": 32, "num_heads": 2},
)


def direct_ctr(q, k_all, T, rank):
    """-log softmax(q_i · k_j / T) at j = N·rank + i, averaged over i, times 2T: written out."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        qi = q[i] / q[i].norm()
        logits = [float(qi @ (k / k.norm())) / T for k in k_all]
        positive = logits[n * rank + i]
        total += -(positive - math.log(sum(math.exp(v) for v in logits)))
    return total / n * 2 * T


def test_contrastive_loss_is_the_scaled_cross_entropy_with_rank_offset_labels():
    torch.manual_seed(0)
    q, k_all = torch.randn(3, 5), torch.randn(6, 5)  # 2 simulated processes of 3 queries
    for rank in (0, 1):
        assert contrastive_loss(q, k_all, 0.2, rank).item() == pytest.approx(
            direct_ctr(q, k_all, 0.2, rank), rel=1e-5
        )


def test_two_simulated_ranks_average_to_the_one_process_loss():
    torch.manual_seed(1)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    single = contrastive_loss(q, k, 0.2, rank=0)
    per_rank = [contrastive_loss(q[r * 4 : (r + 1) * 4], k, 0.2, rank=r) for r in (0, 1)]
    assert torch.allclose(single, sum(per_rank) / 2, atol=1e-6)


def test_keys_are_gathered_as_is_in_a_single_process():
    k = torch.randn(4, 3)
    gathered, rank = gather_keys(k)
    assert rank == 0 and torch.equal(gathered, k)


@pytest.mark.parametrize("progress", [0.0, 3.5, 40.0, 41.25, 170.0, 299.99])
def test_learning_rate_is_linear_warmup_then_half_cosine(progress):
    peak = scaled_lr(1.5e-4, 4096)
    assert peak == pytest.approx(2.4e-3)
    if progress < 40:
        expected = peak * progress / 40
    else:
        expected = peak * 0.5 * (1 + math.cos(math.pi * (progress - 40) / 260))
    assert learning_rate(progress, peak, 40, 300) == pytest.approx(expected, abs=1e-15)
    assert learning_rate(170.0, peak, 40, 300) == pytest.approx(peak / 2)


def test_momentum_rises_from_m0_to_one_by_a_half_cosine_per_iteration():
    epochs, iters = 300, 1251
    for it in (0, 1, 10_000, 187_650, 375_299):
        progress = it // iters + (it % iters) / iters  # epoch + i / iters_per_epoch
        expected = 1 - 0.5 * (1 + math.cos(math.pi * it / (epochs * iters))) * (1 - 0.99)
        assert moco_momentum(progress, 0.99, epochs) == pytest.approx(expected, abs=1e-12)
    assert moco_momentum(150, 0.99, 300) == pytest.approx(0.995)
    assert moco_momentum(300, 0.99, 300) == pytest.approx(1.0)
    assert moco_momentum(150, 0.99, 300, cosine=False) == 0.99


def test_lightly_cosine_schedule_is_not_the_official_momentum_formula():
    """Why schedules.py does not use lightly: it divides by max_steps - 1."""
    from lightly.utils.scheduler import cosine_schedule

    assert cosine_schedule(50, 100, 0.99, 1.0) != pytest.approx(
        moco_momentum(50 / 100 * 300, 0.99, 300), abs=1e-7
    )


def test_vit_heads_follow_the_official_mlp_pattern():
    proj, pred = projector(384), predictor()
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in proj.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 4096), (4096, 4096), (4096, 256)]
    assert all(m.bias is None for m in linears)
    assert [n.affine for n in norms] == [True, True, False]
    assert [n.affine for n in pred.modules() if isinstance(n, nn.BatchNorm1d)] == [True, False]
    assert [(m.in_features, m.out_features) for m in pred.modules() if isinstance(m, nn.Linear)] == [
        (256, 4096),
        (4096, 256),
    ]
    assert sum(isinstance(m, nn.ReLU) for m in proj.modules()) == 2
    proj.eval()
    assert proj(torch.randn(2, 384)).shape == (2, 256)


def test_resnet_heads_have_two_projector_layers_and_no_final_predictor_bn():
    assert sum(isinstance(m, nn.Linear) for m in projector(2048, vit=False).modules()) == 2
    norms = [n for n in predictor(vit=False).modules() if isinstance(n, nn.BatchNorm1d)]
    assert [n.affine for n in norms] == [True]


def test_official_vit_init_treats_q_k_v_separately():
    model = create_backbone(dataclasses.replace(TINY, init="moco_v3"))
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (32 + 32))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and model.cls_token.std() < 1e-5


def one_step(model, optimizer, m=0.99):
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    loss = model(x1, x2, m)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_momentum_encoder_gets_no_gradient_and_moves_by_the_ema_formula():
    torch.manual_seed(0)
    model = MoCoV3(create_backbone(TINY), dim=16, mlp_dim=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    one_step(model, optimizer)  # make online and momentum weights differ
    online = [p.detach().clone() for p in model.base_encoder.parameters()]
    ema = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    one_step(model, optimizer, m=0.9)
    for before_online, before_ema, now in zip(online, ema, model.momentum_encoder.parameters()):
        assert now.grad is None and not now.requires_grad
        assert torch.allclose(now, 0.9 * before_ema + 0.1 * before_online, atol=1e-7)


def test_patch_projection_and_position_embedding_stay_fixed():
    torch.manual_seed(0)
    model = MoCoV3(create_backbone(TINY), dim=16, mlp_dim=32)
    backbone = model.backbone
    proj, pos = backbone.patch_embed.proj.weight.clone(), backbone.pos_embed.clone()
    block = backbone.blocks[0].mlp.fc1.weight.clone()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    for _ in range(3):
        one_step(model, optimizer)
    assert torch.equal(backbone.patch_embed.proj.weight, proj) and torch.equal(backbone.pos_embed, pos)
    assert torch.equal(pos, sincos_pos_embed((4, 4), 32))
    assert not torch.equal(backbone.blocks[0].mlp.fc1.weight, block)  # the rest does train


def test_allreduce_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    head = projector(8, 16, 4)
    converted = convert_batchnorm(projector(8, 16, 4), torch.device("cpu"))
    converted.load_state_dict(head.state_dict())
    assert any(isinstance(m, AllReduceBatchNorm1d) for m in converted.modules())
    x = torch.randn(6, 8)
    assert torch.allclose(head(x), converted(x), atol=1e-6)


def test_defaults_are_the_paper_recipe():
    c = PretrainConfig()
    assert resolve_recipe(c, vit=True) == "vit"
    assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.betas, c.optim.warmup_epochs) == (
        "adamw",
        1.5e-4,
        0.1,
        (0.9, 0.999),
        40,
    )
    assert (c.moco.temperature, c.moco.momentum, c.moco.dim, c.moco.mlp_dim) == (0.2, 0.99, 256, 4096)
    assert (c.epochs, c.batch_size, c.augment.min_scale) == (300, 4096, 0.08)
    assert c.model.frozen_patch_embed and c.model.pos_embed == "sincos" and c.model.arch == "moco_vit_small"


def test_convolutional_backbones_get_the_resnet_recipe_and_explicit_keys_win():
    c = load_config(PretrainConfig, None, ["model.arch=resnet18", "optim.base_lr=0.3"])
    model = build_model(c)
    assert (c.optim.name, c.optim.base_lr, c.optim.weight_decay, c.optim.warmup_epochs, c.optim.momentum) == (
        "lars",
        0.3,  # given: kept
        1e-6,
        10,
        0.9,
    )
    assert (c.moco.temperature, c.augment.min_scale, model.temperature) == (1.0, 0.2, 1.0)
    # ResNet heads (official MoCo_ResNet): 2-layer projector, predictor without the final BatchNorm
    linears = [m for m in model.base_encoder.projector.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    assert not isinstance(list(model.predictor.modules())[-1], nn.BatchNorm1d)


def test_lars_step_matches_the_update_rule():
    """LARS as built for convolutional backbones: weights get wd and the trust ratio
    0.001·||w|| / (||g|| + wd·||w||) (timm's form), then momentum; biases/norms plain momentum SGD."""
    c = load_config(PretrainConfig, None, ["model.arch=resnet18", "optim.weight_decay=0.01"])
    resolve_recipe(c, vit=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = make_optimizer(model, c)
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    w, b = model[0].weight, model[0].bias
    w0, b0 = w.detach().clone(), b.detach().clone()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    optimizer.step()
    trust = 0.001 * w0.norm() / (gw.norm() + 0.01 * w0.norm())
    assert torch.allclose(w, w0 - 0.5 * trust * (gw + 0.01 * w0), atol=1e-7)
    assert torch.allclose(b, b0 - 0.5 * gb, atol=1e-7)  # first step: momentum buffer = the gradient


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_gets_its_kinds_recipe(path):
    config = load_config(PretrainConfig, path)
    spec = config.model
    if spec.arch in MOCO_V3_ARCHS:  # one block is enough to check the ViT's options
        spec = BackboneSpec(**{**spec.to_dict(), "extra": {**spec.extra, "depth": 1}})
    vit = is_vit(create_backbone(spec))
    assert vit == (spec.arch in MOCO_V3_ARCHS or spec.arch.startswith("t2t_"))
    resolve_recipe(config, vit)
    assert config.optim.name == ("adamw" if vit else "lars")
