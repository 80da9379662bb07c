"""Compression: pruning reaches its MACs target and keeps a working model, the pruned checkpoint
reloads with plain torch, the ONNX export matches torch, INT8 agrees with fp32, calibration is
deterministic, and bad input is one line with exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, refused, two_gloo_processes

from selfsup.backbones.hooks import auxiliary_losses
from selfsup.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from selfsup.compress import cli
from selfsup.compress.pipeline import run
from selfsup.compress.prune import count, prune_l1
from selfsup.compress.quantize import check_export, export_onnx, quantize, run_onnx, session
from selfsup.compress.settings import CompressConfig
from selfsup.config import load_config
from selfsup.errors import UsageError
from selfsup.models import BackboneSpec, create_backbone
from selfsup.runstate import complete_checkpoints
from selfsup.shapes import apply_shapes, shape_manifest

VIT = BackboneSpec(
    "moco_vit_tiny", 32, 8, pos_embed="learned", extra={"depth": 2, "embed_dim": 64, "num_heads": 4}
)
CNN = BackboneSpec("resnet10t", 32, None, pos_embed="learned", init="timm")


def _digits():
    from selfsup.builtin_data import digits_arrays

    images, labels = digits_arrays(32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - 0.3) / 0.35, torch.from_numpy(labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small ViT classifier trained on digits for a few epochs, saved in the project format."""
    x, y = _digits()
    torch.manual_seed(0)
    model = create_backbone(VIT, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for index in torch.randperm(1400, generator=g).split(50):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    meta = CheckpointMeta(
        backbone=VIT.to_dict(),
        img_size=32,
        mean=(0.3, 0.3, 0.3),
        std=(0.35, 0.35, 0.35),
        stage="finetune",
        num_classes=10,
        class_names=[str(i) for i in range(10)],
    )
    path = save_checkpoint(tmp_path_factory.mktemp("trained") / "classifier", model.state_dict(), meta)
    return model, path, x[1400:], y[1400:]


BOTNET = BackboneSpec("botnet_tiny", 32, None, pos_embed="learned")
SKIPNET = BackboneSpec("skip_resnet38", 32, None, pos_embed="learned")


@pytest.mark.parametrize(
    "spec,steps", [(VIT, 7), (CNN, 7), (BOTNET, 7), (SKIPNET, 4)], ids=["vit", "cnn", "botnet", "skipnet"]
)
def test_pruning_reaches_the_target_macs_and_the_model_still_trains(spec, steps):
    torch.manual_seed(0)
    model = create_backbone(spec, 10)
    x = torch.randn(2, 3, 32, 32)
    result = prune_l1(model, x, 0.5, search_steps=steps)
    assert 0.4 <= result.macs_ratio <= 0.5  # at most the target, and near it
    assert (
        count(model, x) == (result.macs_after, result.params_after)
        and result.params_after < result.params_before
    )
    model.train()  # training mode: SkipNet's gates pass gradients (straight-through)
    with auxiliary_losses(model) as aux:
        out = model(x)
        extra = aux.total()  # SkipNet's compute penalty, None for the others
    (out.sum() if extra is None else out.sum() + extra).backward()
    assert out.shape == (2, 10) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if spec is VIT:
        for block in model.blocks:  # whole heads leave: the attention's attributes follow the qkv
            attn = block.attn
            assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
            assert attn.proj.in_features == attn.attn_dim and attn.head_dim == 16
        assert model.patch_embed.proj.out_channels == 64 and model.head.in_features == 64  # kept whole


def test_dynamic_convolutions_are_refused_for_pruning():
    model = create_backbone(BackboneSpec("dy_resnet_tiny", 32, None, pos_embed="learned"), 10)
    with pytest.raises(UsageError, match="dynamic convolutions"):
        prune_l1(model, torch.randn(1, 3, 32, 32), 0.5)


def test_a_pruned_checkpoint_reloads_without_torch_pruning(trained, tmp_path):
    model, _, x, _ = trained
    pruned = create_backbone(VIT, 10)
    pruned.load_state_dict(model.state_dict())
    prune_l1(pruned.eval(), x[:1], 0.5, search_steps=6)
    manifest = shape_manifest(pruned, create_backbone(VIT, 10))
    assert manifest and all(k.startswith("blocks.") for k in manifest)
    meta = CheckpointMeta(
        backbone=VIT.to_dict(), img_size=32, mean=(0.3,) * 3, std=(0.35,) * 3, stage="compress",
        num_classes=10, class_names=[str(i) for i in range(10)], shapes=manifest,
    )  # fmt: skip
    path = save_checkpoint(tmp_path / "pruned", pruned.state_dict(), meta)
    with torch.no_grad():
        expected = pruned(x[:4]).numpy()
    np.save(tmp_path / "x.npy", x[:4].numpy())
    script = (
        "import sys, numpy as np, torch; sys.modules['torch_pruning'] = None\n"
        "from selfsup.checkpoint import load_backbone\n"
        f"model, _ = load_backbone({str(path)!r}, num_classes=10)\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, model.eval()(x).detach().numpy())\n"
        "assert 'torch_pruning' not in sys.modules or sys.modules['torch_pruning'] is None\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    assert np.allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
    rebuilt = apply_shapes(create_backbone(VIT, 10), manifest)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_onnx_fp32_matches_torch_and_int8_agrees_with_fp32(trained, tmp_path):
    model, _, x, y = trained
    fp32 = export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert check_export(model, fp32, x[:16]) < 1e-4
    with torch.no_grad():
        reference = model(x).argmax(1).numpy()
    assert (reference == y.numpy()).mean() > 0.4  # a trained model (chance: 0.1)
    int8 = quantize(fp32, tmp_path / "m.int8.onnx", "int8-dynamic")
    agreement = (run_onnx(session(int8), x.numpy()).argmax(1) == reference).mean()
    assert agreement >= 0.98
    assert int8.stat().st_size < fp32.stat().st_size / 2.5


def test_static_calibration_is_deterministic(trained, tmp_path):
    model, _, x, _ = trained
    fp32 = export_onnx(model, x[:1], tmp_path / "m.onnx")
    batches = [x[i : i + 16].numpy() for i in range(0, 64, 16)]
    a = quantize(fp32, tmp_path / "a.onnx", "int8-static", batches).read_bytes()
    b = quantize(fp32, tmp_path / "b.onnx", "int8-static", batches).read_bytes()
    assert a == b
    agreement = (
        run_onnx(session(tmp_path / "a.onnx"), x.numpy()).argmax(1) == model(x).argmax(1).numpy()
    ).mean()
    assert agreement >= 0.9


def test_torchao_pt2e_int8_agrees_with_fp32_and_round_trips(trained, tmp_path):
    pytest.importorskip("torchao")
    from selfsup.compress.quantize import quantize_pt2e, save_program

    model, _, x, _ = trained
    program = quantize_pt2e(model, x[:1], [x[i : i + 32].numpy() for i in range(0, 128, 32)])
    with torch.no_grad():
        int8 = program.module()(x)
        reference = model(x)
    assert (int8.argmax(1) == reference.argmax(1)).float().mean() >= 0.98
    assert not torch.equal(int8, reference)  # quantized, not a copy
    path = save_program(program, tmp_path / "m.int8.pt2")
    with torch.no_grad():
        assert torch.equal(torch.export.load(path).module()(x[:5]), int8[:5])


@pytest.mark.slow
def test_the_command_writes_every_variant_on_digits(trained, tmp_path, capsys):
    _, path, _, _ = trained
    out = tmp_path / "out"
    cli.main(
        [
            "--checkpoint", str(path), "--dataset", "digits", "--prune", "l1", "--target-macs", "0.5",
            "--recover-epochs", "1", "--teacher", "self", "--quantize", "int8-dynamic", "--out", str(out),
            "latency_repeats=2", "latency_batches=1,8", "progress_bar=false",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| INT8 |" in printed and "holds" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    names = [v["name"] for v in metrics["variants"]]
    assert names == ["original (fp32)", "pruned", "pruned + recovered", "INT8", "pruned + recovered + INT8"]
    assert all(v["peak_mib"] is not None and v["peak_mib"] > 0 for v in metrics["variants"])  # Linux
    pruned = metrics["variants"][1]
    assert pruned["macs"] <= 0.5 * metrics["variants"][0]["macs"]
    assert (out / "pruned.safetensors").is_file() and (out / "report.html").is_file()
    assert json.loads((out / "pruned.json").read_text())["shapes"]


def _recovery_args(path, *extra):
    return [
        f"checkpoint={path}", "dataset=digits", "prune=l1", "target_macs=0.5", "recover_epochs=2",
        "batch_size=16", "teacher=self", "threads=1", "progress_bar=false", "measure_memory=false",
        "latency_repeats=1", "latency_batches=[1]", "mixed_precision=no", *extra,
    ]  # fmt: skip


def _losses(out):
    records = [json.loads(line) for line in (out / "recovery" / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "event" not in r]


def _recovered(out):
    weights, _ = load_checkpoint(out / "recovered.safetensors")
    return weights


@pytest.mark.slow
def test_recovery_stopped_by_sigterm_resumes_exactly(trained, tmp_path):
    """Recovery runs in the core loop: SIGTERM mid-epoch saves, the same command continues it, and
    the losses and the recovered weights equal an uninterrupted run's."""
    _, path, _, _ = trained
    straight = run(load_config(CompressConfig, None, _recovery_args(path, f"out={tmp_path / 'straight'}")))
    assert straight.status == "finished" and straight.step == straight.total_steps
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "compress" / "compress.py"), *_recovery_args(path, f"out={out}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "recovery" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(_losses(out)) >= 30:  # mid-epoch 1 (90 steps per epoch)
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "continue with the same command" in stderr
    assert 30 <= len(_losses(out)) < straight.total_steps
    assert not (out / "recovered.safetensors").exists() and not (out / "metrics.json").exists()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(out) == _losses(tmp_path / "straight")
    a, b = _recovered(out), _recovered(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(complete_checkpoints(out / "recovery")) == 1
    # the recovery recipe cannot change under a resume; what follows it can
    changed = subprocess.run([*cmd, "recover_lr=0.001"], env=env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "recover_lr" in changed.stderr and "Traceback" not in changed.stderr
    requantized = subprocess.run(
        [*cmd, "quantize=int8-dynamic"], env=env, capture_output=True, text=True, timeout=300
    )
    assert requantized.returncode == 0, requantized.stderr
    assert _losses(out) == _losses(tmp_path / "straight")  # no step ran again


@pytest.mark.slow
def test_recovery_in_two_gloo_processes_matches_one_process(trained, tmp_path):
    _, path, _, _ = trained
    args = _recovery_args(path, "max_steps=6")
    run(load_config(CompressConfig, None, [*args, f"out={tmp_path / 'one'}"]))
    two = two_gloo_processes(REPO / "compress" / "compress.py", *args, f"out={tmp_path / 'two'}", timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(both) == 6
    for (s1, l1), (s2, l2) in zip(one, both):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = _recovered(tmp_path / "one"), _recovered(tmp_path / "two")
    # qkv biases excepted: the key bias's gradient is zero in exact arithmetic (softmax ignores a shift per
    # query), so Adam scales the two runs' different rounding noise up to lr-sized steps
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if not k.endswith("qkv.bias"))
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())  # written once, by the main process
    assert [v["name"] for v in metrics["variants"]] == ["original (fp32)", "pruned", "pruned + recovered"]


def _refused(capsys, *args):
    return refused(capsys, cli.main, *args)


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    _, path, _, _ = trained
    common = ["--checkpoint", str(path), "--dataset", "digits", "--out", str(tmp_path / "o")]
    assert "strictly between 0 and 1" in _refused(capsys, *common, "--prune", "l1", "--target-macs", "1.5")
    assert "strictly between 0 and 1" in _refused(capsys, *common, "--prune", "l1", "--target-macs", "0")
    assert "int8-dynamic" in _refused(capsys, *common, "--quantize", "int4")
    assert "nothing to do" in _refused(capsys, *common)
    meta = CheckpointMeta(
        backbone=VIT.to_dict(), img_size=32, mean=(0.3,) * 3, std=(0.35,) * 3, stage="pretrain"
    )
    backbone = save_checkpoint(tmp_path / "backbone", create_backbone(VIT).state_dict(), meta)
    err = _refused(capsys, "--checkpoint", str(backbone), "--dataset", "digits", "--quantize", "int8-dynamic")
    assert "without a classifier head" in err
    assert "classes" in _refused(capsys, *common[:2], "--dataset", "synthetic", "--quantize", "int8-dynamic")
