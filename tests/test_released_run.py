"""``pretrain ... import_run=FILE``: MoCo v3's released pretraining checkpoint, written as its
main_moco.py saves it, becomes a run's first checkpoint; ``resume=auto`` continues from its encoders,
projector and predictor with a fresh optimizer; a file of another architecture is one line."""

import copy

import pytest
import torch
from conftest import REPO, TINY_PRETRAIN
from safetensors.torch import load_file
from torch import nn

from selfsup.checkpoint import read_meta
from selfsup.config import load_config
from selfsup.files import file_sha256
from selfsup.models import BackboneSpec, create_backbone
from selfsup.runstate import MODEL_FILE, complete_checkpoints
from selfsup.ssl import cli
from selfsup.ssl import train as train_module
from selfsup.ssl.released import schedule_note
from selfsup.ssl.settings import PretrainConfig

# TINY_PRETRAIN's model, projector (3 layers 32 -> 32 -> 16) and predictor (16 -> 32 -> 16)
SPEC = BackboneSpec(
    "moco_vit_tiny",
    32,
    8,
    num_heads=2,
    pos_embed="sincos",
    init="moco_v3",
    extra={"depth": 1, "embed_dim": 32},
)


def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco/builder.py's ``MoCo._build_mlp``, line for line."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


# A ResNet as small as a test wants (timm's resnet18 with one block of 8 channels per stage)
RESNET_ARGS = [
    "model.arch=resnet18",
    "model.extra.layers=[1, 1, 1, 1]",
    "model.extra.channels=[8, 8, 8, 8]",
    "model.extra.stem_width=8",
]
RESNET_SPEC = BackboneSpec("resnet18", 32, extra={"layers": [1] * 4, "channels": [8] * 4, "stem_width": 8})


def released_run(path, epoch=1, spec=SPEC, head="head"):
    """main_moco.py's checkpoint of a DDP-wrapped MoCo_ViT (or, with ``head="fc"``, MoCo_ResNet):
    encoders whose ``head`` (``fc``) is the projector, the predictor, the epochs completed, AdamW's
    and the scaler's states."""
    torch.manual_seed(11)
    base = create_backbone(spec)
    vit = head == "head"
    setattr(base, head, build_mlp(3 if vit else 2, base.num_features, 32, 16))
    momentum = copy.deepcopy(base)
    predictor = build_mlp(2, 16, 32, 16, last_bn=vit)
    with torch.no_grad():  # every tensor its own value, BatchNorm statistics included
        for tensor in [*momentum.state_dict().values(), *predictor.state_dict().values()]:
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    optimizer = torch.optim.AdamW([*base.parameters(), *predictor.parameters()], lr=1e-3)
    predictor(base(torch.randn(4, 3, 32, 32))).sum().backward()
    optimizer.step()
    state = {}
    for name, module in (("base_encoder", base), ("momentum_encoder", momentum), ("predictor", predictor)):
        state |= {f"module.{name}.{k}": v.clone() for k, v in module.state_dict().items()}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    obj = {"epoch": epoch, "arch": "vit_tiny", "state_dict": state, "optimizer": optimizer.state_dict()}
    torch.save(obj | {"scaler": scaler}, path)
    return {k[len("module.") :]: v for k, v in state.items()}


def as_released(state, head="head"):
    """MoCoV3's keys back in main_moco.py's names (the test's own inverse of the import's mapping)."""
    names = {".backbone.": ".", ".projector.layers.": f".{head}.", "predictor.layers.": "predictor."}
    renamed = {}
    for key, value in state.items():
        for ours, theirs in names.items():
            if ours in key:
                key = key.replace(ours, theirs, 1)
                break
        renamed[key] = value
    return renamed


