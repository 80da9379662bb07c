"""One run per output folder: an exclusive lock on ``OUT/.lock`` for the life of the run.

Two runs in one folder (a double submit, a SLURM requeue while the first still runs) would delete
each other's in-progress checkpoints or leave a folder mixing two runs. The main process of a run
takes an ``flock`` on ``OUT/.lock`` and writes ``<pid> <host>`` into it; a second run finds the lock
taken and stops with one line naming that holder. The OS drops an ``flock`` when its last file
descriptor closes, so a killed run never blocks its own resume. The descriptor is closed in forked
children (DataLoader workers), which would otherwise keep the lock of a killed main process alive.

A process may claim a folder it already holds (a second in-process run); :func:`release` ends the
claim and puts the lock file back as the claim found it (its bytes and modification time), so a run
refused after its claim (another recipe, other classes) leaves the folder unchanged; a killed run
leaves its line, which the next holder overwrites. The lock file stays: deleting it would let two
runs lock two different files of one name.
See flock(2); the lock works on local disks and on NFS (Linux emulates it with byte-range locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from selfsup.errors import UsageError

LOCK_FILE = ".lock"


@dataclass
class _Hold:
    fd: int  # the lock file's descriptor: the lock lives as long as it is open
    found: bytes  # the file's content before the claim, and its (access, modification) times
    times: tuple[int, int]


_held: dict[Path, _Hold] = {}  # the folders this process holds


def _key(out: str | Path) -> Path:
    return Path(out).resolve()


def holder(out: str | Path) -> str:
    """``<pid> <host>`` of the run that holds ``out`` (as written in its lock file), or ``unknown``."""
    try:
        text = (Path(out) / LOCK_FILE).read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def claim(out: str | Path) -> None:
    """Hold ``out`` for this process, or raise :class:`UsageError` naming the process that holds it."""
    key = _key(out)
    if key in _held:
        return
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec
    except OSError as error:
        raise UsageError(
            f"out={out}: cannot open its lock file {key / LOCK_FILE} ({error.strerror}); "
            "fix the folder's permissions or choose another out=..."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid_host = holder(key).split()
        who = f"process {pid_host[0]} on {pid_host[1]}" if len(pid_host) == 2 else "another process"
        raise UsageError(
            f"out={out} is in use by another run ({who}); wait for it to end or stop it, "
            "or choose another out=..."
        ) from None
    except OSError as error:  # ENOLCK: a file system without locks (some NFS mounts)
        os.close(fd)
        raise UsageError(
            f"out={out} cannot be locked ({error.strerror}): its file system gives no locks; "
            "choose an out= on a local or lock-capable file system"
        ) from None
    found = os.fstat(fd)
    _held[key] = _Hold(fd, os.pread(fd, found.st_size, 0), (found.st_atime_ns, found.st_mtime_ns))
    _write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())


def release(out: str | Path) -> None:
    """End this process's hold on ``out`` (nothing if it holds none)."""
    hold = _held.pop(_key(out), None)
    if hold is None:
        return
    with contextlib.suppress(OSError):  # a full disk: the line is read only while a run holds the lock
        _write(hold.fd, hold.found)
        os.utime(hold.fd, ns=hold.times)
    os.close(hold.fd)  # the last descriptor of the lock: the OS drops the lock


def _write(fd: int, payload: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, payload, 0)


def _close_in_child() -> None:
    """A forked child must not keep its parent's lock alive: close its copies, never unlock them
    (an unlock would release the lock the parent still holds)."""
    for hold in _held.values():
        os.close(hold.fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
