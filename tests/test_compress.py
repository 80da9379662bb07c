"""Compression: pruning reaches its MACs target and keeps a working model, the pruned checkpoint
reloads with plain torch, the ONNX export matches torch, INT8 agrees with fp32, calibration is
deterministic, and bad input is one line with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, refused

from selfsup.checkpoint import CheckpointMeta, save_checkpoint
from selfsup.compress import cli
from selfsup.compress.prune import count, prune_l1
from selfsup.compress.quantize import check_export, export_onnx, quantize, run_onnx, session
from selfsup.models import BackboneSpec, create_backbone
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


@pytest.mark.parametrize("spec", [VIT, CNN], ids=["vit", "cnn"])
def test_pruning_reaches_the_target_macs_and_the_model_still_trains(spec):
    torch.manual_seed(0)
    model = create_backbone(spec, 10)
    x = torch.randn(2, 3, 32, 32)
    result = prune_l1(model, x, 0.5, search_steps=7)
    assert 0.4 <= result.macs_ratio <= 0.5  # at most the target, and near it
    assert (
        count(model, x) == (result.macs_after, result.params_after)
        and result.params_after < result.params_before
    )
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 10) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if spec is VIT:
        for block in model.blocks:  # whole heads leave: the attention's attributes follow the qkv
            attn = block.attn
            assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
            assert attn.proj.in_features == attn.attn_dim and attn.head_dim == 16
        assert model.patch_embed.proj.out_channels == 64 and model.head.in_features == 64  # kept whole


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
