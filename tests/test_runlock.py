"""One run per output folder: a second run into a held out= is one line naming the holder, exit 2;
a killed holder (and the workers it forked) never blocks the folder's resume."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_PRETRAIN

from selfsup import runlock
from selfsup.errors import UsageError
from selfsup.ssl import cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# holds argv[1] until killed; with "fork", a forked child (as a DataLoader worker) outlives it
HOLDER = """
import os, sys, time
from selfsup import runlock
runlock.claim(sys.argv[1])
child = os.fork() if sys.argv[2:] == ["fork"] else 1
if child == 0:  # runs only after the fork hooks: its copy of the lock is closed by now
    os.write(1, b"child\\n")  # one write each: two processes share the pipe
    time.sleep(300)
    os._exit(0)
os.write(1, f"held {child}\\n".encode())
time.sleep(300)
"""


def hold(out, *extra) -> tuple[subprocess.Popen, int]:
    """The holder process and its forked child's PID (1 if none)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), *extra], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    lines = [proc.stdout.readline().split() for _ in range(2 if extra == ("fork",) else 1)]
    said, child = next(line for line in lines if line[0] == "held")  # and, with a fork, the child's "child"
    assert said == "held"
    return proc, int(child)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_held_folder_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path):
    holder, _ = hold(tmp_path)
    try:
        who = rf"\(process {holder.pid} on {socket.gethostname()}\)"
        with pytest.raises(UsageError, match=rf"out={tmp_path} is in use by another run {who}"):
            runlock.claim(tmp_path)
    finally:
        kill(holder)
    runlock.claim(tmp_path)  # SIGKILL released it: a killed run never blocks its own resume
    runlock.claim(tmp_path)  # this process holds it already: a second in-process run goes on
    runlock.release(tmp_path)


def test_a_released_claim_leaves_the_lock_file_as_it_found_it(tmp_path):
    """So a run refused after its claim (another recipe, other classes) changes nothing in out."""
    lock = tmp_path / runlock.LOCK_FILE
    lock.write_text("1 elsewhere\n")
    os.utime(lock, ns=(1_000_000_000, 2_000_000_000))
    runlock.claim(tmp_path)
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    runlock.release(tmp_path)
    assert lock.read_text() == "1 elsewhere\n" and lock.stat().st_mtime_ns == 2_000_000_000


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    holder, child = hold(tmp_path, "fork")
    try:
        kill(holder)  # its forked child lives on, as DataLoader workers do for a moment
        runlock.claim(tmp_path)
        runlock.release(tmp_path)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_second_pretrain_into_a_running_ones_folder_is_one_line_and_exit_2(tmp_path, capsys):
    """Two concurrent starts: the second is refused before it writes anything; the first, killed,
    resumes."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, str(REPO / "ssl" / "pretrain.py"), *TINY_PRETRAIN, "epochs=1000", f"out={out}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        config_before = (out / "config.yaml").read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*TINY_PRETRAIN, "epochs=1000", f"out={out}", "seed=4"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"process {first.pid} on {socket.gethostname()}" in err
        assert (out / "config.yaml").read_bytes() == config_before  # the refused run wrote nothing
    finally:
        kill(first)
    cli.main([*TINY_PRETRAIN, "epochs=1000", f"out={out}", "max_steps=1"])  # the killed run's resume
    assert (out / "backbone.safetensors").is_file()
