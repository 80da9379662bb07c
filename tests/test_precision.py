"""Precision is detected, never assumed: bf16 only where the hardware runs it natively."""

import dataclasses
import importlib
import re
import typing

import pytest
import torch
from conftest import REPO, refused

from selfsup import precision
from selfsup.errors import UsageError


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_WARNED", [])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    yield
    precision.cpu_has_native_bf16.cache_clear()


def fake_cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool = False):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "expected"),
    [
        ("AVX2", False, False, "no"),
        ("AVX512", False, False, "no"),
        ("AVX512", True, False, "bf16"),
        ("AVX512", False, True, "bf16"),
    ],
)
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(monkeypatch, capability, avx512_bf16, amx, expected):
    fake_cpu(monkeypatch, capability, avx512_bf16, amx)
    assert precision.resolve_precision("auto", "cpu") == expected


def test_auto_on_a_non_x86_cpu_measures_a_matmul(monkeypatch):
    fake_cpu(monkeypatch, "SVE256", False)
    monkeypatch.setattr(precision, "bf16_speed_ratio", lambda: 1.9)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "bf16_speed_ratio", lambda: 0.01)
    assert precision.resolve_precision("auto", "cpu") == "no"


def test_auto_on_cuda_follows_the_device_and_the_launcher_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_precision("auto", "cuda") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert precision.resolve_precision("auto", "cuda") == "fp16"


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_measured_slowdown(monkeypatch, capsys):
    fake_cpu(monkeypatch, "AVX2", False)
    monkeypatch.setattr(precision, "bf16_speed_ratio", lambda: 0.0025)
    assert precision.resolve_precision("bf16", "cpu") == "bf16"  # kept: the user asked for it
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "about 400x slower" in err and "AVX2" in err
    fake_cpu(monkeypatch, "AVX512", True)
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_WARNED", [])
    precision.resolve_precision("bf16", "cpu")
    assert capsys.readouterr().err == ""


def test_the_matmul_probe_measures_something():
    assert precision.matmul_gflops(torch.float32, n=64, min_seconds=0.01) > 0


STAGES = {  # command -> (config class path, CLI module)
    "pretrain": ("selfsup.ssl.settings:PretrainConfig", "selfsup.ssl.cli"),
    "probe": ("selfsup.eval.probe:ProbeConfig", "selfsup.eval.cli"),
    "finetune": ("selfsup.finetune.settings:FinetuneConfig", "selfsup.finetune.cli"),
    "tta": ("selfsup.tta.settings:TTAConfig", "selfsup.tta.cli"),
    "compress": ("selfsup.compress.settings:CompressConfig", "selfsup.compress.cli"),
}


def _config_class(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_one_precision_key_with_one_vocabulary_and_auto_by_default(stage):
    cls = _config_class(STAGES[stage][0])
    hints = typing.get_type_hints(cls)
    assert typing.get_args(hints["mixed_precision"]) == precision.PRECISIONS
    field = next(f for f in dataclasses.fields(cls) if f.name == "mixed_precision")
    assert field.default == "auto"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_help_lists_the_same_values(stage, capsys):
    cli = importlib.import_module(STAGES[stage][1])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "--mixed-precision {auto,no,bf16,fp16}" in " ".join(capsys.readouterr().out.split())


def test_no_other_precision_vocabulary_is_written_anywhere():
    """A Literal or an argparse choice list naming bf16 names exactly the shared values."""
    expected = ", ".join(f'"{v}"' for v in precision.PRECISIONS)
    pattern = re.compile(r'(?:Literal\[|choices=\[)([^\]]*"bf16"[^\]]*)\]')
    found = {}
    for folder in ("selfsup", "ssl", "eval", "finetune", "tta", "compress", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for values in pattern.findall(path.read_text()):
                found.setdefault(" ".join(values.split()).rstrip(","), []).append(path.name)
    assert set(found) <= {expected}, found


def test_fp16_off_cuda_is_one_line_and_exit_2(capsys):
    from selfsup.ssl import cli

    err = refused(capsys, cli.main, "dataset=synthetic", "mixed_precision=fp16", "out=/nonexistent/x")
    assert "fp16 needs a CUDA GPU" in err


def test_an_unknown_precision_is_refused_with_the_vocabulary():
    with pytest.raises(UsageError, match="auto, no, bf16, fp16"):
        precision.resolve_precision("fp32", "cpu")


def test_the_override_treats_this_cpu_as_the_other_kind(monkeypatch):
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "0")
    assert precision.resolve_precision("auto", "cpu") == "no"