def refused(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY_PRETRAIN, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def test_a_released_run_is_imported_and_resumed_from_its_weights_with_a_fresh_optimizer(
    tmp_path, monkeypatch, capsys
):
    source, out = tmp_path / "vit-tiny-1ep.pth.tar", tmp_path / "run"
    released = released_run(source)
    cli.main([*TINY_PRETRAIN, f"out={out}", f"import_run={source}"])
    err = capsys.readouterr().err
    assert "optimizer, gradient scaler and random states are fresh" in err and "resume=auto" in err
    (checkpoint,) = complete_checkpoints(out)
    assert checkpoint.name == "step_00000004"  # epoch 1 of 64 images at batch 16
    assert torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"] == {}
    seen = {}
    forward = train_module.MocoStep.forward

    def first_forward(step, batch, progress):  # the weights the resumed run starts from
        seen.setdefault("state", {k: v.clone() for k, v in step.model.state_dict().items()})
        seen.setdefault("progress", progress)
        return forward(step, batch, progress)

    monkeypatch.setattr(train_module.MocoStep, "forward", first_forward)
    config = load_config(PretrainConfig, None, [*TINY_PRETRAIN, f"out={out}", "resume=auto", "max_steps=5"])
    result = train_module.train(config)
    assert result.status == "finished" and result.step == 5 and seen["progress"] == 1.0
    start = as_released(seen["state"])
    assert start.keys() == released.keys()
    assert all(torch.equal(start[k], v) for k, v in released.items())
    assert as_released(load_file(checkpoint / MODEL_FILE)).keys() == released.keys()
    meta = read_meta(result.backbone)  # the continued run's export names the released file
    assert meta.source == {"format": "moco-v3", "file": source.name, "sha256": file_sha256(source)}


def test_another_architecture_or_a_used_folder_is_refused_in_one_line(tmp_path, capsys):
    source = tmp_path / "released.pth.tar"
    released_run(source)
    err = refused(capsys, f"out={tmp_path / 'a'}", f"import_run={source}", "moco.dim=8")
    assert "does not fit the model" in err and "base_encoder.projector.layers.6.weight" in err
    assert not complete_checkpoints(tmp_path / "a")
    cli.main([*TINY_PRETRAIN, f"out={tmp_path / 'b'}", f"import_run={source}"])
    capsys.readouterr()
    err = refused(capsys, f"out={tmp_path / 'b'}", f"import_run={source}")
    assert "already holds a run's checkpoints" in err
    err = refused(capsys, f"out={tmp_path / 'c'}", f"import_run={source}", "epochs=1")
    assert "completed 1 epochs" in err
    torch.save({"model": {}}, tmp_path / "other.pth")
    err = refused(capsys, f"out={tmp_path / 'c'}", f"import_run={tmp_path / 'other.pth'}")
    assert "not a MoCo v3 pretraining checkpoint" in err


def test_a_released_resnet_run_keeps_its_fc_projector(tmp_path, capsys):
    """MoCo_ResNet keeps its projector as the ResNet's ``fc``: 2 layers, and a predictor without the final BN."""
    source, out = tmp_path / "r-50-1ep.pth.tar", tmp_path / "run"
    released = released_run(source, spec=RESNET_SPEC, head="fc")
    vit_model = [arg for arg in TINY_PRETRAIN if arg.startswith("model.")]
    args = [arg for arg in TINY_PRETRAIN if arg not in vit_model]
    cli.main([*args, *RESNET_ARGS, "model.img_size=32", f"out={out}", f"import_run={source}"])
    assert "resume=auto" in capsys.readouterr().err
    (checkpoint,) = complete_checkpoints(out)
    written = as_released(load_file(checkpoint / MODEL_FILE), head="fc")
    assert written.keys() == released.keys()
    assert all(torch.equal(written[k], v) for k, v in released.items())


def test_the_schedules_are_the_configs_over_its_epochs_not_the_files():
    """vit_base_in1k (warm-up 40) continuing a 300-epoch file to 400: the lr jumps from 0 back to
    0.5·(1 + cos(π·260/360)) ≈ 0.179 of its peak, the momentum from 1 down to 1 − 0.005·(1 − cos(π/4))."""
    config = load_config(PretrainConfig, REPO / "configs/pretrain/vit_base_in1k.yaml", ["epochs=400"])
    note = schedule_note(config, 300)
    assert "recomputed over epochs=400 (warm-up 40)" in note
    assert "lr restarts at 0.179 x its peak" in note and "momentum at 0.99854" in note
