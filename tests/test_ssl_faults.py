"""Faults a real run meets: a full or read-only disk, a kill at any moment, a resume under another
recipe, a checkpoint saved twice. Each ends in one clear line or an exact resume, never a hang."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import REPO, TINY_PRETRAIN

from selfsup import runstate
from selfsup.checkpoint import load_checkpoint
from selfsup.config import load_config
from selfsup.errors import UsageError
from selfsup.ssl.settings import PretrainConfig
from selfsup.ssl.train import TrainingDiverged, train

TINY = TINY_PRETRAIN  # resume=auto (the default): these tests resume on purpose
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def config(out, *extra):
    return load_config(PretrainConfig, None, [*TINY, f"out={out}", *extra])


def pretrain(*args, timeout=120):
    cmd = [sys.executable, str(REPO / "ssl" / "pretrain.py"), *TINY, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@contextmanager
def tiny_tmpfs(path, size="1m"):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the in-process disk-error test still runs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """With DataLoader workers (which ignore SIGTERM) a disk error used to leave the process hanging."""
    with tiny_tmpfs(tmp_path / "disk") as disk:
        out = disk / "run"
        first = pretrain(
            f"out={out}", "max_steps=2", "save_every_steps=1", "keep_checkpoints=1", "num_workers=1"
        )
        assert first.returncode == 0, first.stderr[-2000:]
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "ballast").write_bytes(b"\0" * max(0, free - 8192))  # leave 8 KiB: the next save fails
        run = pretrain(f"out={out}", "max_steps=6", "save_every_steps=1", "num_workers=1", timeout=90)
        assert run.returncode == 2
        line = one_error_line(run.stderr)
        assert "no space left" in line and "step_00000002 is intact" in line and "resume=auto" in line
        (last,) = runstate.complete_checkpoints(out)
        assert last.name == "step_00000002" and runstate.is_complete(last)
        assert not list((out / "checkpoints").glob(".tmp-*"))  # the failed save freed its space


def test_an_unwritable_out_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    run = pretrain(f"out={blocker / 'run'}", timeout=60)
    assert run.returncode == 2 and "is not writable" in one_error_line(run.stderr)
    assert "precision:" not in run.stderr  # refused before the model or the data were built
    assert time.perf_counter() - start < 60


def test_a_disk_error_inside_a_save_is_one_usage_error(tmp_path, monkeypatch):
    train(config(tmp_path, "max_steps=4", "save_every_steps=2"))
    original = runstate.save
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        raise OSError(28, "No space left on device", str(tmp_path / "checkpoints" / ".tmp-x"))

    monkeypatch.setattr(runstate, "save", full_disk)
    with pytest.raises(UsageError, match=r"no space left.*step_00000004 is intact.*resume=auto"):
        train(config(tmp_path, "max_steps=8", "save_every_steps=2"))
    monkeypatch.setattr(runstate, "save", original)
    assert (
        calls["n"] == 1 and [p.name for p in runstate.complete_checkpoints(tmp_path)][-1] == "step_00000004"
    )


def test_resuming_under_another_recipe_is_refused_with_the_changed_keys(tmp_path):
    train(config(tmp_path, "max_steps=4"))
    for change, key in (
        ("batch_size=32", "batch_size"),
        ("optim.base_lr=0.5", "optim.base_lr"),
        ("dataset=digits", "dataset"),
        ("model.extra.depth=2", "model.extra.depth"),
    ):
        with pytest.raises(UsageError, match=rf"{key}: .* -> .*new out=.*force_resume=true"):
            train(config(tmp_path, "max_steps=6", change))
    assert train(config(tmp_path, "max_steps=6", "save_every_steps=3", "num_workers=1")).step == 6  # allowed
    forced = train(config(tmp_path, "max_steps=8", "optim.base_lr=0.5", "force_resume=true"))
    assert forced.step == 8


def test_a_refused_resume_cli_is_one_line_and_exit_2(tmp_path):
    train(config(tmp_path, "max_steps=2"))
    run = pretrain(f"out={tmp_path}", "batch_size=32")
    assert run.returncode == 2 and "batch_size: 16 -> 32" in one_error_line(run.stderr)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    train(config(tmp_path, "max_steps=4", "save_every_steps=2"))
    first, latest = runstate.complete_checkpoints(tmp_path)
    (latest / runstate.MODEL_FILE).unlink()  # what a kill inside the old delete-then-rename left
    assert runstate.resolve_resume("auto", tmp_path) == first
    assert "incomplete" in capsys.readouterr().err
    truncated = first / runstate.MODEL_FILE
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert runstate.resolve_resume("auto", tmp_path) is None


def test_a_kill_between_the_two_renames_of_a_same_step_save_restores_the_old_one(tmp_path):
    train(config(tmp_path, "max_steps=2", "save_every_steps=2"))
    (done,) = runstate.complete_checkpoints(tmp_path)
    aside = done.with_name(runstate.OLD + done.name)
    done.rename(aside)  # killed after setting the old one aside, before the new one came in
    (done.parent / f"{runstate.TMP}{done.name}").mkdir()
    assert runstate.resolve_resume("auto", tmp_path) == done and runstate.is_complete(done)
    assert not aside.exists() and not (done.parent / f"{runstate.TMP}{done.name}").exists()


def test_the_log_holds_null_for_a_non_finite_loss(tmp_path, monkeypatch):
    from selfsup.ssl.builder import MoCoV3

    original = MoCoV3.forward
    monkeypatch.setattr(MoCoV3, "forward", lambda self, a, b, m: original(self, a, b, m) * float("nan"))
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved before it"):
        train(config(tmp_path, "max_nan_steps=2"))

    def strict(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    records = [
        json.loads(line, parse_constant=strict) for line in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in records] == [None, None]


def _complete_count(out) -> int:
    """Complete checkpoints now. A scan is not atomic: listed before the new checkpoint is renamed in
    and checked after the old one is renamed away, it sees none; so a zero is rescanned at once
    (a real gap, such as a delete before the rename, is still there on the rescans)."""
    for _scan in range(3):
        count = sum(runstate.is_complete(p) for p in runstate.complete_checkpoints(out))
        if count:
            return count
    return 0


def _newest_step(out) -> int | None:
    """Step of the newest checkpoint, or None; the run may rename it away between the scan and the read."""
    for checkpoint in reversed(runstate.complete_checkpoints(out)):
        try:
            return runstate.load_position(checkpoint).step
        except (OSError, ValueError):
            continue
    return None


# fp32 and bf16 (emulated on CPUs without native bf16: fewer kills keep it short)
@pytest.mark.parametrize("precision, kills", [("no", 10), ("bf16", 3)])
def test_ten_sigkills_at_random_moments_resume_to_the_uninterrupted_weights(tmp_path, precision, kills):
    args = [
        "epochs=12",
        "max_steps=30",
        "save_every_steps=1",
        "keep_checkpoints=1",
        f"mixed_precision={precision}",
    ]
    straight = train(config(tmp_path / "straight", *args, "resume=never"))
    out = tmp_path / "killed"
    rng = random.Random(0)
    seen_a_checkpoint = False
    for _kill in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "ssl" / "pretrain.py"), *TINY, *args, f"out={out}"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        start_steps = _newest_step(out) or 0
        wait_steps, deadline = rng.randint(0, 2), time.time() + 60
        while proc.poll() is None and time.time() < deadline:  # random phase: after 0-2 new steps
            if seen_a_checkpoint:
                assert _complete_count(out) >= 1
            step = _newest_step(out)
            if step is not None:
                seen_a_checkpoint = True
                if step >= start_steps + wait_steps:
                    break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if seen_a_checkpoint:
            assert _complete_count(out) >= 1
    final = pretrain(*args, f"out={out}", timeout=180)
    assert final.returncode == 0, final.stderr[-2000:]
    a, _ = load_checkpoint(out / "backbone.safetensors")
    b, _ = load_checkpoint(straight.backbone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".*"))  # no temporary or aside folders left


def test_the_run_records_the_precision_it_resolved(tmp_path, capsys):
    import yaml

    train(config(tmp_path, "max_steps=1"))
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())["mixed_precision"]
    assert recorded in ("no", "bf16") and f"precision: {recorded} (auto:" in capsys.readouterr().err
