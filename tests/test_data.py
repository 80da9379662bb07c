"""The dataset registry: built-in sets, image folders with corrupt files, shards, missing data."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from selfsup.data import DataOptions, build_dataset, class_targets
from selfsup.errors import UsageError
from selfsup.imagefolder import collate_skip_none, report_corrupt
from selfsup.transforms import eval_transform


def test_digits_is_rgb_32px_with_disjoint_stratified_splits():
    train, info = build_dataset("digits", "train")
    val, _ = build_dataset("digits", "val")
    assert info.classes == tuple(str(d) for d in range(10)) and info.image_size == 32
    image, label = train[0]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= label < 10
    assert len(train) + len(val) == 1797
    assert set(np.unique(class_targets(val))) == set(range(10))
    train_pixels = {train.images[i].tobytes() for i in range(len(train))}
    assert not any(val.images[i].tobytes() in train_pixels for i in range(len(val)))
    assert all(0 < s < 1 for s in info.std)


def test_synthetic_is_deterministic_and_transforms_apply():
    options = DataOptions(synthetic_size=16, synthetic_classes=4)
    a, info = build_dataset("synthetic", "train", eval_transform(32, (0.5,) * 3, (0.25,) * 3, 32), options)
    b, _ = build_dataset("synthetic", "train", eval_transform(32, (0.5,) * 3, (0.25,) * 3, 32), options)
    x, y = a[3]
    assert x.shape == (3, 32, 32) and torch.equal(x, b[3][0]) and y == b[3][1]
    assert info.num_classes == 4


def _write_tree(root, classes=("cat", "dog"), per_class=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_skips_and_reports_a_corrupt_file(tmp_path, capsys):
    _write_tree(tmp_path / "train")
    bad = tmp_path / "train" / "dog" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset, info = build_dataset(f"imagefolder:{tmp_path}", "train", eval_transform(8, (0.5,) * 3, (0.5,) * 3, 8), val_fraction=0.5)
    assert info.classes == ("cat", "dog")
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip_none, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == len(dataset) - (1 if any(dataset.dataset.samples[i][0] == str(bad) for i in dataset.indices) else 0)
    full, _ = build_dataset(f"imagefolder:{tmp_path}", "train", val_fraction=0.5)
    _ = [full[i] for i in range(len(full))]
    val, _ = build_dataset(f"imagefolder:{tmp_path}", "val", val_fraction=0.5)
    _ = [val[i] for i in range(len(val))]
    reported = report_corrupt(full) + report_corrupt(val)
    assert [path for path, _ in reported] == [str(bad)]
    assert str(bad) in capsys.readouterr().err


def test_imagefolder_replace_keeps_the_batch_full_with_true_labels(tmp_path):
    _write_tree(tmp_path, classes=("a", "b"), per_class=3)
    (tmp_path / "a" / "0.png").write_bytes(b"garbage")
    dataset, _ = build_dataset(f"imagefolder:{tmp_path}", "train", on_corrupt="replace", val_fraction=0.5)
    folder = dataset.dataset
    image, label = folder[0]  # a/0.png is corrupt: its neighbour a/1.png comes instead
    assert label == folder.samples[1][1] and image.size == (8, 8)


def test_imagefolder_strict_stops_at_the_corrupt_file(tmp_path):
    _write_tree(tmp_path, classes=("a", "b"), per_class=3)
    (tmp_path / "a" / "0.png").write_bytes(b"garbage")
    dataset, _ = build_dataset(f"imagefolder:{tmp_path}", "train", strict=True, val_fraction=0.5)
    with pytest.raises(UsageError, match="corrupt image .*0.png"):
        dataset.dataset[0]


def test_webdataset_shards_written_here_read_back_in_full(tmp_path):
    import webdataset as wds

    shard_dir = tmp_path / "imagenet22k" / "train"
    shard_dir.mkdir(parents=True)
    with wds.ShardWriter(str(shard_dir / "shard-%04d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:03d}", "png": buf.getvalue(), "cls": str(i % 3).encode()})
    (shard_dir / "classes.txt").write_text("n01\nn02\nn03\n")
    dataset, info = build_dataset("imagenet22k", "train", eval_transform(8, (0.5,) * 3, (0.5,) * 3, 8), root=str(tmp_path))
    assert info.classes == ("n01", "n02", "n03")
    labels = sorted(int(y) for _, y in DataLoader(dataset, batch_size=None, num_workers=2))
    assert labels == sorted(i % 3 for i in range(12))


@pytest.mark.parametrize("name", ["cifar100", "imagefolder:/nonexistent/place", "imagenet"])
def test_missing_data_is_one_clear_line_and_exit_code_2(tmp_path, name):
    result = subprocess.run(
        [sys.executable, "-m", "selfsup.datacli", name, "--data-root", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert "expected" in lines[0] and (str(tmp_path) in lines[0] or "/nonexistent/place" in lines[0])


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'cifar100'"):
        build_dataset("cifar1000")


@pytest.mark.shared_data
def test_shared_cifar10_subset_loads_through_imagefolder(cifar10_subset):
    train, info = build_dataset(f"imagefolder:{cifar10_subset}", "train", val_fraction=0.1)
    val, _ = build_dataset(f"imagefolder:{cifar10_subset}", "val", val_fraction=0.1)
    assert info.classes[:3] == ("airplane", "automobile", "bird") and info.num_classes == 10
    assert (len(train), len(val)) == (18000, 2000)
    assert not set(train.indices) & set(val.indices)
    assert np.bincount(class_targets(val)).tolist() == [200] * 10
    image, label = val[0]
    assert image.size == (32, 32) and label == class_targets(val)[0]


def test_data_cli_describes_a_dataset(capsys):
    from selfsup.datacli import main

    main(["digits"])
    out = capsys.readouterr().out
    assert "digits [train]: 1437 images, 10 classes present" in out and "digits [val]: 360 images" in out
