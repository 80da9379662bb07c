"""The ``probe`` command end to end on the synthetic dataset: report files, cache, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from selfsup.checkpoint import CheckpointMeta, save_checkpoint
from selfsup.eval import probe
from selfsup.eval.cli import main
from selfsup.eval.sources import from_checkpoint, random_init_twin
from selfsup.models import BackboneSpec, create_backbone

SPEC = BackboneSpec(
    "vit_small_patch16_224", img_size=32, patch_size=8, extra={"depth": 2, "embed_dim": 32, "num_heads": 4}
)
DATA = ["--dataset", "synthetic", "--num-workers", "0", "--batch-size", "64", "data.synthetic_size=64"]


def save_tiny(path, seed=1, scale=1.0):
    torch.manual_seed(seed)
    state = {k: v * scale for k, v in create_backbone(SPEC).state_dict().items()}
    meta = CheckpointMeta(
        backbone=SPEC.to_dict(), img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), stage="test"
    )
    return save_checkpoint(path, state, meta)


@pytest.fixture
def ckpt(tmp_path):
    return save_tiny(tmp_path / "pretrain" / "backbone")


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_probe_writes_a_report_comparing_checkpoint_and_random_init(tmp_path, ckpt, capsys):
    out = tmp_path / "probe"
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--compare-random-init",
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--ks",
                "5,10,200",
                *DATA,
            ]
        )
        == 0
    )
    assert "differ from synthetic's defaults" in capsys.readouterr().err  # the sidecar's mean/std are used
    metrics = json.loads((out / "metrics.json").read_text())
    names = [m["name"] for m in metrics["models"]]
    assert names == ["pretrain/backbone", "pretrain/backbone (random init)"]
    trained, baseline = metrics["models"]
    assert trained["kind"] == "checkpoint" and baseline["kind"] == "random_init" and baseline["seed"] == 0
    assert (
        trained["weights_sha256"]
        and trained["n_train"] == 64
        and trained["n_test"] == 64
        and trained["feature_dim"] == 32
    )
    assert trained["knn"]["200"]["k_used"] == 64 and trained["knn"]["5"]["k_used"] == 5
    assert trained["linear"]["protocol"] == "sklearn" and trained["linear"]["C"] > 0
    # The synthetic classes are visible in colour: even random ViT features separate them.
    assert trained["linear"]["top1"] >= 90.0 and trained["knn"]["10"]["top1"] >= 80.0
    assert baseline["spec"] == trained["spec"] and baseline["weights_sha256"] is None
    assert set(trained["per_class"]["top1"]) == {f"class_{i}" for i in range(4)}
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in names:
        assert name in md and name in page
    assert "| model | kind | dim | kNN k=5 top-1" in md and "<table>" in page
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) == 5  # accuracy vs k, and a confusion matrix and an embedding per model
    for png in pngs:
        assert f'src="figures/{png.name}"' in page and f"(figures/{png.name})" in md
        with Image.open(png) as img:
            img.verify()
            assert img.size[0] > 100
    assert "compare_random_init: true" in (out / "config.yaml").read_text()


def test_random_init_twin_is_the_same_architecture_with_other_weights(ckpt):
    source = from_checkpoint(ckpt)
    twin = random_init_twin(source, seed=0)
    trained, baseline = source.build().state_dict(), twin.build().state_dict()
    assert trained.keys() == baseline.keys() and twin.mean == source.mean and twin.spec == source.spec
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], baseline["blocks.0.attn.qkv.weight"])
    assert torch.equal(
        baseline["blocks.0.attn.qkv.weight"],
        random_init_twin(source, seed=0).build().state_dict()["blocks.0.attn.qkv.weight"],
    )
    assert twin.identity() != random_init_twin(source, seed=1).identity()  # the seed is part of the cache key


def test_cache_is_reused_for_the_same_weights_and_invalidated_when_they_change(tmp_path, ckpt, monkeypatch):
    calls = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    config = probe.ProbeConfig(
        dataset="synthetic",
        checkpoints=[str(ckpt)],
        methods=["knn"],
        ks=[5],
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        out=None,
    )
    config.data.synthetic_size = 32
    first = probe.run_probe(config)
    assert len(calls) == 2 and first["cache_hits"] == []  # train and val extracted
    second = probe.run_probe(config)
    assert len(calls) == 2 and len(second["cache_hits"]) == 2
    assert second["models"][0]["knn"] == first["models"][0]["knn"]
    save_tiny(ckpt, seed=2)  # new weights, same path
    third = probe.run_probe(config)
    assert len(calls) == 4 and third["cache_hits"] == []
    assert third["models"][0]["weights_sha256"] != first["models"][0]["weights_sha256"]
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 4


def test_mocov3_protocol_and_a_timm_name_at_random_init(tmp_path, capsys):
    args = [
        "--model",
        "vit_tiny_patch16_224",
        "--random-init",
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--linear-protocol",
        "mocov3",
        "--ks",
        "10",
        "--no-cache",
        "--out",
        str(tmp_path / "o"),
        *DATA,
    ]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    (model,) = metrics["models"]
    assert model["name"] == "vit_tiny_patch16_224 (random init)" and model["feature_dim"] == 192
    linear = model["linear"]
    assert linear["protocol"] == "mocov3" and linear["top1"] >= 90.0
    assert (
        linear["batch_size"] == 64
        and linear["lr"] == pytest.approx(3.0 * 64 / 256)
        and linear["augment"] is False
    )
    assert (
        "Protocol **mocov3** (MoCo v3 main_lincls.py): SGD, BatchNorm no, lr used 0.75"
        in (tmp_path / "o" / "report.md").read_text()
    )


def test_mae_protocol_trains_on_augmented_views(tmp_path, ckpt, capsys, monkeypatch):
    from selfsup.eval import augment

    views = []
    real = augment.augmented_batches

    def counting(*args, **kwargs):
        batches = real(*args, **kwargs)
        return lambda epoch, size, drop_last: (
            views.append(epoch) or b for b in batches(epoch, size, drop_last)
        )

    monkeypatch.setattr(augment, "augmented_batches", counting)
    args = [
        "--checkpoint",
        str(ckpt),
        "--linear-protocol",
        "mae",
        "--method",
        "linear",
        "--no-cache",
        "--out",
        str(tmp_path / "o"),
        "--dataset",
        "synthetic",
        "--num-workers",
        "0",
        "data.synthetic_size=32",
        "linear_head.augment=true",
        "linear_head.epochs=3",
        "linear_head.warmup_epochs=1",
        "linear_head.batch_size=16",
    ]
    assert main(args) == 0
    linear = json.loads((tmp_path / "o" / "metrics.json").read_text())["models"][0]["linear"]
    assert linear["protocol"] == "mae" and linear["augment"] is True and linear["optimizer"] == "LARS"
    assert (
        linear["batch_size"] == 16
        and linear["lr"] == pytest.approx(0.1 * 16 / 256)
        and linear["steps"] == 3 * 2
    )
    assert views == [0, 0, 1, 1, 2, 2]  # two fresh batches of views per epoch
    md = (tmp_path / "o" / "report.md").read_text()
    assert "Protocol **mae** (MAE main_linprobe.py): LARS, BatchNorm yes" in md and "augment yes" in md


def test_the_old_torch_protocol_is_one_line_and_exit_code_2(tmp_path, capsys):
    code, err = run(
        ["--model", "vit_tiny_patch16_224", "--random-init", "--linear-protocol", "torch", *DATA], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "mocov3" in err and "mae" in err
    code, err = run(
        ["--model", "vit_tiny_patch16_224", "--random-init", *DATA, "linear_head.augment=true"], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "sklearn" in err


def test_missing_checkpoint_is_one_line_and_exit_code_2(tmp_path, capsys):
    code, err = run(
        ["--checkpoint", str(tmp_path / "nope.safetensors"), *DATA, "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: no checkpoint sidecar")
    assert not (tmp_path / "o").exists()


def test_unknown_dataset_is_one_line_and_exit_code_2(tmp_path, ckpt, capsys):
    code, err = run(
        ["--checkpoint", str(ckpt), "--dataset", "cifar1000", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "unknown dataset 'cifar1000'" in err


def test_weights_that_do_not_match_their_sidecar_are_refused(tmp_path, ckpt, capsys):
    other = save_tiny(tmp_path / "other", seed=3)
    ckpt.write_bytes(other.read_bytes())
    code, err = run(["--checkpoint", str(ckpt), *DATA, "--no-cache"], capsys)
    assert code == 2 and "does not match its sidecar" in err and err.count("\n") == 1


def test_nan_features_are_refused(tmp_path, capsys):
    broken = save_tiny(tmp_path / "nan", scale=float("nan"))
    code, err = run(["--checkpoint", str(broken), *DATA, "--no-cache", "--out", str(tmp_path / "o")], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "NaN" in errors[0] and err.splitlines()[-1] == errors[0]


def test_model_without_random_init_is_refused(capsys):
    code, err = run(["--model", "vit_small_patch16_224", *DATA], capsys)
    assert code == 2 and "--random-init" in err


def test_module_entry_point_exits_2_on_a_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfsup.eval.cli",
            "--checkpoint",
            str(tmp_path / "x.safetensors"),
            "--dataset",
            "synthetic",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
