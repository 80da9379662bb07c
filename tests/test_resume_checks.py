"""Refusals that change nothing, and resumes that notice what changed (issue 19, section 5): a refused
compress or pretrain resume leaves its folder byte for byte as it was; a resume on added images is
refused unless forced; a checkpoint file whose bytes differ from its recorded SHA-256 is skipped for
the one before; a resume says so; temporary files a killed export left are removed at the next start."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_PRETRAIN, save_model
from PIL import Image

from selfsup import runstate
from selfsup.compress import cli as compress_cli
from selfsup.config import load_config
from selfsup.data import DataOptions, build_dataset
from selfsup.errors import UsageError
from selfsup.files import atomic_path, remove_orphan_temporaries
from selfsup.models import BackboneSpec
from selfsup.ssl.settings import PretrainConfig
from selfsup.ssl.train import train

VIT = BackboneSpec(
    "moco_vit_tiny", 32, 8, pos_embed="learned", extra={"depth": 1, "embed_dim": 32, "num_heads": 2}
)


def add_images(root: Path, classes=("a", "b"), count=12, start=0) -> None:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            Image.new("RGB", (32, 32), (20 * i % 256, 90 * c, 40)).save(root / name / f"{i}.png")


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's and folder's bytes (hashed) and modification time under ``folder``."""
    return {
        str(p.relative_to(folder)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
    }


def pretrain_config(out, *extra):
    return load_config(PretrainConfig, None, [*TINY_PRETRAIN, f"out={out}", *extra])


def refused_line(capsys, main, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.fixture
def compressed(tmp_path, capsys):
    """A finished compress run (prune, one recovery step, report) on a small image folder."""
    images = tmp_path / "images"
    add_images(images)
    classifier = save_model(tmp_path, VIT, ["a", "b"], "finetune")
    args = [
        f"checkpoint={classifier}", f"dataset=imagefolder:{images}", "val_fraction=0.25", "prune=l1",
        "target_macs=0.6", "recover_epochs=2", "max_steps=1", "batch_size=8", "teacher=self", "threads=1",
        "num_workers=0", "progress_bar=false", "measure_memory=false", "latency_repeats=1",
        "latency_batches=[1]", "mixed_precision=no", f"out={tmp_path / 'run'}",
    ]  # fmt: skip
    compress_cli.main(args)
    capsys.readouterr()
    assert (tmp_path / "run" / "recovered.safetensors").is_file()
    return args, images, tmp_path / "run"


@pytest.mark.parametrize("change", ["recover_lr=0.01", "target_macs=0.4", "kd_alpha=0.2"])
def test_a_refused_compress_resume_writes_nothing(compressed, capsys, change):
    args, _, out = compressed
    before = snapshot(out)
    line = refused_line(capsys, compress_cli.main, [*args, change])
    assert change.split("=")[0] in line and "force_resume=true" in line, line
    assert snapshot(out) == before


def test_compress_refuses_to_resume_its_recovery_on_added_images(compressed, capsys):
    args, images, out = compressed
    add_images(images, count=6, start=12)
    before = snapshot(out)
    line = refused_line(capsys, compress_cli.main, args)
    assert "other data" in line and "18 images then, 27 now" in line, line
    assert snapshot(out) == before


def test_pretrain_refuses_to_resume_on_added_images_unless_forced(tmp_path, capsys):
    images = tmp_path / "images"
    add_images(images, count=16)
    data = [f"dataset=imagefolder:{images}", "hold_out_val=false"]
    out = tmp_path / "run"
    assert train(pretrain_config(out, *data, "max_steps=2")).step == 2
    add_images(images, count=8, start=16)
    before = snapshot(out)
    with pytest.raises(UsageError, match=r"other data \(32 images then, 48 now\).*force_resume=true"):
        train(pretrain_config(out, *data, "max_steps=4"))
    assert snapshot(out) == before
    capsys.readouterr()
    assert train(pretrain_config(out, *data, "max_steps=4", "force_resume=true")).step == 4
    assert "force_resume=true: continuing" in capsys.readouterr().err


def test_the_identity_counts_a_split_and_changes_with_a_renamed_file(tmp_path):
    add_images(tmp_path / "images")
    options = DataOptions(val_fraction=0.25, seed=0)
    name = f"imagefolder:{tmp_path / 'images'}"
    train_set, _ = build_dataset(name, "train", None, options)
    first = runstate.dataset_identity(train_set)
    assert first["images"] == 18 and len(first["files_sha256"]) == 64
    assert runstate.dataset_identity(build_dataset(name, "train", None, options)[0]) == first
    trained_on = Path(train_set.dataset.samples[train_set.indices[0]][0])  # a training image
    trained_on.rename(trained_on.with_name("renamed.png"))
    renamed = runstate.dataset_identity(build_dataset(name, "train", None, options)[0])
    assert renamed["images"] == 18 and renamed != first
    synthetic, _ = build_dataset("synthetic", "train", None, DataOptions(synthetic_size=40))
    assert runstate.dataset_identity(synthetic) == {"images": 40}


def flip_a_byte(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0xFF  # a weight, not the header: the size and the format stay valid
    path.write_bytes(bytes(payload))


def test_a_damaged_checkpoint_file_is_skipped_for_the_previous_checkpoint(tmp_path, capsys):
    train(pretrain_config(tmp_path, "max_steps=4", "save_every_steps=2"))
    first, latest = runstate.complete_checkpoints(tmp_path)
    assert runstate.damaged_file(latest) is None
    flip_a_byte(latest / runstate.MODEL_FILE)
    assert runstate.is_complete(latest) and runstate.damaged_file(latest) == runstate.MODEL_FILE
    capsys.readouterr()
    assert runstate.resolve_resume("auto", tmp_path) == first
    warning = capsys.readouterr().err.strip()
    assert str(latest / runstate.MODEL_FILE) in warning and "SHA-256" in warning and str(first) in warning
    with pytest.raises(UsageError, match="holds other bytes than the SHA-256"):
        runstate.resolve_resume(str(latest), tmp_path)
    result = train(pretrain_config(tmp_path, "max_steps=4", "save_every_steps=2"))
    assert result.step == 4 and f"resuming at step 2/4 from {first}" in capsys.readouterr().err
    for checkpoint in runstate.complete_checkpoints(tmp_path):
        flip_a_byte(checkpoint / "optimizer.bin")
    with pytest.raises(
        UsageError, match=r"optimizer.bin holds other bytes .* no earlier checkpoint .* resume=never"
    ):
        runstate.resolve_resume("auto", tmp_path)


def test_a_resumed_run_says_so_in_one_line(tmp_path, capsys):
    train(pretrain_config(tmp_path, "max_steps=2"))
    assert "resuming" not in capsys.readouterr().err
    train(pretrain_config(tmp_path, "max_steps=3"))
    (resumed,) = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    assert resumed == f"resuming at step 2/3 from {tmp_path / 'checkpoints' / 'step_00000002'}"


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


def test_temporary_files_of_a_killed_export_are_removed_at_the_next_start(tmp_path, capsys):
    orphan = tmp_path / f".backbone.safetensors.tmp-{_dead_pid()}-x1y2z3.safetensors"
    orphan.write_bytes(b"\0" * 4096)  # what a kill during the export of the backbone left
    train(pretrain_config(tmp_path, "max_steps=1"))
    assert not orphan.exists() and "removed 1 temporary file(s)" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_an_atomic_write_in_flight_is_named_for_its_process_and_kept(tmp_path):
    with atomic_path(tmp_path / "report.html") as tmp:
        tmp.write_text("in flight")
        assert tmp.name.startswith(".report.html.tmp-") and tmp.suffix == ".html"
        assert remove_orphan_temporaries(tmp_path) == [] and tmp.exists()
    assert (tmp_path / "report.html").read_text() == "in flight"
