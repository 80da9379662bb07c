"""Precision is detected, never assumed: bf16 only where the hardware runs it natively."""

import pytest
import torch

from selfsup import precision


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


def test_every_stage_defaults_to_auto():
    from selfsup.eval.probe import ProbeConfig
    from selfsup.ssl.settings import PretrainConfig

    assert PretrainConfig().mixed_precision == "auto" and ProbeConfig().precision == "auto"
