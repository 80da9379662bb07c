"""One way to refuse bad input: a :class:`UsageError` becomes one line on stderr and exit code 2.

Library functions raise :class:`UsageError` with a message that says what was wrong, what was
expected and how to fix it; command-line entry points are wrapped in :func:`exits_cleanly`, so a
user sees that line and no traceback. Programming errors still raise normally.

A disk error the user fixes (no space, a quota or file-size limit, no permission, a read-only
disk) is the environment's fault, not the program's: :func:`exits_cleanly` tells it the same way,
naming the file. Training stages say more (the last good checkpoint, how to resume):
:func:`selfsup.loop.disk_errors_as_usage_errors`.
"""

from __future__ import annotations

import errno
import functools
import re
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # a training run stopped by a streak of non-finite losses

F = TypeVar("F", bound=Callable[..., object])

# Errors that the user's environment causes (and the user fixes), not the program.
USER_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit: `ulimit -f`, or the file system's)",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EEXIST: "a file is in the way",
}

# Writers that are not Python file objects wrap the OS error in their own exception: safetensors
# raises ``SafetensorError("... (os error 28)")``; torch's zip writer (``torch.save``, and through it
# accelerate's optimizer.bin) drops the errno altogether ("unexpected pos N vs M", torch 2.x), and so
# does numpy's ``tofile`` under ``np.save`` ("N requested and M written").
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
# A DataLoader worker's OSError reaches the main process rebuilt from its text alone
# (torch's ExceptionWrapper.reraise: ``exc_type(msg)``), so its errno survives only as "[Errno N]".
_REBUILT_ERRNO = re.compile(r"\[Errno (\d+)\]")
WRITE_LOST_ERRNO = re.compile(
    r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing|\d+ requested and \d+ written"
)
UNEXPLAINED_WRITE = (
    "a write failed and the writer does not say why (a full disk, a quota or a file-size limit)"
)


class UsageError(Exception):
    """Bad input from the user (a path, a name, a value): reported in one line, exit code 2."""


class DiskError(OSError):
    """A disk error the user can fix, with the project's wording as ``strerror`` and the file it
    was writing as ``filename`` (made by :func:`selfsup.files.disk_errors_at`)."""


def user_errno(err: BaseException) -> int | None:
    """The errno of a disk error the user can fix, or None (:data:`errno.EIO` for a writer that
    does not say which error it met).

    Read from what raised it, never from any exception's text (a programming error quoting "No space
    left on device" stays a traceback): an OSError's errno; the ``(os error N)`` that safetensors'
    ``SafetensorError`` carries in its text; the messages of the writers that lose the errno (torch's
    zip writer raises a RuntimeError, numpy's ``tofile`` an OSError without an errno); an OSError
    without an errno that a DataLoader worker re-raised keeps its ``[Errno N]`` in its text."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno if err.errno in USER_ERRNOS else None
    text = str(err)
    rebuilt = _REBUILT_ERRNO.search(text) if isinstance(err, OSError) else None
    if rebuilt and int(rebuilt.group(1)) in USER_ERRNOS:
        return int(rebuilt.group(1))
    if type(err).__name__ == "SafetensorError":  # by name: safetensors loads only where it writes
        found = _OS_ERROR_CODE.search(text)
        return int(found.group(1)) if found and int(found.group(1)) in USER_ERRNOS else None
    if isinstance(err, OSError | RuntimeError) and WRITE_LOST_ERRNO.search(text):
        return errno.EIO
    return None


def is_user_os_error(err: BaseException) -> bool:
    return user_errno(err) is not None


def describe_os_error(err: BaseException) -> str:
    """``reason: file`` in one line, e.g. ``no space left on the device: runs/x/report.html``."""
    if isinstance(err, DiskError):
        reason = err.strerror
    elif WRITE_LOST_ERRNO.search(str(err)):
        reason = UNEXPLAINED_WRITE
    else:
        code = user_errno(err)
        reason = USER_ERRNOS.get(code or -1) or getattr(err, "strerror", None) or str(err).splitlines()[0]
    filename = getattr(err, "filename", None)
    return f"{reason}: {filename}" if filename else reason


def _refuse(message: str) -> NoReturn:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # always exactly one line
    raise SystemExit(EXIT_USAGE) from None


def exits_cleanly(main: F) -> F:
    """Wrap a CLI ``main`` so a :class:`UsageError`, or a disk error the user can fix, prints
    ``error: <message>`` and exits with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            _refuse(str(err))
        except Exception as err:  # OSError, or a writer's wrapper of one (safetensors, torch.save)
            if not is_user_os_error(err):
                raise
            _refuse(
                f"{describe_os_error(err)}; free space or fix the permissions, then run the command again"
            )

    return wrapper  # type: ignore[return-value]
