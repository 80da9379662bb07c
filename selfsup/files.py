"""Writing files so that nothing is lost: atomic replacement, output folders checked before any
work, and disk errors (no space, no permission, read-only) told as one line.

A kill at any moment leaves the previous version of a file or the new one, never a torn one; a
run whose output folder cannot be written fails before it computes anything.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from selfsup.errors import UsageError

# Errors that the user's environment causes (and the user fixes), not the program.
USER_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EEXIST: "a file is in the way",
}


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def user_errno(err: BaseException) -> int | None:
    """The errno of a disk error the user can fix, or None.

    Writers that are not Python file objects wrap the OS error in their own exception:
    safetensors raises ``SafetensorError("... (os error 28)")``, torch's zip writer a RuntimeError.
    """
    if isinstance(err, OSError):
        return err.errno if err.errno in USER_ERRNOS else None
    text = str(err)
    if (m := _OS_ERROR_CODE.search(text)) and int(m.group(1)) in USER_ERRNOS:
        return int(m.group(1))
    for code in USER_ERRNOS:
        if os.strerror(code) in text:
            return code
    return None


def describe_os_error(err: BaseException) -> str:
    code = user_errno(err)
    reason = USER_ERRNOS.get(code or -1) or getattr(err, "strerror", None) or str(err).splitlines()[0]
    filename = getattr(err, "filename", None)
    return f"{reason}: {filename}" if filename else reason


def is_user_os_error(err: BaseException) -> bool:
    return user_errno(err) is not None


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
