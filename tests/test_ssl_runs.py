"""Whole pretraining runs on tiny synthetic data: export, exact resume, NaN handling, 2 processes."""

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
from conftest import REPO, TINY_PRETRAIN, two_gloo_processes

from selfsup.checkpoint import load_backbone, load_checkpoint
from selfsup.config import load_config
from selfsup.errors import EXIT_DIVERGED
from selfsup.runstate import complete_checkpoints
from selfsup.ssl import cli
from selfsup.ssl.builder import MoCoV3
from selfsup.ssl.settings import PretrainConfig
from selfsup.ssl.train import TrainingDiverged, train

TINY = [*TINY_PRETRAIN, "resume=never"]


def config(tmp_path, *extra):
    return load_config(PretrainConfig, None, [*TINY, f"out={tmp_path}", *extra])


def losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "event" not in r]


def pretrain_cmd(*args):
    return [sys.executable, str(REPO / "ssl" / "pretrain.py"), *args]


def test_a_run_exports_a_backbone_that_selfsup_and_timm_load(tmp_path):
    result = train(config(tmp_path, "monitor_every=3", "monitor_train_size=32", "monitor_val_size=32"))
    assert (
        result.status == "finished"
        and result.step == 12
        and result.backbone == tmp_path / "backbone.safetensors"
    )
    _model, meta = load_backbone(result.backbone)
    assert meta.stage == "pretrain" and meta.img_size == 32 and meta.spec.frozen_patch_embed
    assert meta.config["moco"]["temperature"] == 0.2 and len(meta.mean) == 3
    state, _ = load_checkpoint(result.backbone)
    assert not any(k.startswith(("projector", "predictor", "momentum", "head")) for k in state)
    plain = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=0
    )
    plain.load_state_dict(state, strict=True)
    assert [r["epoch"] for r in result.monitor] == [0, 3]
    assert all(0 <= r["knn_top1_k20"] <= 100 for r in result.monitor)
    # on demand, from the latest training state: the same weights
    (tmp_path / "backbone.safetensors").unlink()
    again = train(config(tmp_path, "export_only=true", "resume=auto"))
    assert again.status == "exported" and torch.equal(
        load_checkpoint(again.backbone)[0]["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"]
    )


def test_sigterm_then_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    args = [*TINY, "epochs=12", "max_steps=40", "keep_checkpoints=1", "mixed_precision=no"]
    straight = train(load_config(PretrainConfig, None, [*args, f"out={tmp_path / 'straight'}"]))
    assert straight.step == 40

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        pretrain_cmd(*args, f"out={out}", "num_workers=1"), env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").is_file() and len(losses(out)) >= 6:  # mid-epoch: 4 steps per epoch
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = len(losses(out))
    assert 6 <= stopped_at < 40 and "resume=auto" in stderr

    resumed = subprocess.run(
        pretrain_cmd(*args, f"out={out}", "resume=auto"), env=env, capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(tmp_path / "straight")  # exactly, step by step
    assert len(complete_checkpoints(out)) == 1
    a, _ = load_checkpoint(out / "backbone.safetensors")
    b, _ = load_checkpoint(tmp_path / "straight" / "backbone.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def nan_at(monkeypatch, steps):
    original, calls = MoCoV3.forward, {"n": 0}

    def forward(self, x1, x2, m):
        loss = original(self, x1, x2, m)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in steps else loss

    monkeypatch.setattr(MoCoV3, "forward", forward)


def test_nan_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_at(monkeypatch, {2, 3, 7})
    result = train(config(tmp_path, "max_nan_steps=3"))
    assert result.status == "finished" and result.nan_skipped == 3 and result.step == 12
    skipped = [
        json.loads(line)["step"]
        for line in (tmp_path / "log.jsonl").read_text().splitlines()
        if '"skipped": true' in line
    ]
    assert skipped == [2, 3, 7]


def test_a_nan_streak_stops_the_run_keeping_the_checkpoint_from_before(tmp_path, monkeypatch):
    nan_at(monkeypatch, set(range(5, 100)))
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train(config(tmp_path, "max_nan_steps=3", "save_every_steps=1"))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY, f"out={tmp_path / 'cli'}", "max_nan_steps=2"])
    assert exit_info.value.code == EXIT_DIVERGED


def test_a_stream_of_shards_runs_length_per_epoch_images_per_epoch(tmp_path, capsys):
    import webdataset as wds
    from PIL import Image

    from selfsup.builtin_data import synthetic_arrays

    images, labels = synthetic_arrays(40, 4, 32, seed=0)
    folder = tmp_path / "data" / "imagenet22k" / "train"
    folder.mkdir(parents=True)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shard-{shard:03d}.tar")) as sink:
            for i in range(shard * 20, shard * 20 + 20):
                sink.write({"__key__": f"{i:05d}", "png": Image.fromarray(images[i]), "cls": int(labels[i])})
    cfg = config(
        tmp_path / "run",
        "dataset=imagenet22k",
        f"data_root={tmp_path / 'data'}",
        "length_per_epoch=48",
        "epochs=2",
    )
    result = train(cfg)
    assert (
        result.status == "finished" and result.step == 6
    )  # 48 // 16 per epoch; the 40-image stream restarts
    again = config(
        tmp_path / "run",
        "dataset=imagenet22k",
        f"data_root={tmp_path / 'data'}",
        "length_per_epoch=48",
        "epochs=2",
        "resume=auto",
    )
    assert train(again).step == 6
    assert "restarts from the start of its shards" in capsys.readouterr().err  # said plainly
    with pytest.raises(Exception, match="length_per_epoch"):
        train(config(tmp_path / "run2", "dataset=imagenet22k", f"data_root={tmp_path / 'data'}"))


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train(config(tmp_path, "mixed_precision=bf16", "max_steps=3"))
    assert result.status == "finished" and result.last_loss is not None and math.isfinite(result.last_loss)


def test_bad_config_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["optim.base_rl=1"])
    assert exit_info.value.code == 2 and "did you mean 'optim.base_lr'" in capsys.readouterr().err


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    args = [
        *TINY,
        "max_steps=5",
        "save_every_epochs=0",
        "mixed_precision=no",  # both sides: auto is bf16 on some CPUs
        "monitor_every=1",
        "monitor_train_size=32",
        "monitor_val_size=16",
    ]
    single = train(load_config(PretrainConfig, None, [*args, f"out={tmp_path / 'one'}"]))
    run = two_gloo_processes(REPO / "ssl" / "pretrain.py", *args, f"out={tmp_path / 'two'}", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    for (s1, l1), (s2, l2) in zip(one, two):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, _ = load_checkpoint(single.backbone)
    b, _ = load_checkpoint(tmp_path / "two" / "backbone.safetensors")
    # Two gradients are zero in exact arithmetic (the attention keys' bias: softmax is shift
    # invariant; the final LayerNorm bias: the projector's BatchNorm removes shifts). Adam turns
    # their float noise into full-size steps, so those entries are left out of the comparison.
    for state in (a, b):  # keep the query and value biases (embed_dim 32: q, k, v rows of 32)
        state["blocks.0.attn.qkv.bias"] = torch.cat(
            [state["blocks.0.attn.qkv.bias"][:32], state["blocks.0.attn.qkv.bias"][64:]]
        )
    for k in a:
        if k != "norm.bias":
            assert torch.allclose(a[k], b[k], atol=1e-5), k
