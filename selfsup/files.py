"""Writing files so that nothing is lost: atomic replacement, output folders checked before any
work, and disk errors (no space, a file-size limit, no permission, read-only) told as one line
naming the file.

A kill or a full disk at any moment leaves the previous version of a file or the new one, never a
torn one (every figure, report and checkpoint goes through :func:`atomic_path`); a run whose output
folder cannot be written fails before it computes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from selfsup.errors import (
    UNEXPLAINED_WRITE,
    USER_ERRNOS,
    WRITE_LOST_ERRNO,
    DiskError,
    UsageError,
    describe_os_error,
    is_user_os_error,  # noqa: F401  (re-exported: selfsup.loop imports it from here)
    user_errno,
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for a writer that wants a file name (matplotlib, ONNX
    Runtime): renamed onto ``path`` once the writer returns, removed if it fails, so readers see
    the old file or the new one. Its name, ``.NAME.tmp-PID-XXXX.SUFFIX``, ends in ``path``'s suffix
    (writers infer formats from it) and names the writing process, so one a kill left behind is
    recognised and removed by :func:`remove_orphan_temporaries`. A disk error names ``path``
    (:func:`disk_errors_at`)."""
    path = Path(path)
    with disk_errors_at(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}{TEMPORARY}{os.getpid()}-", suffix=path.suffix, dir=path.parent
        )
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


TEMPORARY = ".tmp-"  # in the name of an atomic write's temporary file, before the writer's PID
_ORPHAN = re.compile(rf"^\..+{re.escape(TEMPORARY)}(\d+)-")


def remove_orphan_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of atomic writes under ``folder`` whose writer is no longer running
    on this machine (a kill during an export leaves one the size of the model); returns them. Called
    by a run that holds ``folder`` (:mod:`selfsup.runlock`), so no other run is writing there."""
    removed = []
    for candidate in Path(folder).rglob(f".*{TEMPORARY}*"):
        found = _ORPHAN.match(candidate.name)
        if found and candidate.is_file() and not _running(int(found.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so readers see the old file or the new one, never a torn one."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(payload)


def append_whole(file: BinaryIO, data: bytes, path: Path) -> None:
    """Append ``data`` to the unbuffered binary ``file`` (``path``) whole or not at all: a write cut
    short by a full disk is undone, so a reader (a resume) never meets a torn last line."""
    start = file.tell()
    with disk_errors_at(path):
        try:
            view = memoryview(data)
            while view:
                view = view[file.write(view) :]  # a raw write may take only a part
        except BaseException:
            file.truncate(start)
            raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a delayed write error (NFS, quotas) surfaces here, before the rename
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it writable (a probe file is written and removed).

    Checked before any work so a run never computes for an hour and then fails to save.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(
            f"{what} {path} is not writable ({describe_os_error(err)}); choose another folder or fix its permissions"
        ) from None
    return path


@contextlib.contextmanager
def disk_errors_at(path: str | Path) -> Iterator[None]:
    """Within: a disk error the user can fix that names no file (a Python write's, safetensors',
    torch's) is re-raised as a :class:`~selfsup.errors.DiskError` naming ``path``, or for a folder
    the newest file in it (the one being written when the error struck)."""
    try:
        yield
    except Exception as err:
        named = as_disk_error(err, Path(path))
        if named is None or named is err:
            raise
        raise named from err


def as_disk_error(err: BaseException, path: Path) -> OSError | None:
    """``err`` as an OSError that names its file (``err`` itself when it does), or None when it is
    not a disk error the user can fix."""
    code = user_errno(err)
    if code is None:
        return None
    if isinstance(err, OSError) and err.filename:
        return err
    target = _newest_file(path) if path.is_dir() else path
    if WRITE_LOST_ERRNO.search(str(err)):
        return DiskError(code, f"{UNEXPLAINED_WRITE}; {_limits(path)}", str(target))
    return DiskError(code, USER_ERRNOS[code], str(target))


def _newest_file(folder: Path) -> Path:
    """The file last written in ``folder`` (the one a writer was on when it failed), or ``folder``
    itself when that is not clear (timestamps are as coarse as the kernel's clock tick)."""
    times = sorted(((p.lstat().st_mtime_ns, p) for p in folder.iterdir() if not p.is_dir()), reverse=True)
    if not times or (len(times) > 1 and times[0][0] == times[1][0]):
        return folder
    return times[0][1]


def _limits(path: Path) -> str:
    """What was measured where a write failed without its reason: the free space, a size limit."""
    folder = path if path.is_dir() else path.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return free + (f", file-size limit {soft} bytes" if soft != resource.RLIM_INFINITY else "")


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None, so strict JSON readers accept the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes null for NaN/inf instead of the non-standard ``NaN``."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, streamed (the one digest of files: checkpoints, run states, imported weights)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
