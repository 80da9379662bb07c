"""ImageNet-C: the 224-px generator writes the released layout, the folder reader streams it, and
``tta --dataset imagenet-c`` runs on a tiny generated set; SAR's label-shift stream."""

import json

import numpy as np
import pytest
from conftest import refused, save_model
from PIL import Image

from selfsup.errors import UsageError
from selfsup.models import BackboneSpec
from selfsup.tta import cli
from selfsup.tta.benchmark import open_set, stream
from selfsup.tta.corruptions import image_rng
from selfsup.tta.generate_imagenet_c import generate_folders
from selfsup.tta.imagenet_c import SUPPORTED, corrupt_224
from selfsup.tta.label_shift import label_shift_order

SPEC = BackboneSpec("vit_tiny_patch16_224", 32, 8, extra={"depth": 2, "embed_dim": 32, "num_heads": 2})
WNIDS = ("n01440764", "n01443537")
NAMES = ("gaussian_noise", "contrast")


def source_folder(root):
    """2 classes x 3 images of 64-256 px, one a PNG (saved as .JPEG in the set)."""
    rng = np.random.default_rng(0)
    for k, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for i, (w, h) in enumerate([(64, 80), (256, 200), (120, 120)]):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(root / wnid / (f"img{k}{i}.png" if i == 2 else f"img{k}{i}.JPEG"))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("inc")
    source = source_folder(root / "val")
    manifest = generate_folders(source, root / "ImageNet-C", NAMES, (1, 2), seed=0)
    checkpoint = save_model(root, SPEC, list(WNIDS), "finetune")
    return root, manifest, checkpoint


def test_generator_writes_the_released_layout_deterministically(built, tmp_path):
    root, manifest, _ = built
    out = root / "ImageNet-C"
    for name in NAMES:
        for severity in (1, 2):
            files = sorted(
                p.relative_to(out / name / str(severity)).as_posix()
                for p in (out / name / str(severity)).rglob("*.JPEG")
            )
            assert files == [f"{w}/img{k}{i}.JPEG" for k, w in enumerate(WNIDS) for i in range(3)]
    with Image.open(out / "contrast" / "2" / WNIDS[1] / "img10.JPEG") as image:
        assert image.size == (224, 224) and image.format == "JPEG"
    assert (
        manifest["regenerated"]
        and manifest["images_per_severity"] == 6
        and "frost" in manifest["not_generated"]
    )
    again = generate_folders(root / "val", tmp_path / "again", NAMES[:1], (2,), seed=0)
    assert again["source_sha256"] == manifest["source_sha256"]
    for path in (tmp_path / "again" / NAMES[0] / "2").rglob("*.JPEG"):
        assert (
            path.read_bytes()
            == (out / NAMES[0] / "2" / path.relative_to(tmp_path / "again" / NAMES[0] / "2")).read_bytes()
        )


def test_every_supported_corruption_runs_at_224_and_frost_is_refused(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for name in SUPPORTED:
        if name == "glass_blur":
            continue  # seconds per image at 224 px (a pixel loop, as the original's)
        out = corrupt_224(image, name, 3, image_rng(0, name, 3, 0))
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    with pytest.raises(UsageError, match="frost"):
        generate_folders(tmp_path, tmp_path / "out", ["frost"], (1,))


def test_folder_set_streams_every_image_once_per_protocol(built):
    s = open_set(built[0] / "ImageNet-C")
    assert s.available == NAMES and s.severities == (1, 2) and s.size == 6
    batches = list(stream(s, NAMES, 2, "reset", 4))
    assert [b.corruption for b in batches if b.starts_task] == list(NAMES)
    assert all(b.images.shape[1:] == (224, 224, 3) and b.images.dtype == np.uint8 for b in batches)
    assert sorted(np.concatenate([b.labels for b in batches]).tolist()) == [0] * 6 + [1] * 6
    mixed = np.concatenate([b.sources for b in stream(s, NAMES, 2, "mixed", 4)])
    assert len(mixed) == 12 and set(np.bincount(mixed)) == {6}
    shifted = list(stream(s, NAMES[:1], 1, "reset", 4, label_shift=1e6))
    assert sum(len(b.labels) for b in shifted) == 12  # SAR's stream: 2 x the images


def test_label_shift_order_walks_the_classes_in_blocks():
    labels = np.repeat(np.arange(10), 50)
    order = label_shift_order(labels, 500000, 1000, np.random.default_rng(0))
    assert len(order) == 1000
    blocks = labels[order].reshape(10, 100)
    assert all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == 10
    uniform = label_shift_order(labels, 1, 1000, np.random.default_rng(0))
    assert len(set(labels[uniform][:100])) == 10


def test_tta_runs_on_imagenet_c_and_refuses_a_classifier_without_wnids(built, tmp_path, capsys):
    root, _, checkpoint = built
    out = tmp_path / "out"
    cli.main(
        [
            "--checkpoint", str(checkpoint), "--dataset", "imagenet-c", "--data-root", str(root),
            "--method", "source,tent,eata,sar", "--batch-size", "4", "--severity", "2", "--out", str(out),
            "workers=0", "eata.fisher_size=4",
        ]
    )  # fmt: skip
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(rows) == {"source", "tent", "eata", "sar"} and rows["tent"]["backwards"] == 2 * 2
    assert rows["source"]["clean_top1_after"] is not None
    assert set(rows["source"]["errors"]) == set(NAMES)
    other = save_model(tmp_path, SPEC, ["cat", "dog"], "finetune")
    capsys.readouterr()
    args = (
        "--checkpoint",
        str(other),
        "--dataset",
        "imagenet-c",
        "--data-root",
        str(root),
        "--severity",
        "2",
    )
    err = refused(capsys, cli.main, *args)
    assert "wnids" in err


@pytest.mark.parametrize("extra", [["--protocol", "mixed", "--batch-size", "1"], ["label_shift=500000"]])
def test_sars_wild_settings_run_on_imagenet_c(built, tmp_path, extra):
    root, _, checkpoint = built
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--dataset", "imagenet-c", "--data-root", str(root)]
    cli.main([*args, "--method", "source,sar", "--severity", "1", "--out", str(out), "workers=0", *extra])
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["sar"]["images"] == (12 if "mixed" in extra else 24)  # SAR's label stream: 2 x the images
