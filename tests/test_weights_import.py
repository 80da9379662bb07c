"""``selfsup-weights import``: each released layout, written as its own saving code writes it (key
names of MoCo v3's main_moco.py / main_lincls.py / convert_to_deit.py, MAE, DINO), imported into the
project's format with equal outputs; stock timm rebuilds it; bad files are refused in one line."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import timm
import torch
from conftest import REPO
from timm.layers import resample_abs_pos_embed

from selfsup.checkpoint import load_backbone, read_meta, timm_call
from selfsup.models import BackboneSpec, create_backbone, sincos_pos_embed
from selfsup.weights import class_names, timm_class_names
from selfsup.weightscli import main

TINY = {"embed_dim": 32, "depth": 2}
MOCO = BackboneSpec("moco_vit_tiny", 32, 8, num_heads=2, pos_embed="sincos", init="moco_v3", extra=TINY)
PLAIN = BackboneSpec("vit_small_patch16_224", 32, 8, num_heads=2, pos_embed="learned", extra=TINY)
MOCO_ARGS = ["--arch", "moco_vit_tiny", "--num-heads", "2"]
PLAIN_ARGS = ["--arch", "vit_small_patch16_224", "--num-heads", "2"]
# fine-tuning and probing in seconds: two steps on digits, kNN on 64 synthetic images
TWO_STEPS = ["epochs=1", "max_steps=2", "optim.warmup_epochs=0", "batch_size=16", "augment.rand_augment=null"]
QUIET = ["num_workers=0", "threads=1", "progress_bar=false"]
PROBE = [
    "--ks",
    "5",
    "--dataset",
    "synthetic",
    "--num-workers",
    "0",
    "--batch-size",
    "64",
    "data.synthetic_size=64",
]


def vit(spec, classes=0, seed=0):
    torch.manual_seed(seed)
    return create_backbone(spec, num_classes=classes).eval()


def optimizer_state(model):
    """An optimizer's state after one step (plain tensors and numbers: loadable with weights_only)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    model.zero_grad()
    return opt.state_dict()


def moco_v3_file(encoder="base"):
    """main_moco.py's checkpoint: DDP-wrapped MoCo_ViT whose encoders' heads are projection MLPs."""
    base, momentum = vit(MOCO, seed=1), vit(MOCO, seed=2)
    mlp = {
        "head.0.weight": torch.randn(64, 32),
        "head.1.weight": torch.ones(64),
        "head.1.bias": torch.zeros(64),
    }
    mlp |= {"head.1.running_mean": torch.zeros(64), "head.1.num_batches_tracked": torch.tensor(7)}
    mlp |= {"head.3.weight": torch.randn(16, 64), "head.4.running_var": torch.ones(16)}
    state = {}
    for name, net in (("base_encoder", base), ("momentum_encoder", momentum)):
        state |= {f"module.{name}.{k}": v for k, v in (net.state_dict() | mlp).items()}
    state |= {
        "module.predictor.0.weight": torch.randn(64, 16),
        "module.predictor.1.running_mean": torch.zeros(64),
    }
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    obj = {
        "epoch": 300,
        "arch": "vit_tiny",
        "state_dict": state,
        "optimizer": optimizer_state(base),
        "scaler": scaler,
    }
    return obj, base if encoder == "base" else momentum


def lincls_file():
    model = vit(MOCO, classes=10, seed=3)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    obj = {"epoch": 90, "arch": "vit_tiny", "state_dict": state, "best_acc1": torch.tensor(76.7)}
    return obj | {"optimizer": optimizer_state(vit(MOCO, classes=10))}, model


def deit_file():  # convert_to_deit.py: the base encoder without its head, under 'model'
    model = vit(MOCO, seed=4)
    return {"model": model.state_dict()}, model


def mae_file():  # a whole MAE pretraining checkpoint: the decoder is dropped
    model = vit(PLAIN, seed=5)
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32)}
    return {"model": model.state_dict() | decoder}, model


def mae_finetuned_file():  # MAE fine-tuned: average pooling into fc_norm, then the head
    model = vit(
        BackboneSpec(**{**PLAIN.to_dict(), "extra": {**TINY, "global_pool": "avg"}}), classes=10, seed=6
    )
    return {"model": model.state_dict()}, model


def dino_file():  # DINO's *_pretrain.pth: the backbone's plain state dict
    model = vit(PLAIN, seed=7)
    return model.state_dict(), model


