"""Every benchmark script still starts and finishes: its ``--smoke`` run (one tiny case, one step).

A benchmark that no longer runs (a renamed argument, a drifted vocabulary) fails the build here
instead of in the hands of the next person who measures something.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))


def test_there_are_benchmarks_to_check():
    assert "bench_int8.py" in SCRIPTS and "bench_pretrain_step.py" in SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_benchmark_runs_its_smoke_mode(script):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), "a smoke run prints its table"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_peaks_by_name_pcie_before_sxm_and_unknown_elsewhere():
    peak = _gpu_check().bf16_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA H200") == 989 and peak("NVIDIA A100-SXM4-80GB") == 312
    assert peak("Tesla T4") is None


def test_a_gpu_check_failure_is_one_line_and_the_next_check_still_runs(tmp_path):
    gc = _gpu_check()

    def refused(_detail):
        print("error: the one line a command prints", file=sys.stderr)
        raise SystemExit(2)

    def broken(detail):
        detail["measured"] = 1
        raise RuntimeError("CUDA out of memory\nmore text")

    rows = [
        gc.run_check(name, fn, tmp_path)
        for name, fn in (("a", refused), ("b", broken), ("c", lambda d: None))
    ]
    assert [r["status"] for r in rows] == ["fail", "fail", "pass"]
    assert rows[0]["error"] == "exit 2: error: the one line a command prints"
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory" and rows[1]["detail"] == {"measured": 1}
    assert "Traceback" in (tmp_path / "b.log").read_text()
