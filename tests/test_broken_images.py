"""Image folders with unreadable files, in every stage: skipped (never replaced) in evaluation, reported
by path, counted out, and a training replacement always another image of the same training split."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from selfsup.checkpoint import CheckpointMeta, save_checkpoint
from selfsup.config import load_config
from selfsup.data import build_dataset
from selfsup.models import BackboneSpec, create_backbone
from selfsup.sampling import SeededImages

CLASSES, PER_CLASS, VAL_FRACTION = ("a", "b"), 8, 0.25
SPEC = BackboneSpec(
    arch="moco_vit_tiny",
    img_size=32,
    patch_size=8,
    pos_embed="sincos",
    init="moco_v3",
    extra={"depth": 1, "embed_dim": 32, "num_heads": 2},
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``root/<class>/<i>.jpg``, every image its own colour, no val/ (the val split is carved off), then
    one validation file truncated and one training file turned to garbage. The training one is chosen
    so that the folder's next file is a validation image: what a folder-wide replacement would take."""
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            colour = (30 * i, 120 * c, 255 - 30 * i)
            Image.new("RGB", (32, 32), colour).save(root / name / f"{i}.jpg", quality=95)
    train, _ = build_dataset(f"imagefolder:{root}", "train", val_fraction=VAL_FRACTION)
    val, _ = build_dataset(f"imagefolder:{root}", "val", val_fraction=VAL_FRACTION)
    samples = train.dataset.samples
    held_out = set(val.indices)
    bad_train = next(samples[i][0] for i in train.indices if i + 1 in held_out)
    bad_val = samples[val.indices[0]][0]
    with open(bad_val, "r+b") as f:
        f.truncate(Path(bad_val).stat().st_size // 2)
    with open(bad_train, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg at all")
    return root, bad_train, bad_val


def _pixels(path):
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def _split_pixels(split, *skip):
    return {
        _pixels(path) for path in (split.dataset.samples[i][0] for i in split.indices) if path not in skip
    }


def _save(path, stage, **head):
    """A tiny ViT at random init in the project format: a pretraining export, or with ``head`` a classifier."""
    torch.manual_seed(0)
    meta = CheckpointMeta(
        backbone=SPEC.to_dict(), img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, stage=stage, **head
    )
    return save_checkpoint(path, create_backbone(SPEC, head.get("num_classes", 0)).state_dict(), meta)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("pretrain") / "backbone", "pretrain")


def test_a_training_replacement_is_always_an_image_of_the_same_training_split(folder):
    root, bad_train, bad_val = folder
    name = f"imagefolder:{root}"
    train, _ = build_dataset(name, "train", val_fraction=VAL_FRACTION)  # drop: fine-tuning's and recovery's
    val, _ = build_dataset(name, "val", val_fraction=VAL_FRACTION)
    train_pixels, val_pixels = _split_pixels(train, bad_train), _split_pixels(val, bad_val)
    k = [train.dataset.samples[i][0] for i in train.indices].index(bad_train)
    assert train[k] is None
    # the sampler's index space: the replacement is the next readable image of the training split
    image, label = SeededImages(train, lambda x: x)[(k, 0)]
    assert image.tobytes() in train_pixels and image.tobytes() not in val_pixels
    assert (image.tobytes(), label) == (train[k + 1][0].tobytes(), train[k + 1][1])
    # a share of it (label_fraction): the replacement stays inside the share
    share = Subset(train, [k, (k + 2) % len(train), (k + 3) % len(train)])
    image, _ = SeededImages(share, lambda x: x)[(0, 0)]
    assert image.tobytes() == train[(k + 2) % len(train)][0].tobytes()
    # the replacing split of pretraining, fetched in batches as a DataLoader does (Subset.__getitems__)
    replacing, _ = build_dataset(name, "train", on_corrupt="replace", val_fraction=VAL_FRACTION)
    batch = next(iter(DataLoader(replacing, batch_size=len(replacing), collate_fn=list)))
    assert len(batch) == len(replacing) and all(im.tobytes() in train_pixels for im, _ in batch)


def _finetune_args(root, backbone, out):
    return [
        f"dataset=imagefolder:{root}",
        f"checkpoint={backbone}",
        f"val_fraction={VAL_FRACTION}",
        "batch_size=4",
        "epochs=1",
        "optim.warmup_epochs=0.5",
        "augment.mixup=0",
        "augment.cutmix=0",
        "mixed_precision=no",
        "num_workers=0",
        "threads=1",
        "progress_bar=false",
        "resume=never",
        f"out={out}",
    ]


def test_finetuning_skips_and_reports_an_unreadable_validation_image(folder, backbone, tmp_path, capsys):
    from selfsup.finetune.settings import FinetuneConfig
    from selfsup.finetune.train import train

    root, bad_train, bad_val = folder
    val, _ = build_dataset(f"imagefolder:{root}", "val", val_fraction=VAL_FRACTION)
    result = train(load_config(FinetuneConfig, None, _finetune_args(root, backbone, tmp_path)))
    assert result.status == "finished"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["images"] == len(val) - 1 and r["skipped"] == [bad_val] for r in records)
    report = (tmp_path / "report.md").read_text()
    assert bad_val in report and f"{len(val) - 1} validation images" in report
    err = capsys.readouterr().err
    assert bad_val in err and bad_train in err  # each in its split's one warning line