CASES = {
    "moco-v3": (moco_v3_file, MOCO_ARGS, "backbone"),
    "mocov3-lincls": (lincls_file, MOCO_ARGS, "classifier"),
    "deit": (deit_file, MOCO_ARGS, "backbone"),
    "mae": (mae_file, PLAIN_ARGS, "backbone"),
    "mae-finetuned": (mae_finetuned_file, PLAIN_ARGS, "classifier"),
    "dino": (dino_file, PLAIN_ARGS, "backbone"),
}


def imported(tmp_path, obj, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "released.pth"
    torch.save(obj, source)
    assert main(["import", str(source), "--out", str(tmp_path / "out"), *args]) == 0
    return source


@pytest.mark.parametrize("case", CASES)
def test_each_layout_imports_with_the_source_models_outputs_and_stock_timm_rebuilds_it(
    tmp_path, case, capsys
):
    make, args, name = CASES[case]
    obj, source_model = make()
    source = imported(tmp_path, obj, *args)
    fmt = case.split("-finetuned")[0]
    assert f"as {fmt};" in capsys.readouterr().out  # --format auto said which layout it found
    path = tmp_path / "out" / f"{name}.safetensors"
    meta = read_meta(path)
    assert meta.stage == "import" and meta.source["format"] == fmt
    assert meta.parent_sha256 == meta.source["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    ours, _ = load_backbone(path, num_classes=meta.num_classes)
    plain = eval(timm_call(path), {"timm": timm}).eval()  # the sidecar's line, no selfsup
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = source_model(x)
        assert torch.allclose(ours.eval()(x), expected, atol=1e-5)
        assert torch.allclose(plain(x), expected, atol=1e-5)


def test_the_momentum_encoder_is_selectable(tmp_path):
    obj, momentum = moco_v3_file("momentum")
    imported(tmp_path, obj, "--format", "moco-v3", "--encoder", "momentum", *MOCO_ARGS)
    ours, meta = load_backbone(tmp_path / "out" / "backbone.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), momentum(x), atol=1e-5)
    assert meta.source["encoder"] == "momentum" and meta.spec.pos_embed == "sincos"


def test_another_resolution_resamples_a_learned_table_and_rebuilds_a_sincos_one(tmp_path):
    obj, model = dino_file()
    imported(tmp_path / "dino", obj, "--img-size", "48", *PLAIN_ARGS)
    state = load_backbone(tmp_path / "dino" / "out" / "backbone.safetensors")[0].state_dict()
    resampled = resample_abs_pos_embed(model.pos_embed, new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    assert torch.allclose(state["pos_embed"], resampled, atol=1e-6)
    obj, _ = deit_file()
    imported(tmp_path / "deit", obj, "--img-size", "48", *MOCO_ARGS)
    net, meta = load_backbone(tmp_path / "deit" / "out" / "backbone.safetensors")
    assert meta.img_size == 48 and torch.allclose(net.pos_embed, sincos_pos_embed((6, 6), 32), atol=1e-6)


def test_head_drop_imports_a_classifier_file_as_its_backbone(tmp_path):
    obj, model = lincls_file()
    imported(tmp_path, obj, "--head", "drop", *MOCO_ARGS)
    ours, meta = load_backbone(tmp_path / "out" / "backbone.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        assert meta.num_classes == 0 and torch.allclose(ours.eval()(x), features, atol=1e-5)
    assert not (tmp_path / "out" / "classifier.safetensors").exists()


class Payload:
    """What a malicious checkpoint carries: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def refused(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["import", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def test_a_file_that_needs_unpickling_code_is_refused_unrun(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload(str(marker))}, tmp_path / "evil.pth")
    err = refused(capsys, str(tmp_path / "evil.pth"), "--out", str(tmp_path / "out"))
    assert "unpickling code" in err and not marker.exists() and not (tmp_path / "out").exists()


def test_an_unknown_layout_or_the_wrong_format_is_refused_saying_what_was_expected(tmp_path, capsys):
    torch.save({"weights": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    err = refused(capsys, str(tmp_path / "other.pth"), "--out", str(tmp_path / "out"))
    assert "no known key layout" in err and "module.base_encoder" in err and "'weights'" in err
    torch.save(dino_file()[0], tmp_path / "dino.pth")
    err = refused(capsys, str(tmp_path / "dino.pth"), "--format", "moco-v3", "--out", str(tmp_path / "out"))
    assert "not a moco-v3 file" in err and "found top-level keys ['cls_token'" in err
    err = refused(capsys, str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out"))
    assert "no file at" in err


def _offline_hub(monkeypatch, cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def _cached_hub_model(hub, name, classes):
    """A random timm model saved in the Hugging Face cache as a download of ``name`` leaves it:
    refs/main names the snapshot holding model.safetensors. Returns the model and the snapshot."""
    from safetensors.torch import save_file

    repo = hub / f"models--timm--{name}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    model = timm.create_model(name.split(".")[0], num_classes=classes).eval()
    save_file(model.state_dict(), snapshot / "model.safetensors")
    return model, snapshot


def test_a_timm_name_loads_from_the_cache_and_is_refused_in_one_line_when_not_cached(
    tmp_path, monkeypatch, capsys
):
    name = "vit_tiny_patch16_224.augreg_in21k"
    _offline_hub(monkeypatch, tmp_path / "hub")
    err = refused(capsys, name, "--format", "timm", "--out", str(tmp_path / "out"))
    assert "neither cached nor reachable" in err
    model, snapshot = _cached_hub_model(tmp_path / "hub", name, 21843)
    assert main(["import", name, "--format", "timm", "--head", "drop", "--out", str(tmp_path / "out")]) == 0
    path = tmp_path / "out" / "backbone.safetensors"
    meta = read_meta(path)
    assert meta.source["file"] == name and meta.mean == [0.5, 0.5, 0.5]  # the tag's normalization
    assert meta.parent_sha256 == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)  # timm's, headless
        assert torch.allclose(load_backbone(path)[0].eval()(x), features, atol=1e-5)


def test_a_timm_tag_with_a_classifier_imports_as_one_with_timms_class_names(tmp_path, monkeypatch):
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    _offline_hub(monkeypatch, tmp_path / "hub")
    model, snapshot = _cached_hub_model(tmp_path / "hub", name, 1000)
    assert main(["import", name, "--format", "timm", "--out", str(tmp_path / "out")]) == 0
    path = tmp_path / "out" / "classifier.safetensors"
    meta = read_meta(path)
    assert meta.num_classes == 1000 and meta.class_names[:2] == ["n01440764", "n01443537"]  # in1k's
    digest = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    assert meta.source == {"format": "timm", "file": name, "sha256": digest} and meta.parent_sha256 == digest
    ours = load_backbone(path, num_classes=1000)[0].eval()
    plain = eval(timm_call(path), {"timm": timm}).eval()  # the sidecar's line, no selfsup
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(ours(x), expected, atol=1e-5) and torch.allclose(plain(x), expected, atol=1e-5)
    assert main(["import", name, "--format", "timm", "--head", "drop", "--out", str(tmp_path / "drop")]) == 0
    assert read_meta(tmp_path / "drop" / "backbone.safetensors").num_classes == 0


def test_fine_tuning_an_imported_backbone_keeps_the_chain_and_the_probe_reads_it(tmp_path, capsys):
    from selfsup.eval.cli import main as probe
    from selfsup.finetune.cli import main as finetune

    obj, _ = moco_v3_file()
    source = imported(tmp_path, obj, *MOCO_ARGS)
    backbone = tmp_path / "out" / "backbone.safetensors"
    run = tmp_path / "ft"
    finetune(["--dataset", "digits", "--checkpoint", str(backbone), "--out", str(run), *TWO_STEPS, *QUIET])
    imported_meta = read_meta(backbone)
    for name in ("best", "last"):
        meta = read_meta(run / f"{name}.safetensors")
        assert meta.parent_sha256 == imported_meta.weights_sha256
        assert meta.source == imported_meta.source and meta.source["file"] == source.name
    assert f"imported from {source.name} (moco-v3" in (run / "report.md").read_text()
    out, cache = tmp_path / "probe", tmp_path / "cache"
    code = probe(["--checkpoint", str(backbone), "--out", str(out), "--cache-dir", str(cache), *PROBE])
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 0 and metrics["models"][0]["weights_sha256"] == imported_meta.weights_sha256


def test_tta_and_compress_of_a_classifier_fine_tuned_from_an_imported_file_name_that_file(tmp_path, capsys):
    import numpy as np

    from selfsup.compress.cli import main as compress
    from selfsup.finetune.cli import main as finetune
    from selfsup.tta.cli import main as tta
    from selfsup.tta.generate import generate

    obj, _ = moco_v3_file()
    source = imported(tmp_path, obj, *MOCO_ARGS)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    run = tmp_path / "ft"
    backbone = str(tmp_path / "out" / "backbone.safetensors")
    finetune(["--dataset", "digits", "--checkpoint", backbone, "--out", str(run), *TWO_STEPS, *QUIET])
    classifier = str(run / "best.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    generate(images, np.arange(8) % 10, tmp_path / "set", ["contrast"], (5,), source="test")
    tta(
        [
            "--checkpoint", classifier, "--dataset", str(tmp_path / "set"), "--method", "source",
            "--batch-size", "4", "--out", str(tmp_path / "tta"), "corruptions=contrast",
        ]
    )  # fmt: skip
    compress(
        [
            "--checkpoint", classifier, "--dataset", "digits", "--prune", "l1", "--target-macs", "0.7",
            "--out", str(tmp_path / "compress"), "latency_repeats=1", "latency_batches=[1]",
            "measure_memory=false", "progress_bar=false", "threads=1",
        ]
    )  # fmt: skip
    capsys.readouterr()
    line = f"Weights imported from {source.name} (moco-v3, base encoder, SHA-256 {digest[:12]})."
    for folder, results in (("tta", "results.json"), ("compress", "metrics.json")):
        assert line in (tmp_path / folder / "report.md").read_text()
        found = json.loads((tmp_path / folder / results).read_text())["source"]
        assert found == {"format": "moco-v3", "file": source.name, "sha256": digest, "encoder": "base"}
    pruned = read_meta(tmp_path / "compress" / "pruned.safetensors")
    assert pruned.source["sha256"] == digest and pruned.stage == "compress"


# --- the reproduction scripts, one step each on a tiny stand-in of the released layout ----------

STAND_IN_FINETUNE = ["dataset=digits", "img_size=32", "patch_size=8", "save_every_epochs=0", "eval_every=1"]
STAND_IN_FINETUNE += ["augment.mixup=0", "augment.cutmix=0", "mixed_precision=no", *TWO_STEPS[1:], *QUIET]
STAND_IN_PROBE = ["dataset=synthetic", "data.synthetic_size=64", "img_size=32", "batch_size=64", "ks=[5]"]
STAND_IN_PROBE += [
    "num_workers=0",
    "linear_head.epochs=1",
    "linear_head.batch_size=32",
    "linear_head.augment=false",
]
SCRIPTS = {
    "mocov3_transfer.sh": (moco_v3_file, " ".join(MOCO_ARGS), STAND_IN_FINETUNE),
    "mocov3_linear.sh": (moco_v3_file, " ".join(MOCO_ARGS), STAND_IN_PROBE),
    "dino_knn.sh": (dino_file, " ".join(["--format", "dino", *PLAIN_ARGS]), STAND_IN_PROBE),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_reproduction_script_runs_one_step_on_a_tiny_stand_in(tmp_path, script):
    make, import_args, overrides = SCRIPTS[script]
    torch.save(make()[0], tmp_path / "released.pth")
    env = {**os.environ, "PYTHON": sys.executable, "LAUNCH": sys.executable, "OUT": str(tmp_path / "run")}
    env |= {"DATASETS": "cifar100", "IMPORT_ARGS": import_args, "SELFSUP_CACHE": str(tmp_path / "cache")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # one CPU process
    command = ["bash", str(REPO / "benchmarks" / "reproduce" / script), str(tmp_path / "released.pth")]
    run = subprocess.run(
        [*command, *overrides], capture_output=True, text=True, timeout=600, env=env, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = tmp_path / "run" / ("cifar100" if script == "mocov3_transfer.sh" else "probe") / "report.md"
    assert report.is_file() and "report.md" in run.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "probe").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_probe_configs_load_as_the_published_protocols(path):
    from selfsup.config import load_config
    from selfsup.eval.probe import ProbeConfig

    config = load_config(ProbeConfig, path)
    assert config.dataset == "imagenet" and config.img_size == 224 and config.feature == "cls"
    assert config.linear_protocol == "mocov3" if config.methods == ["linear"] else config.temperature == 0.07


def test_timm_class_names_are_wordnet_ids_only_for_an_imagenet_tag():
    """timm guesses the ImageNet subset from the class count alone: a 1000-class head of another
    tag (resmlp_12_224.fb_dino's, say) keeps the plain class names."""
    model = timm.create_model("resnet18.a1_in1k", layers=[1] * 4, channels=[8] * 4, stem_width=8)
    assert timm_class_names(model)[:2] == ["n01440764", "n01443537"]
    model.pretrained_cfg = {**model.pretrained_cfg, "tag": "fb_dino"}
    assert timm_class_names(model) == class_names(1000)
