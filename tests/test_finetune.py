"""The fine-tuning stage: classifier from a checkpoint, the recipe's formulas, whole runs, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import REPO, two_gloo_processes

from selfsup.accel import make_accelerator
from selfsup.checkpoint import CheckpointMeta, load_backbone, load_checkpoint, read_meta, save_checkpoint
from selfsup.config import load_config
from selfsup.data import build_dataset
from selfsup.distill import distillation_loss, hard_distillation, hinton_kd
from selfsup.finetune import cli
from selfsup.finetune.model import build_start
from selfsup.finetune.settings import FinetuneConfig
from selfsup.finetune.train import _criterion, _mixup, finetune_step, lr_at, param_groups, train
from selfsup.models import BackboneSpec, create_backbone
from selfsup.runstate import complete_checkpoints

TINY = [
    "dataset=synthetic",
    "synthetic_size=64",
    "batch_size=16",
    "epochs=3",
    "seed=3",
    "drop_path=0.1",
    "optim.warmup_epochs=1",
    "optim.base_lr=0.01",
    "num_workers=0",
    "threads=1",
    "progress_bar=false",
    "resume=never",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SPEC = BackboneSpec(
    arch="moco_vit_tiny",
    img_size=32,
    patch_size=8,
    pos_embed="sincos",
    frozen_patch_embed=True,
    init="moco_v3",
    extra={"depth": 2, "embed_dim": 64, "num_heads": 2},
)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A pretraining export in the project format (weights at random, as a fresh pretrain's)."""
    torch.manual_seed(0)
    model = create_backbone(SPEC)
    meta = CheckpointMeta(
        backbone=SPEC.to_dict(), img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), stage="pretrain"
    )
    path = tmp_path_factory.mktemp("pretrain") / "backbone"
    return save_checkpoint(path, model.state_dict(), meta, model)


def config(tmp_path, *extra):
    return load_config(FinetuneConfig, None, [*TINY, f"out={tmp_path}", *extra])


def info(cfg):
    return build_dataset(cfg.dataset, "train", None, synthetic_size=64)[1]


def evals(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "event" not in r]


# --- the classifier to fine-tune ---------------------------------------------------------------