def test_evaluation_counts_each_readable_image_once(folder):
    from selfsup.accel import make_accelerator
    from selfsup.finetune.pipeline import build_pipeline
    from selfsup.finetune.settings import FinetuneConfig
    from selfsup.finetune.validation import evaluate

    root, _, bad_val = folder
    args = [
        f"dataset=imagefolder:{root}",
        "model=x",
        f"val_fraction={VAL_FRACTION}",
        "batch_size=4",
        "num_workers=0",
    ]
    cfg = load_config(FinetuneConfig, None, args)
    pipe = build_pipeline(cfg, 32, (0.5,) * 3, (0.25,) * 3, 0, 1, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    result = evaluate(make_accelerator("no"), model, pipe.val)
    val = pipe.val.dataset
    expected = sorted(val.dataset.targets[i] for i in val.indices if val.dataset.samples[i][0] != bad_val)
    assert sorted(result.labels.tolist()) == expected and result.skipped == [bad_val]
    assert pipe.val_size == len(expected)
    pipe.close()


def test_compress_skips_and_reports_an_unreadable_validation_image(folder, tmp_path, capsys):
    from selfsup.compress.pipeline import run
    from selfsup.compress.settings import CompressConfig

    root, bad_train, bad_val = folder
    classifier = _save(tmp_path / "classifier", "finetune", num_classes=2, class_names=list(CLASSES))
    args = [
        f"checkpoint={classifier}", f"dataset=imagefolder:{root}", f"val_fraction={VAL_FRACTION}",
        "prune=l1", "target_macs=0.7", "recover_epochs=1", "batch_size=4", "threads=1",
        "progress_bar=false", "measure_memory=false", "latency_repeats=1", "latency_batches=[1]",
        "mixed_precision=no", "resume=never", f"out={tmp_path / 'out'}",
    ]  # fmt: skip
    assert run(load_config(CompressConfig, None, args)).status == "finished"
    val, _ = build_dataset(f"imagefolder:{root}", "val", val_fraction=VAL_FRACTION)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images"] == len(val) - 1 and metrics["skipped"] == [bad_val]
    assert bad_val in (tmp_path / "out" / "report.md").read_text()
    err = capsys.readouterr().err
    assert bad_val in err and bad_train in err  # recovery replaced the training one and says so


def test_probe_and_pretraining_report_the_unreadable_files(folder, backbone, tmp_path, capsys):
    from conftest import TINY_PRETRAIN

    from selfsup.eval.cli import main
    from selfsup.ssl.settings import PretrainConfig
    from selfsup.ssl.train import train

    root, bad_train, bad_val = folder
    probe = [
        "--checkpoint", str(backbone), "--dataset", f"imagefolder:{root}", "--num-workers", "0",
        "--batch-size", "8", "--ks", "3", "--out", str(tmp_path / "probe"), "--cache-dir", str(tmp_path / "cache"),
        f"data.val_fraction={VAL_FRACTION}",
    ]  # fmt: skip
    assert main(probe) == 0
    val, _ = build_dataset(f"imagefolder:{root}", "val", val_fraction=VAL_FRACTION)
    model = json.loads((tmp_path / "probe" / "metrics.json").read_text())["models"][0]
    train_split, _ = build_dataset(f"imagefolder:{root}", "train", val_fraction=VAL_FRACTION)
    assert model["n_test"] == len(val) - 1 and model["n_train"] == len(train_split) - 1
    err = capsys.readouterr().err
    assert bad_val in err and bad_train in err
    pretrain = [
        *TINY_PRETRAIN, f"dataset=imagefolder:{root}", "batch_size=4", "epochs=1", "optim.warmup_epochs=0",
        "hold_out_val=true", f"val_fraction={VAL_FRACTION}", "resume=never", f"out={tmp_path / 'pretrain'}",
    ]  # fmt: skip
    assert train(load_config(PretrainConfig, None, pretrain)).status == "finished"
    err = capsys.readouterr().err
    assert bad_train in err and bad_val not in err  # the held-out image is never read for training
