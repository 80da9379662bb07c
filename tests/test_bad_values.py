"""Bad values end in one line and exit 2 before any work, in every stage (issue 19, section 6).

Two halves: every config field of every stage declares the values it accepts (a rule beside the
field, :func:`selfsup.config.setting`) and refuses one outside it; and each bad input the issue found
(a traceback, or silent acceptance) is now one ``error:`` line, exit 2, nothing written to ``out``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import numpy as np
import pytest
from conftest import refused, save_model

from selfsup.compress import cli as compress_cli
from selfsup.compress.settings import CompressConfig
from selfsup.config import load_config, rule_of
from selfsup.errors import UsageError
from selfsup.eval import cli as probe_cli
from selfsup.eval.probe import ProbeConfig
from selfsup.finetune import cli as finetune_cli
from selfsup.finetune.settings import FinetuneConfig
from selfsup.models import BackboneSpec
from selfsup.ssl import cli as pretrain_cli
from selfsup.ssl.settings import PretrainConfig
from selfsup.tta import cli as tta_cli
from selfsup.tta import generate as generate_cli
from selfsup.tta.settings import TTAConfig

STAGES = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "tta": TTAConfig,
    "compress": CompressConfig,
    "probe": ProbeConfig,
}
# Free text with no rule of its own at load time: paths, names checked where they are used
# (the dataset registry, timm's model registry, the checkpoint reader).
FREE = {
    "dataset", "data_root", "out", "checkpoint", "checkpoints", "model", "models", "model_kwargs",
    "resume", "import_run", "teacher", "distill.teacher", "corruptions", "methods", "feature", "cache_dir",
    "data.root", "model.arch", "model.extra", "linear_head.device",
}  # fmt: skip
# Strings with a rule that checks them, and a value each refuses.
CHECKED_TEXT = {"augment.rand_augment": "rand-bogus"}


def _unwrap(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if optional and len(args) == 1 else annotation


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kind


def _numeric(kind) -> bool:
    if kind in (int, float):
        return True
    args = [a for a in typing.get_args(kind) if a is not Ellipsis]
    return typing.get_origin(kind) in (list, tuple) and bool(args) and all(a in (int, float) for a in args)


FIELDS = [(stage, key, f, kind) for stage, cls in STAGES.items() for key, f, kind in _fields(cls)]
NUMERIC = [(stage, key, f, kind) for stage, key, f, kind in FIELDS if _numeric(kind)]


def _ident(entry):
    return f"{entry[0]}:{entry[1]}"


@pytest.mark.parametrize("entry", FIELDS, ids=map(_ident, FIELDS))
def test_every_field_declares_what_it_accepts(entry):
    """A number needs a rule; a bool or Literal is ruled by its type; free text is listed above."""
    stage, key, f, kind = entry
    ruled_by_type = kind is bool or typing.get_origin(kind) is typing.Literal
    assert rule_of(f) is not None or ruled_by_type or key in FREE, (
        f"{stage} config key '{key}' ({kind}) declares no rule: give it one with selfsup.config.setting"
    )
    if _numeric(kind):
        assert rule_of(f) is not None, f"{stage} numeric config key '{key}' declares no rule"


def _outside(rule, number: type) -> list:
    """Values just outside ``rule``: each bound crossed, a value not among the choices, NaN and inf."""
    step = 1 if number is int else 0.5
    values = [v for v in (rule.gt, rule.lt) if v is not None]
    values += [rule.ge - step] if rule.ge is not None else []
    values += [rule.le + step] if rule.le is not None else []
    values += [max(rule.choices) + 1] if rule.choices else []
    values = [number(v) for v in values]
    return values + ([math.nan, math.inf] if number is float else [])


def _text(value, f, kind) -> str:
    """``value`` as command-line text for field ``f``; in a list or tuple it replaces the first item."""
    if not _numeric(kind) or kind in (int, float):
        return str(value)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "[" + ", ".join(map(str, [value, *list(default)[1:]])) + "]"


def _bad_values():
    for stage, key, f, kind in FIELDS:
        rule = rule_of(f)
        if key in CHECKED_TEXT:
            yield stage, key, CHECKED_TEXT[key]
        elif typing.get_origin(kind) is typing.Literal:
            yield stage, key, "bogus"
        elif kind is bool:
            yield stage, key, "maybe"
        elif rule is not None and _numeric(kind):
            items = typing.get_args(kind) or (kind,)
            number = float if float in items else int
            for value in _outside(rule, number):
                yield stage, key, _text(value, f, kind)
            if rule.nonempty and typing.get_origin(kind) is list:
                yield stage, key, "[]"


BAD = list(_bad_values())


@pytest.mark.parametrize(("stage", "key", "text"), BAD, ids=[f"{s}:{k}={t}" for s, k, t in BAD])
def test_a_value_outside_a_fields_rule_is_refused_in_one_line_naming_the_key(stage, key, text):
    with pytest.raises(UsageError) as refusal:
        load_config(STAGES[stage], None, [f"{key}={text}"])
    message = str(refusal.value)
    assert key in message and "\n" not in message, message
    assert "got" in message or "expects" in message or "must be one of" in message, message


def test_the_repos_configs_hold_every_rule():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for stage, folder in (("pretrain", "pretrain"), ("finetune", "finetune")):
        for path in sorted((root / folder).glob("*.yaml")):
            load_config(STAGES[stage], path)


# --- the table, row by row: exit 2, one line, no traceback, nothing written --------------


def _refused_before_work(capsys, main, out, *args) -> str:
    err = refused(capsys, main, *args, f"out={out}")
    assert not out.exists(), f"{out} was written before the refusal"
    return err


PRETRAIN = ("dataset=synthetic", "synthetic_size=16", "batch_size=8", "epochs=1")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("seed=-1",), "seed must be at least 0, got -1"),
        (("max_steps=0",), "max_steps must be at least 1"),
        (("max_steps=-1",), "max_steps must be at least 1"),
        (("model.img_size=30", "model.patch_size=8"), "not a multiple of"),
        (("model.img_size=32", "model.patch_size=5"), "patch size 5"),
        (("optim.base_lr=nan",), "optim.base_lr must be a finite number above 0"),
    ],
)
def test_pretrain_refuses_before_any_work(capsys, tmp_path, args, says):
    err = _refused_before_work(capsys, pretrain_cli.main, tmp_path / "run", *PRETRAIN, *args)
    assert says in err, err


FINETUNE = ("--dataset", "synthetic", "--model", "vit_tiny_patch16_224", "epochs=2", "optim.warmup_epochs=1")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("img_size=32", "patch_size=5"), "patch size 5"),
        (("img_size=30",), "not a multiple of vit_tiny_patch16_224's patch size 16"),
        (("augment.rand_augment=rand-bogus",), "augment.rand_augment must be a timm RandAugment string"),
        (("augment.rand_augment=rand-m9x",), "augment.rand_augment must be a timm RandAugment string"),
        (("img_size=-32",), "img_size must be at least 1"),
        (("model_kwargs.img_size=32",), "set img_size=32 instead"),
    ],
)
def test_finetune_refuses_before_any_work(capsys, tmp_path, args, says):
    err = _refused_before_work(capsys, finetune_cli.main, tmp_path / "run", *FINETUNE, *args)
    assert says in err, err


@pytest.mark.parametrize(
    "args",
    [
        ("kd_alpha=2",),
        ("limit=-5",),
        ("kd_temperature=0",),
        ("recover_lr=-1",),
        ("latency_repeats=0",),
        ("num_workers=-1",),
    ],
)
def test_compress_refuses_before_any_work(capsys, tmp_path, args):
    common = ("--checkpoint", str(tmp_path / "c.safetensors"), "--dataset", "synthetic", "--prune", "l1")
    err = _refused_before_work(
        capsys, compress_cli.main, tmp_path / "run", *common, "recover_epochs=1", *args
    )
    assert args[0].split("=")[0] in err and "got" in err, err


@pytest.fixture(scope="module")
def tta_files(tmp_path_factory):
    from selfsup.tta.generate import generate

    root = tmp_path_factory.mktemp("tta")
    spec = BackboneSpec("vit_tiny_patch16_224", 32, 8, extra={"depth": 1, "embed_dim": 32, "num_heads": 2})
    checkpoint = save_model(root, spec, ["c0", "c1", "c2"], "finetune")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    generate(images, np.arange(6) % 3, root / "set", ("contrast",), (5,), seed=0, source="test")
    return checkpoint, root / "set"


@pytest.mark.parametrize(
    ("args", "says"), [(("eata.fisher_size=0",), "eata.fisher_size"), (("steps=0",), "steps")]
)
def test_tta_refuses_bad_values_before_any_work(capsys, tmp_path, tta_files, args, says):
    checkpoint, folder = tta_files
    common = ("--checkpoint", str(checkpoint), "--dataset", str(folder), "--method", "eata,tent")
    err = _refused_before_work(capsys, tta_cli.main, tmp_path / "run", *common, *args)
    assert f"{says} must be at least 1, got 0" in err, err


def test_tta_refuses_a_truncated_corruption_file_naming_it(capsys, tmp_path, tta_files):
    import shutil

    checkpoint, folder = tta_files
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    data = (partial / "contrast.npy").read_bytes()
    (partial / "contrast.npy").write_bytes(data[: len(data) // 2])  # a download cut short
    common = ("--checkpoint", str(checkpoint), "--dataset", str(partial), "--method", "source")
    err = _refused_before_work(capsys, tta_cli.main, tmp_path / "run", *common)
    assert str(partial / "contrast.npy") in err and "truncated" in err and "re-generate" in err, err


@pytest.fixture
def garbage_checkpoint(tmp_path):
    """A checkpoint whose JSON sidecar is binary garbage (a broken copy, the wrong file renamed)."""
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "x.json").write_bytes(bytes(range(128, 256)) * 4)
    return tmp_path / "x.safetensors"


def test_probe_refuses_a_sidecar_of_binary_garbage(capsys, tmp_path, garbage_checkpoint):
    args = ("--checkpoint", str(garbage_checkpoint), "--dataset", "synthetic", "data.synthetic_size=8")
    err = _refused_before_work(capsys, probe_cli.main, tmp_path / "run", *args)
    assert "not a selfsup sidecar" in err and str(garbage_checkpoint.with_suffix(".json")) in err, err


def test_finetune_refuses_a_sidecar_of_binary_garbage(capsys, tmp_path, garbage_checkpoint):
    args = ("--checkpoint", str(garbage_checkpoint), "--dataset", "synthetic", "batch_size=8", *FINETUNE[4:])
    err = _refused_before_work(capsys, finetune_cli.main, tmp_path / "run", *args)
    assert "not a selfsup sidecar" in err and str(garbage_checkpoint.with_suffix(".json")) in err, err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--limit", "0"), "--limit: must be at least 1, got 0"),
        (("--limit", "-5"), "--limit: must be at least 1, got -5"),
        (("--severities",), "--severities: expected at least one argument"),
        (("--severities", "6"), "--severities: must be 1, 2, 3, 4 or 5, got 6"),
        (("--corruptions",), "--corruptions: expected at least one argument"),
    ],
)
def test_generate_refuses_flags_without_values_or_out_of_range(capsys, tmp_path, args, says):
    out = tmp_path / "set"
    err = refused(capsys, generate_cli.main, "--dataset", "synthetic", "--out", str(out), *args)
    assert says in err and not out.exists(), err
