"""Every benchmark script still starts and finishes: its ``--smoke`` run (one tiny case, one step).

A benchmark that no longer runs (a renamed argument, a drifted vocabulary) fails the build here
instead of in the hands of the next person who measures something.
"""

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
