"""The checkpoint format: round trip, atomic writes, resampling, and clear load errors."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from selfsup import checkpoint as ckpt
from selfsup.checkpoint import CheckpointMeta, load_backbone, load_checkpoint, save_checkpoint, timm_call
from selfsup.errors import UsageError
from selfsup.models import MOCO_V3_ARCHS, BackboneSpec, create_backbone

SPEC = BackboneSpec(
    "vit_small_patch16_224", img_size=32, patch_size=4, extra={"depth": 2, "embed_dim": 32, "num_heads": 4}
)


def _meta(spec=SPEC, **kw):
    return CheckpointMeta(
        backbone=spec.to_dict(),
        img_size=spec.img_size,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
        stage="test",
        **kw,
    )


def test_round_trip_gives_equal_tensors_and_metadata(tmp_path):
    model = create_backbone(SPEC)
    meta = _meta(class_names=["a", "b"], num_classes=2, config={"lr": 0.1})
    path = save_checkpoint(tmp_path / "backbone", model.state_dict(), meta)
    assert path.name == "backbone.safetensors" and (tmp_path / "backbone.json").is_file()
    state, loaded = load_checkpoint(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert (
        loaded.class_names == ["a", "b"]
        and loaded.config == {"lr": 0.1}
        and list(loaded.mean) == [0.1, 0.2, 0.3]
    )
    assert loaded.weights_sha256 == meta.weights_sha256 and "torch" in loaded.versions
    rebuilt, _ = load_backbone(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_a_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model = create_backbone(SPEC)
    path = save_checkpoint(tmp_path / "backbone", model.state_dict(), _meta())
    before = path.read_bytes()

    def torn_replace(src, dst):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(os, "replace", torn_replace)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "backbone", state, _meta())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.json", "backbone.safetensors"]
    load_checkpoint(path)  # still consistent with its sidecar


def test_weights_from_another_save_are_refused(tmp_path):
    model = create_backbone(SPEC)
    path = save_checkpoint(tmp_path / "a", model.state_dict(), _meta())
    save_checkpoint(tmp_path / "b", {k: v * 2 for k, v in model.state_dict().items()}, _meta())
    os.replace(tmp_path / "b.safetensors", path)
    with pytest.raises(UsageError, match="does not match its sidecar"):
        load_checkpoint(path)


def test_224_16_vit_loads_into_a_32_4_model_by_resampling(tmp_path):
    big = BackboneSpec(
        "vit_small_patch16_224",
        img_size=224,
        patch_size=16,
        extra={"depth": 1, "embed_dim": 32, "num_heads": 4},
    )
    model = create_backbone(big)
    path = save_checkpoint(tmp_path / "vit224", model.state_dict(), _meta(big))
    small, meta = load_backbone(path, img_size=32, patch_size=4)
    assert small.pos_embed.shape == (1, 1 + 8 * 8, 32) and small.patch_embed.proj.weight.shape[-2:] == (4, 4)
    assert meta.img_size == 32 and meta.backbone["patch_size"] == 4
    assert torch.equal(small.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_sincos_pos_embed_is_rebuilt_for_the_new_grid_not_interpolated(tmp_path):
    from selfsup.models import sincos_pos_embed

    path = save_checkpoint(tmp_path / "vit", create_backbone(SPEC).state_dict(), _meta())
    bigger, _ = load_backbone(path, img_size=64)
    assert torch.equal(bigger.pos_embed, sincos_pos_embed((16, 16), 32))


def test_learned_pos_embed_is_resampled_not_reset(tmp_path):
    spec = BackboneSpec(
        "vit_small_patch16_224",
        img_size=64,
        patch_size=16,
        pos_embed="learned",
        extra={"depth": 1, "embed_dim": 32, "num_heads": 4},
    )
    model = create_backbone(spec)
    with torch.no_grad():
        model.pos_embed.normal_()
    path = save_checkpoint(tmp_path / "vit", model.state_dict(), _meta(spec))
    same, _ = load_backbone(path, img_size=64)
    assert torch.equal(same.pos_embed, model.pos_embed)
    bigger, _ = load_backbone(path, img_size=128)
    assert bigger.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(bigger.pos_embed[:, 0], model.pos_embed[:, 0])  # the class token's entry is kept


def test_mismatched_weights_give_one_error_listing_the_keys(tmp_path):
    model = create_backbone(SPEC)
    state = model.state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    path = save_checkpoint(tmp_path / "bad", state, _meta())
    with pytest.raises(UsageError) as err:
        load_backbone(path)
    text = str(err.value)
    assert "1 shape mismatches: blocks.0.mlp.fc1.weight" in text
    assert "1 missing keys: norm.weight" in text and "1 unexpected keys: extra.weight" in text


def test_missing_sidecar_says_what_a_checkpoint_is(tmp_path):
    with pytest.raises(UsageError, match="NAME.safetensors plus NAME.json"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UsageError, match="not a selfsup sidecar"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_classifier_head_is_kept_when_sizes_match(tmp_path):
    model = create_backbone(SPEC, num_classes=5)
    path = save_checkpoint(tmp_path / "clf", model.state_dict(), _meta(num_classes=5))
    again, _ = load_backbone(path, num_classes=5)
    assert torch.equal(again.head.weight, model.head.weight)
    backbone, _ = load_backbone(path)
    assert isinstance(backbone.head, torch.nn.Identity)
    ckpt.read_meta(path)


@pytest.mark.parametrize("alias", sorted(MOCO_V3_ARCHS))
def test_stock_timm_rebuilds_every_alias_from_the_sidecar_alone(tmp_path, alias):
    spec = BackboneSpec(arch=alias, img_size=32, frozen_patch_embed=True, init="moco_v3")
    ours = create_backbone(spec).eval()
    meta = CheckpointMeta(
        backbone=spec.to_dict(), img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, stage="pretrain"
    )
    path = save_checkpoint(tmp_path / "backbone", ours.state_dict(), meta, model=ours)
    side = json.loads(path.with_suffix(".json").read_text())["timm"]  # no selfsup below this line
    stock = timm.create_model(
        side["model_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(side["pretrained_cfg"], file=str(path)),
        **side["kwargs"],
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(x), ours(x), atol=1e-5)
    heads = {"moco_vit_small": 12, "moco_vit_base": 12, "moco_vit_tiny": 3}[alias]
    assert side["kwargs"]["num_heads"] == heads and side["pretrained_cfg"]["num_classes"] == 0
    assert "pretrained_cfg_overlay" in timm_call(path)


def test_the_timm_defaults_alone_would_build_a_different_vit_small(tmp_path):
    """Why the sidecar spells out every argument: timm's ViT-S has 6 heads, MoCo v3's 12."""
    spec = BackboneSpec(arch="moco_vit_small", img_size=32)
    ours = create_backbone(spec).eval()
    plain = timm.create_model("vit_small_patch16_224", img_size=32, num_classes=0).eval()
    plain.load_state_dict(ours.state_dict(), strict=True)  # loads without complaint...
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), ours(x), atol=1e-3)  # ...and computes something else


def test_identical_weights_get_identical_hashes_in_different_processes(tmp_path):
    script = (
        "import sys, torch; from selfsup.checkpoint import CheckpointMeta, save_checkpoint; "
        "from selfsup.models import BackboneSpec; torch.manual_seed(0); "
        "state = {'b': torch.randn(3), 'a': torch.randn(2, 2)}; "
        "meta = CheckpointMeta(backbone=BackboneSpec().to_dict(), img_size=32, mean=(0.5,)*3, std=(0.5,)*3, stage='test'); "
        "save_checkpoint(sys.argv[1], state, meta); print(meta.weights_sha256)"
    )
    hashes = {
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"w{i}")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for i in range(3)
    }
    assert len(hashes) == 1
