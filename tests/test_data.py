"""The dataset registry: built-in sets, image folders with corrupt files, shards, missing data."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from selfsup.builtin_data import stratified_split
from selfsup.data import DataOptions, build_dataset, class_targets
from selfsup.errors import UsageError
from selfsup.imagefolder import collate_skip_none, report_corrupt, to_rgb
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
    dataset, info = build_dataset(
        f"imagefolder:{tmp_path}", "train", eval_transform(8, (0.5,) * 3, (0.5,) * 3, 8), val_fraction=0.5
    )
    assert info.classes == ("cat", "dog")
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip_none, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == len(dataset) - (
        1 if any(dataset.dataset.samples[i][0] == str(bad) for i in dataset.indices) else 0
    )
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
    dataset, info = build_dataset(
        "imagenet22k", "train", eval_transform(8, (0.5,) * 3, (0.5,) * 3, 8), root=str(tmp_path)
    )
    assert info.classes == ("n01", "n02", "n03")
    labels = sorted(int(y) for _, y in DataLoader(dataset, batch_size=None, num_workers=2))
    assert labels == sorted(i % 3 for i in range(12))


@pytest.mark.parametrize("name", ["cifar100", "imagefolder:/nonexistent/place", "imagenet"])
def test_missing_data_is_one_clear_line_and_exit_code_2(tmp_path, name):
    result = subprocess.run(
        [sys.executable, "-m", "selfsup.datacli", name, "--data-root", str(tmp_path)],
        capture_output=True,
        text=True,
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
    assert (len(train), len(val)) == (18000, 2000) and info.image_size == 32
    assert not set(train.indices) & set(val.indices)
    assert np.bincount(class_targets(val)).tolist() == [200] * 10
    image, label = val[0]
    assert image.size == (32, 32) and label == class_targets(val)[0]


def test_data_cli_describes_a_dataset(capsys):
    from selfsup.datacli import main

    main(["digits"])
    out = capsys.readouterr().out
    assert "digits [train]: 1437 images, 10 classes present" in out and "digits [val]: 360 images" in out


# --- image folders as users have them ----------------------------------------------------------


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand: PIL cannot write one, but cameras and scanners do."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.round((c * a + 255 * (255 - a)) / 255).astype(np.uint8)


RNG = np.random.default_rng(7)
U8 = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
U16 = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)
PALETTE = np.array([[10, 20, 30], [200, 100, 0], [0, 255, 90], [250, 250, 5]], np.uint8)
INDICES = RNG.integers(0, 4, (6, 5), dtype=np.uint8)


def _palette_image(transparent: int | None) -> Image.Image:
    image = Image.fromarray(INDICES, "P")
    image.putpalette(PALETTE.ravel().tolist())
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def _expected_palette(transparent: int | None) -> np.ndarray:
    out = PALETTE[INDICES]
    if transparent is not None:
        out[transparent == INDICES] = 255
    return out


def _grey3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=2)


def _cmyk_to_rgb(x: np.ndarray) -> np.ndarray:
    c, k = x[..., :3].astype(np.float64), x[..., 3:].astype(np.float64)
    return np.round((255 - c) * (255 - k) / 255).astype(np.uint8)


MODES = {  # image in that mode -> the 8-bit RGB pixels it must become, computed directly
    "RGB": (lambda: Image.fromarray(U8[..., :3]), lambda: U8[..., :3]),
    "L": (lambda: Image.fromarray(U8[..., 0]), lambda: _grey3(U8[..., 0])),
    "1": (
        lambda: Image.fromarray(U8[..., 0] > 127),
        lambda: _grey3(np.where(U8[..., 0] > 127, 255, 0).astype(np.uint8)),
    ),
    "I;16": (lambda: Image.fromarray(U16), lambda: _grey3((U16 >> 8).astype(np.uint8))),
    "I": (lambda: Image.fromarray(U16.astype(np.int32)), lambda: _grey3((U16 >> 8).astype(np.uint8))),
    "P": (lambda: _palette_image(None), lambda: _expected_palette(None)),
    "P+transparency": (lambda: _palette_image(2), lambda: _expected_palette(2)),
    "RGBA": (lambda: Image.fromarray(U8, "RGBA"), lambda: _on_white(U8[..., :3], U8[..., 3])),
    "LA": (lambda: Image.fromarray(U8[..., :2], "LA"), lambda: _on_white(_grey3(U8[..., 0]), U8[..., 1])),
    "CMYK": (lambda: Image.fromarray(U8, "CMYK"), lambda: _cmyk_to_rgb(U8)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_to_rgb_matches_a_direct_computation_per_mode(mode):
    make, expected = MODES[mode]
    image = make()
    assert image.mode == mode.split("+")[0]
    out = to_rgb(image)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected())


@pytest.mark.parametrize(
    "image", [Image.fromarray(np.float32([[0.5, 2.0]])), Image.fromarray(np.int32([[-1, 70000]]))]
)
def test_to_rgb_refuses_values_with_no_8bit_reading(image):
    with pytest.raises(ValueError, match="mode F|outside 16 bits"):
        to_rgb(image)


def test_imagefolder_loads_every_format_pil_reads_and_lists_what_it_ignores(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rgb16 = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    (a / "rgb16.png").write_bytes(_png16_rgb(rgb16))
    Image.fromarray(U16).save(a / "grey16.png")
    _palette_image(2).save(a / "palette.png")
    _palette_image(None).save(a / "anim.gif")
    Image.fromarray(U8, "CMYK").save(a / "cmyk.tiff")
    Image.fromarray(U8, "RGBA").save(b / "rgba.png")
    Image.fromarray(U8[..., :2], "LA").save(b / "la.png")
    Image.fromarray(U8[..., :3]).save(b / "lossless.webp", lossless=True)
    Image.fromarray(U8[..., :3]).save(b / "plain.BMP")
    (b / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("a file outside any class folder")
    expected = {
        "rgb16.png": (rgb16 >> 8).astype(np.uint8),  # PIL's PNG decoder keeps the high byte of 16-bit colour
        "grey16.png": _grey3((U16 >> 8).astype(np.uint8)),
        "palette.png": _expected_palette(2),
        "anim.gif": _expected_palette(None),
        "cmyk.tiff": _cmyk_to_rgb(U8),
        "rgba.png": _on_white(U8[..., :3], U8[..., 3]),
        "la.png": _on_white(_grey3(U8[..., 0]), U8[..., 1]),
        "lossless.webp": U8[..., :3],
        "plain.BMP": U8[..., :3],
    }
    dataset, _ = build_dataset(f"imagefolder:{tmp_path}", "train", val_fraction=0.5)
    folder = dataset.dataset
    assert sorted(Path(p).name for p, _ in folder.samples) == sorted(expected)
    for i, (path, label) in enumerate(folder.samples):
        image, y = folder[i]
        assert y == label and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), expected[Path(path).name]), path
    err = capsys.readouterr().err
    assert "ignored 2 file(s)" in err and str(b / "notes.txt") in err and str(tmp_path / "README") in err


def _tree(root, sizes: dict, side: int = 8):
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((side, side, 3), 20 * i, np.uint8)).save(root / name / f"{i}.png")


def test_stratified_split_handles_singletons_and_fewer_val_images_than_classes(capsys):
    targets = np.array([0] * 40 + [1] * 2 + [2] + [3] * 3 + [4] + [5] * 2)
    names = ["big", "pair", "lonely", "three", "alone", "duo"]
    train, val = stratified_split(targets, 0.05, seed=3, class_names=names, name="uneven")
    assert sorted([*train, *val]) == list(range(len(targets))) and not set(train) & set(val)
    assert set(np.flatnonzero(np.isin(targets, [2, 4]))) <= set(train)  # singletons: train only
    for c in (0, 1, 3, 5):  # every class that can be split is on both sides
        assert c in targets[val] and c in targets[train]
    err = capsys.readouterr().err
    assert "2 class(es) with a single image go wholly to train" in err and "lonely, alone" in err
    ten, _ = stratified_split(np.repeat(np.arange(10), 3), 0.1, name="tiny")  # 3 of 30 asked, 10 classes
    _, val = stratified_split(np.repeat(np.arange(10), 3), 0.1, name="tiny")
    assert sorted(np.repeat(np.arange(10), 3)[val]) == list(range(10)) and len(ten) == 20
    assert "holding out 10" in capsys.readouterr().err


def test_a_val_split_that_would_be_empty_is_one_clear_line():
    with pytest.raises(UsageError, match="no class has 2 or more images") as err:
        stratified_split(np.arange(5), 0.1, name="singles")
    assert "\n" not in str(err.value) and "val/" in str(err.value)


def test_singleton_classes_no_longer_crash_the_data_cli(tmp_path, capsys):
    from selfsup.datacli import main

    _tree(tmp_path / "train", {"many": 6, "one": 1, "few": 3})
    main([f"imagefolder:{tmp_path}", "--val-fraction", "0.1"])
    out, err = capsys.readouterr()
    assert "[train]: 8 images, 3 classes present" in out and "[val]: 2 images, 2 classes present" in out
    assert "single image go wholly to train" in err and ": one" in err


def test_an_empty_class_is_skipped_without_shifting_labels(tmp_path, capsys):
    _tree(tmp_path / "train", {"ant": 4, "bee": 0, "cat": 4})
    _tree(tmp_path / "val", {"ant": 2, "cat": 2})  # val/ lacks bee entirely
    train, info = build_dataset(f"imagefolder:{tmp_path}", "train")
    val, val_info = build_dataset(f"imagefolder:{tmp_path}", "val")
    assert info.classes == val_info.classes == ("ant", "bee", "cat")
    assert sorted(set(class_targets(train))) == sorted(set(class_targets(val))) == [0, 2]
    assert all(y == 2 for p, y in val.samples if "/cat/" in p)
    err = capsys.readouterr().err
    assert "1 class folder(s)" in err and "hold no images and are skipped" in err and ": bee" in err


def test_val_class_unknown_to_train_and_a_folder_without_images_are_usage_errors(tmp_path):
    _tree(tmp_path / "train", {"ant": 2, "cat": 2})
    _tree(tmp_path / "val", {"ant": 1, "dog": 1})
    with pytest.raises(UsageError, match="class folders that .* lacks \\(dog\\)"):
        build_dataset(f"imagefolder:{tmp_path}", "val")
    _tree(tmp_path / "empty", {"x": 0, "y": 0})
    with pytest.raises(UsageError, match="no images found"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}")
    _tree(tmp_path / "flat", {"ant": 2, "val": 2})
    with pytest.raises(UsageError, match="has val/ but no train/"):
        build_dataset(f"imagefolder:{tmp_path / 'flat'}")


def _cli_error(argv, capsys) -> str:
    from selfsup.datacli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_a_single_class_is_exit_2_for_classification_and_fine_without_labels(tmp_path, capsys):
    _tree(tmp_path, {"only": 4})
    assert "needs 2 or more class folders" in _cli_error([f"imagefolder:{tmp_path}"], capsys)
    dataset, info = build_dataset(f"imagefolder:{tmp_path}", "train", need_labels=False)
    assert info.classes == ("only",) and len(dataset) == 3
    _tree(tmp_path / "more", {"full": 2, "hollow": 0})
    with pytest.raises(UsageError, match="only one class folder .* holds images"):
        build_dataset(f"imagefolder:{tmp_path / 'more'}")


@pytest.mark.parametrize("name", ["digits", "cifar10", "imagefolder:HASVAL"])
@pytest.mark.parametrize("fraction", ["1.5", "0", "-0.1"])
def test_val_fraction_out_of_range_is_exit_2_even_where_unused(tmp_path, capsys, name, fraction):
    _tree(tmp_path / "train", {"a": 2, "b": 2})
    _tree(tmp_path / "val", {"a": 1, "b": 1})
    name = name.replace("HASVAL", str(tmp_path))
    line = _cli_error([name, "--data-root", str(tmp_path), "--val-fraction", fraction], capsys)
    assert "val_fraction must be strictly between 0 and 1" in line and fraction in line


def test_data_cli_counts_images_that_load_and_names_the_broken_ones(tmp_path, capsys):
    from selfsup.datacli import main

    _tree(tmp_path / "train", {"a": 3, "b": 3})
    _tree(tmp_path / "val", {"a": 2, "b": 2})
    broken = tmp_path / "val" / "b" / "9.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    main([f"imagefolder:{tmp_path}"])
    out, err = capsys.readouterr()
    assert "[train]: 6 images" in out
    assert "[val]: 4 images, 2 classes present; 1 file(s) do not load" in out and str(broken) in err


# --- native image size and evaluation preprocessing ----------------------------------------------


def test_a_folder_of_32px_images_records_32_and_is_evaluated_whole(tmp_path):
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(
        tmp_path / "x" / "odd.png"
    )  # the median ignores one outlier
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    _, info = build_dataset(f"imagefolder:{tmp_path}", "train")
    assert info.image_size == 32
    transform = eval_transform(32, mean, std, info.image_size)
    dataset, _ = build_dataset(f"imagefolder:{tmp_path}", "train", transform)
    x, _ = dataset[0]
    pixels = np.asarray(Image.open(dataset.dataset.samples[dataset.indices[0]][0]), np.float32) / 255
    plain = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(
        std
    )[:, None, None]
    assert torch.allclose(x, plain, atol=1e-6)  # no resize, no crop: the normalised image itself
    bigger = eval_transform(64, mean, std, info.image_size)(
        Image.fromarray(np.asarray(pixels * 255, np.uint8))
    )
    assert bigger.shape == (3, 64, 64) and "CenterCrop(size=(64, 64))" in repr(
        eval_transform(64, mean, std, 32)
    )
    assert "Resize(size=64," in repr(
        eval_transform(64, mean, std, 32)
    )  # upsampled whole, the crop removes nothing


def test_missing_torchvision_data_names_a_command_that_exists(tmp_path):
    with pytest.raises(UsageError) as err:
        build_dataset("cifar10", "train", options=DataOptions(root=str(tmp_path)))
    assert f"selfsup-data cifar10 --download --data-root {tmp_path}" in str(err.value)
    assert "add --download" not in str(err.value)
