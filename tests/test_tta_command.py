"""The tta command: sets on disk, protocol streams, the report, and bad input as one line + exit 2."""

import json

import numpy as np
import pytest
import torch
from conftest import refused, save_model

from selfsup.checkpoint import CheckpointMeta, save_checkpoint
from selfsup.models import BackboneSpec, create_backbone
from selfsup.tta import cli
from selfsup.tta.benchmark import open_set, stream
from selfsup.tta.generate import generate

SPEC = BackboneSpec("vit_tiny_patch16_224", 32, 8, extra={"depth": 2, "embed_dim": 32, "num_heads": 2})
NAMES = ("gaussian_noise", "contrast")


def classifier(folder, classes=3):
    return save_model(folder, SPEC, [f"c{i}" for i in range(classes)], "finetune")


def corruption_set(folder, n=12, severities=(1, 2, 3, 4, 5)):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    generate(images, np.arange(n) % 3, folder, NAMES, severities, seed=0, source="test")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    return classifier(root), corruption_set(root / "set")


def test_streams_cover_every_image_once_per_protocol(files):
    s = open_set(files[1])
    for protocol in ("reset", "continual"):
        batches = list(stream(s, NAMES, 3, protocol, 5))
        assert [b.corruption for b in batches if b.starts_task] == list(NAMES)
        assert sum(len(b.labels) for b in batches) == 2 * s.size
        first = np.concatenate([b.images for b in batches if b.corruption == NAMES[0]])
        assert sorted(map(bytes, first)) == sorted(map(bytes, s.images(NAMES[0], 3)))
    mixed = list(stream(s, NAMES, 3, "mixed", 5))
    sources = np.concatenate([b.sources for b in mixed])
    assert len(sources) == 2 * s.size and set(np.bincount(sources)) == {s.size}
    assert len(set(sources[:8])) == 2  # the corruptions are interleaved
    assert np.array_equal(
        np.concatenate([b.labels for b in stream(s, NAMES, 3, "reset", 5)]),
        np.concatenate([b.labels for b in stream(s, NAMES, 3, "reset", 5)]),
    )  # one seeded order, the same for every method


def test_severity_selects_its_block_of_the_stacked_file(files):
    s = open_set(files[1])
    stacked = np.load(files[1] / "contrast.npy")
    assert np.array_equal(s.images("contrast", 4), stacked[3 * s.size : 4 * s.size])


def test_the_command_writes_tables_report_and_results(files, tmp_path, capsys):
    checkpoint, folder = files
    out = tmp_path / "out"
    cli.main(
        [
            "--checkpoint", str(checkpoint), "--dataset", str(folder), "--method", "source,tent,eta,sar",
            "--batch-size", "4", "--out", str(out), "corruptions=gaussian_noise,contrast", "eata.d_margin=0.4",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| source |" in printed and "| tent |" in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["results"]}
    assert set(rows) == {"source", "tent", "eta", "sar"}
    assert rows["source"]["backwards"] == 0 and rows["tent"]["backwards"] == 2 * 3  # 12 images / 4 per batch
    assert all(0 <= e <= 100 for r in rows.values() for e in r["errors"].values())
    assert rows["source"]["clean_top1_after"] is not None
    assert (out / "report.html").is_file() and (out / "figures" / "errors.png").is_file()
    assert "regenerated" in (out / "report.md").read_text()


def test_continual_does_not_reset_between_corruptions_and_reset_does(files, tmp_path):
    checkpoint, folder = files
    errors = {}
    for protocol in ("reset", "continual"):
        out = tmp_path / protocol
        cli.main(
            [
                "--checkpoint", str(checkpoint), "--dataset", str(folder), "--method", "tent",
                "--protocol", protocol, "--batch-size", "4", "--out", str(out),
                "corruptions=gaussian_noise,contrast", "lr=0.5",
            ]
        )  # fmt: skip
        errors[protocol] = json.loads((out / "results.json").read_text())["results"][0]["errors"]
    assert errors["reset"]["gaussian_noise"] == errors["continual"]["gaussian_noise"]  # same start
    # the second corruption starts from the adapted model in continual only (lr large enough to show)
    out = tmp_path / "second_alone"
    cli.main(
        [
            "--checkpoint", str(checkpoint), "--dataset", str(folder), "--method", "tent",
            "--batch-size", "4", "--out", str(out), "corruptions=contrast", "lr=0.5",
        ]
    )  # fmt: skip
    alone = json.loads((out / "results.json").read_text())["results"][0]["errors"]["contrast"]
    assert errors["reset"]["contrast"] == alone


def _refused(capsys, *args):
    return refused(capsys, cli.main, *args)


def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys):
    checkpoint, folder = files
    common = ["--checkpoint", str(checkpoint), "--dataset", str(folder), "--out", str(tmp_path / "o")]
    assert "gaussian_noise" in _refused(capsys, *common, "--corruptions", "fog_of_war")  # lists valid names
    assert "severity must be 1, 2, 3, 4 or 5" in _refused(capsys, *common, "--severity", "6")
    assert "unknown method" in _refused(capsys, *common, "--method", "tent,bn_adapt")
    assert "no BatchNorm" in _refused(capsys, *common, "--method", "norm", "corruptions=contrast")

    torch.manual_seed(0)
    meta = CheckpointMeta(
        backbone=SPEC.to_dict(), img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, stage="pretrain"
    )
    backbone = save_checkpoint(tmp_path / "backbone", create_backbone(SPEC).state_dict(), meta)
    err = _refused(
        capsys, "--checkpoint", str(backbone), "--dataset", str(folder), "--out", str(tmp_path / "o")
    )
    assert "without a classifier head" in err

    bad = tmp_path / "bad_set"
    corruption_set(bad, n=6)
    np.save(bad / "labels.npy", np.zeros(7, dtype=np.int64))
    assert "do not match" in _refused(capsys, "--checkpoint", str(checkpoint), "--dataset", str(bad))

    many = tmp_path / "many_classes"
    corruption_set(many, n=6)
    np.save(many / "labels.npy", np.full(30, 7, dtype=np.int64))
    err = _refused(
        capsys, "--checkpoint", str(checkpoint), "--dataset", str(many), "--out", str(tmp_path / "o")
    )
    assert "3 classes" in err
    one = tmp_path / "one_severity"
    corruption_set(one, n=6, severities=(5,))
    err = _refused(
        capsys,
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        str(one),
        "--severity",
        "3",
        "--out",
        str(tmp_path / "o"),
    )
    assert "holds severities 5" in err
    assert "no folder" in _refused(
        capsys, "--checkpoint", str(checkpoint), "--dataset", "cifar100-c", "--data-root", str(tmp_path)
    )