@pytest.mark.parametrize("img_size, patch", [(32, 8), (48, 8), (32, 4)])
def test_a_checkpoint_becomes_a_classifier_at_its_own_or_another_resolution(
    backbone, tmp_path, img_size, patch
):
    cfg = config(tmp_path, f"checkpoint={backbone}", f"img_size={img_size}", f"patch_size={patch}")
    start = build_start(cfg, info(cfg))
    state, _ = load_checkpoint(backbone)
    own = start.model.state_dict()
    assert start.model.num_classes == 4 and start.parent_sha256 == read_meta(backbone).weights_sha256
    assert torch.equal(own["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])
    grid = img_size // patch
    assert own["pos_embed"].shape == (1, 1 + grid * grid, 64)
    if patch == 8:
        assert torch.allclose(own["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    else:  # the patch projection is resampled to the new patch size (timm's resample_patch_embed)
        assert own["patch_embed.proj.weight"].shape[-1] == 4
    # the sin-cos table is rebuilt for the new grid, not interpolated
    fresh = create_backbone(BackboneSpec(**{**SPEC.to_dict(), "img_size": img_size, "patch_size": patch}))
    assert torch.allclose(own["pos_embed"], fresh.state_dict()["pos_embed"])
    # everything trains; the new head starts small (MAE's truncated normal) with zero bias
    assert all(p.requires_grad for p in start.model.parameters())
    assert own["head.weight"].abs().max() < 1e-4 and not own["head.bias"].any()
    assert start.spec.pos_embed == "learned" and not start.spec.frozen_patch_embed


def test_random_init_is_the_checkpoints_architecture_with_other_weights(backbone, tmp_path):
    cfg = config(tmp_path, f"checkpoint={backbone}", "random_init=true")
    start = build_start(cfg, info(cfg))
    state, _ = load_checkpoint(backbone)
    own = start.model.state_dict()
    assert {k for k in own if not k.startswith("head")} == set(state)
    assert not torch.equal(own["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert start.parent_sha256 == ""


# --- the recipe's formulas ------------------------------------------------------------------------


def _step(cfg, model, **kw):
    accelerator = make_accelerator("no")
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    return finetune_step(cfg, accelerator, model, optimizer, _mixup(cfg, 4), _criterion(cfg), **kw)


def _layer_of(name: str, depth: int) -> int:
    """MAE's rule read directly: embeddings 0, block i -> i + 1, the head depth + 1 (lr scale 1).
    timm groups the final norm with the last block (MAE gives it scale 1; a one-tensor difference)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return depth
    return depth + 1


def test_layer_decay_groups_get_their_scaled_lr_from_the_schedule(tmp_path):
    cfg = config(
        tmp_path, "model=vit_tiny_patch16_224", "optim.layer_decay=0.5", "augment.mixup=0", "augment.cutmix=0"
    )
    model = create_backbone(
        BackboneSpec("vit_tiny_patch16_224", 32, 8, extra={"depth": 3, "embed_dim": 32, "num_heads": 2}), 4
    )
    step = _step(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,)))
    for progress in (0.25, 1.5, 2.9):
        step.forward(batch, progress)
        lr, _ = lr_at(cfg, progress)
        for group in step.optimizer.param_groups:
            layers = {_layer_of(names[id(p)], 3) for p in group["params"]}
            assert len(layers) == 1
            assert group["lr"] == pytest.approx(lr * 0.5 ** (3 + 1 - layers.pop()))
    # weight decay: none on 1-D parameters nor the position embedding
    for group in step.optimizer.param_groups:
        for p in group["params"]:
            no_decay = p.ndim <= 1 or names[id(p)] in ("pos_embed", "cls_token")
            assert (group["weight_decay"] == 0) == no_decay


def test_warmup_then_cosine_to_min_lr(tmp_path):
    cfg = config(
        tmp_path, "model=x", "epochs=10", "optim.warmup_epochs=2", "optim.min_lr=1e-5", "batch_size=256"
    )
    peak = 0.01 * 256 / 512  # TINY: optim.base_lr=0.01, per 512 images
    assert lr_at(cfg, 1.0)[0] == pytest.approx(peak / 2)
    assert lr_at(cfg, 2.0)[0] == pytest.approx(peak)
    assert lr_at(cfg, 6.0)[0] == pytest.approx(1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lp = config(tmp_path, "model=x", "epochs=10", "lp_epochs=2", "optim.warmup_epochs=1")
    assert lr_at(lp, 1.0)[1] and not lr_at(lp, 2.0)[1] and lr_at(lp, 2.0)[0] == 0.0


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_targets_sum_to_one_and_mix_the_flipped_batch(tmp_path, mixup, cutmix):
    cfg = config(tmp_path, "model=x", f"augment.mixup={mixup}", f"augment.cutmix={cutmix}")
    mix = _mixup(cfg, 4)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, targets = mix(x.clone(), y)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    one_hot = F.one_hot(y, 4) * 0.9 + 0.1 / 4  # label smoothing 0.1 over 4 classes
    lam = float((targets[0, 0] - 0.025) / 0.9)  # row 0: class 0 mixed with row 7's class 3
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
    if cutmix == 0:  # pure mixup: the images mix with the same lam
        assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)


def test_ema_follows_its_formula_after_an_update(tmp_path):
    cfg = config(tmp_path, "model=x", "ema_decay=0.9", "augment.mixup=0", "augment.cutmix=0")
    model = create_backbone(
        BackboneSpec("vit_tiny_patch16_224", 32, 8, extra={"depth": 1, "embed_dim": 32, "num_heads": 2}), 4
    )
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    step = _step(cfg, model, ema=ema)
    loss, _ = step.forward((torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))), 1.5)
    step.update(loss)
    after = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * before[k] + 0.1 * after[k], atol=1e-6), k
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_distillation_losses_equal_their_formulas():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T = 3.0
    p_t, log_p_s = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    direct = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * T * T
    assert hinton_kd(s, t, T) == pytest.approx(float(direct), rel=1e-5)
    ce = F.cross_entropy(s, y)
    mixed = distillation_loss("hinton", ce, s, t, alpha=0.3, temperature=T)
    assert mixed == pytest.approx(float(0.7 * ce + 0.3 * direct), rel=1e-5)
    d = torch.randn(6, 5)
    hard = -F.log_softmax(d, 1)[torch.arange(6), t.argmax(1)].mean()
    assert hard_distillation(d, t) == pytest.approx(float(hard), rel=1e-5)
    deit = distillation_loss("deit", ce, s, t, alpha=0.3, temperature=T, dist_logits=d)
    assert deit == pytest.approx(float(0.5 * ce + 0.5 * hard), rel=1e-5)


def _tiny_vit(classes=4, depth=2):
    torch.manual_seed(0)
    spec = BackboneSpec(
        "vit_tiny_patch16_224", 32, 8, extra={"depth": depth, "embed_dim": 32, "num_heads": 2}
    )
    return create_backbone(spec, classes)


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_lp_ft_moves_only_the_head_during_the_linear_probe_epochs(tmp_path):
    cfg = config(tmp_path, "model=x", "lp_epochs=1", "augment.mixup=0", "augment.cutmix=0", "drop_path=0")
    model = _tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = _step(cfg, model)
    for progress in (0.25, 0.5):  # inside the LP phase
        loss, scheduled = step.forward(_batch(), progress)
        step.update(loss)
        assert scheduled["head_only"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}
    loss, scheduled = step.forward(_batch(), 1.5)  # fine-tuning: everything moves
    step.update(loss)
    assert not scheduled["head_only"] and not torch.equal(
        model.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"]
    )


def test_accumulated_passes_give_the_gradients_of_one_pass_and_clipping_bounds_their_norm(tmp_path):
    args = ["model=x", "augment.mixup=0", "augment.cutmix=0", "drop_path=0", "augment.label_smoothing=0"]
    grads = []
    for accum in (1, 4):
        step = _step(config(tmp_path, *args, f"optim.accum_steps={accum}"), _tiny_vit())
        step.forward(_batch(), 1.5)
        grads.append({n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    step = _step(config(tmp_path, *args, "optim.clip_grad=0.01"), _tiny_vit())
    loss, _ = step.forward(_batch(), 1.5)
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in step.model.parameters() if p.grad is not None])
    )
    assert norm > 0.01
    step.update(loss)
    clipped = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in step.model.parameters() if p.grad is not None])
    )
    assert clipped == pytest.approx(0.01, rel=1e-3)


def test_the_teacher_sees_the_students_images_in_its_own_normalization_and_size(tmp_path, backbone):
    from selfsup.finetune.model import Teacher

    model, meta = load_backbone(backbone, num_classes=4)
    meta.num_classes, meta.class_names = 4, [f"class_{i}" for i in range(4)]
    path = save_checkpoint(tmp_path / "teacher", model.state_dict(), meta, model)  # 32 px, mean .5 std .25
    data = info(config(tmp_path, "model=x"))
    teacher = Teacher(str(path), data, (0.3, 0.3, 0.3), (0.2, 0.2, 0.2), student_size=48)
    x = torch.randn(2, 3, 48, 48)
    pixels = x * 0.2 + 0.3
    direct = F.interpolate((pixels - 0.5) / 0.25, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(teacher(x), teacher.net(direct), atol=1e-5)
    teacher.train()
    assert not teacher.net.training and not any(p.requires_grad for p in teacher.parameters())


def test_hinton_distillation_trains_both_heads_of_a_distilled_deit_student(tmp_path, backbone):
    from selfsup.finetune.model import Teacher

    model, meta = load_backbone(backbone, num_classes=4)
    meta.num_classes, meta.class_names = 4, [f"class_{i}" for i in range(4)]
    path = save_checkpoint(tmp_path / "teacher", model.state_dict(), meta, model)
    cfg = config(tmp_path, "model=x", f"distill.teacher={path}", "augment.mixup=0", "augment.cutmix=0")
    torch.manual_seed(0)
    student = create_backbone(
        BackboneSpec(
            "deit_tiny_distilled_patch16_224", 32, 8, extra={"depth": 1, "embed_dim": 32, "num_heads": 2}
        ),
        4,
    )
    student.set_distilled_training(True)
    teacher = Teacher(str(path), info(cfg), (0.5,) * 3, (0.25,) * 3, 32)
    step = _step(cfg, student, teacher=teacher)
    step.forward(_batch(), 1.5)
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0


# --- whole runs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_epochs_on_digits_improve_accuracy_and_export_what_stock_timm_loads(backbone, tmp_path):
    args = [
        "dataset=digits",
        f"checkpoint={backbone}",
        "epochs=2",
        "batch_size=32",
        "optim.base_lr=2e-3",
        "optim.warmup_epochs=0.3",
        "augment.rand_augment=null",
        "augment.mixup=0",
        "augment.cutmix=0",
        "augment.hflip=0",
        "augment.crop_padding=2",
        "drop_path=0",
        "num_workers=0",
        "threads=1",
        "progress_bar=false",
        f"out={tmp_path}",
    ]
    cfg = load_config(FinetuneConfig, None, args)
    from selfsup.finetune.pipeline import build_pipeline
    from selfsup.finetune.validation import evaluate

    data = build_dataset("digits", "train")[1]
    start = build_start(cfg, data)
    pipe = build_pipeline(cfg, 32, start.mean, start.std, 0, 1, torch.device("cpu"))
    before = evaluate(make_accelerator("no"), start.model, pipe.val).top1
    pipe.close()
    result = train(load_config(FinetuneConfig, None, args))
    assert result.status == "finished" and [r["epoch"] for r in evals(tmp_path)] == [1, 2]
    assert result.best_top1 > before + 10, (before, result.best_top1)
    for name in ("report.md", "report.html", "figures/accuracy.png", "figures/confusion.png", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    # stock timm rebuilds the classifier from the sidecar alone, with the same outputs
    meta = read_meta(result.best)
    assert meta.stage == "finetune" and meta.class_names == list(data.classes) and meta.num_classes == 10
    ours, _ = load_backbone(result.best, num_classes=10)
    plain = timm.create_model(
        meta.timm["model_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(meta.timm["pretrained_cfg"], file=str(result.best)),
        **meta.timm["kwargs"],
    )
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(ours.eval()(x), plain.eval()(x), atol=1e-5)


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(backbone, tmp_path):
    args = [*TINY, f"checkpoint={backbone}", "epochs=6", "keep_checkpoints=1", "ema_decay=0.9", "resume=auto"]
    args.append("mixed_precision=no")  # both runs in one precision whatever auto picks here
    straight = train(load_config(FinetuneConfig, None, [*args, f"out={tmp_path / 'straight'}"]))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "finetune" / "finetune.py"), *args, f"out={out}"]
    proc = subprocess.Popen([*cmd, "num_workers=1"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").is_file() and len(losses(out)) >= 6:  # mid-epoch: 4 steps per epoch
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert 6 <= len(losses(out)) < 24
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(tmp_path / "straight")
    assert evals(out) == evals(tmp_path / "straight")
    assert len(complete_checkpoints(out)) == 1
    for name in ("last", "ema", "best"):
        a, _ = load_checkpoint(out / f"{name}.safetensors")
        b, _ = load_checkpoint(straight.out / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_distillation_from_a_classifier_into_a_deit_student(backbone, tmp_path):
    teacher = train(
        config(tmp_path / "teacher", f"checkpoint={backbone}", "epochs=1", "optim.warmup_epochs=0.5")
    )
    student = [
        "model=deit_tiny_distilled_patch16_224",
        "img_size=32",
        "patch_size=8",
        f"distill.teacher={teacher.best}",
        "epochs=1",
        "optim.warmup_epochs=0.5",
    ]
    hinton = train(config(tmp_path / "hinton", *student))
    deit = train(config(tmp_path / "deit", *student, "distill.kind=deit"))
    assert hinton.status == deit.status == "finished"
    assert read_meta(deit.best).timm["model_name"] == "deit_tiny_distilled_patch16_224"
    assert losses(tmp_path / "hinton") != losses(tmp_path / "deit")


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


def _refused(capsys, tmp_path, *args):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY, f"out={out}", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


def test_a_checkpoint_without_a_backbone_is_refused(capsys, tmp_path):
    bogus = tmp_path / "not_a_backbone.safetensors"
    model = torch.nn.Linear(3, 3)
    meta = CheckpointMeta(
        backbone=SPEC.to_dict(), img_size=32, mean=(0, 0, 0), std=(1, 1, 1), stage="pretrain"
    )
    save_checkpoint(bogus, model.state_dict(), meta)
    assert "does not fit the model" in _refused(capsys, tmp_path, f"checkpoint={bogus}")
    assert "no checkpoint sidecar" in _refused(
        capsys, tmp_path, f"checkpoint={tmp_path / 'missing.safetensors'}"
    )


def test_a_classifier_of_other_classes_is_refused_unless_a_new_head_is_asked(capsys, tmp_path, backbone):
    model, meta = load_backbone(backbone, num_classes=3)
    meta.num_classes, meta.class_names, meta.stage = 3, ["a", "b", "c"], "finetune"
    path = save_checkpoint(tmp_path / "three", model.state_dict(), meta, model)
    assert "head=new" in _refused(capsys, tmp_path, f"checkpoint={path}")
    start = build_start(config(tmp_path, f"checkpoint={path}", "head=new"), info(config(tmp_path, "model=x")))
    assert start.model.num_classes == 4


def test_mixup_with_an_odd_batch_is_refused(capsys, tmp_path, backbone):
    assert "even" in _refused(capsys, tmp_path, f"checkpoint={backbone}", "batch_size=15")


def test_a_teacher_with_other_classes_is_refused(capsys, tmp_path, backbone):
    model, meta = load_backbone(backbone, num_classes=3)
    meta.num_classes, meta.class_names = 3, ["a", "b", "c"]
    teacher = save_checkpoint(tmp_path / "teacher3", model.state_dict(), meta, model)
    err = _refused(capsys, tmp_path, f"checkpoint={backbone}", f"distill.teacher={teacher}")
    assert "--teacher" in err and "3 classes" in err
    assert "distillation token" in _refused(
        capsys, tmp_path, f"checkpoint={backbone}", f"distill.teacher={teacher}", "distill.kind=deit"
    )


def test_no_starting_point_is_refused(capsys, tmp_path):
    assert "exactly one starting point" in _refused(capsys, tmp_path)


# --- shipped recipes -----------------------------------------------------------------------------

# moco-v3 transfer/README.md: (weight decay, drop path, random erasing, mixup, cutmix) per dataset
MOCO_V3_TRANSFER = {
    "cifar10": (0.1, 0.1, 0.0, 0.8, 1.0),
    "cifar100": (0.1, 0.1, 0.0, 0.5, 1.0),
    "flowers": (0.3, 0.1, 0.25, 0.0, 0.0),
    "pets": (0.1, 0.0, 0.0, 0.8, 0.0),
}


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_finetune_config_loads(path):
    c = load_config(FinetuneConfig, path)
    target = path.stem.split("_")[-1]
    if path.stem.startswith(("vit_base_", "vit_small_")):
        a = c.augment
        assert (c.optim.weight_decay, c.drop_path, a.random_erasing, a.mixup, a.cutmix) == MOCO_V3_TRANSFER[
            target
        ]
        assert (c.optim.base_lr, c.optim.min_lr, c.optim.warmup_epochs, c.epochs, c.batch_size) == (
            3e-4,
            1e-5,
            3,
            100,
            1024,
        )
        assert a.rand_augment == "rand-m9-mstd0.5-inc1" and a.label_smoothing == 0.1 and c.img_size == 224


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(backbone, tmp_path):
    """Augmentations are per-sample seeded, so W processes see the 1-process images. Mixup pairs and
    drop-path masks are drawn per process (as in DeiT and timm), so they are off here."""
    args = [
        *TINY,
        f"checkpoint={backbone}",
        "max_steps=5",
        "mixed_precision=no",  # both sides: auto is bf16 on some CPUs
        "drop_path=0",
        "augment.mixup=0",
        "augment.cutmix=0",
    ]
    train(load_config(FinetuneConfig, None, [*args, f"out={tmp_path / 'one'}"]))
    run = two_gloo_processes(REPO / "finetune" / "finetune.py", *args, f"out={tmp_path / 'two'}", timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    for (s1, l1), (s2, l2) in zip(one, two):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    e1, e2 = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert [r["at_step"] for r in e1] == [r["at_step"] for r in e2]
    for a, b in zip(e1, e2):
        assert a["top1"] == pytest.approx(b["top1"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_resuming_on_a_folder_whose_classes_changed_is_refused(capsys, tmp_path, backbone):
    from PIL import Image

    def add_class(name):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (40 * i, 100, 30)).save(tmp_path / "images" / name / f"{i}.png")

    add_class("a")
    add_class("b")
    args = [
        f"dataset=imagefolder:{tmp_path / 'images'}",
        f"checkpoint={backbone}",
        "batch_size=4",
        "epochs=2",
        "optim.warmup_epochs=0.5",
        "max_steps=2",
        "val_fraction=0.2",
        "num_workers=0",
        "progress_bar=false",
        f"out={tmp_path / 'run'}",
    ]
    assert train(load_config(FinetuneConfig, None, args)).status == "finished"
    add_class("c")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "max_steps=4"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "other classes" in err and "new out=" in err, err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")) == before


def test_label_fraction_keeps_a_stratified_seeded_share_of_the_training_images(tmp_path):
    from selfsup.data import class_targets
    from selfsup.finetune.pipeline import build_pipeline

    cfg = config(tmp_path, "model=x", "label_fraction=0.25")
    pipe = build_pipeline(cfg, 32, (0.5,) * 3, (0.25,) * 3, 0, 1, torch.device("cpu"))
    kept = pipe.train.dataset.dataset
    labels = class_targets(kept)
    assert pipe.train_size == 16 and sorted(set(labels.tolist())) == [0, 1, 2, 3]
    assert abs(max(torch.bincount(torch.as_tensor(labels)).tolist()) - 4) <= 1
    again = build_pipeline(cfg, 32, (0.5,) * 3, (0.25,) * 3, 0, 1, torch.device("cpu"))
    assert kept.indices == again.train.dataset.dataset.indices
