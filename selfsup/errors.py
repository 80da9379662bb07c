"""One way to refuse bad input: a :class:`UsageError` becomes one line on stderr and exit code 2.

Library functions raise :class:`UsageError` with a message that says what was wrong, what was
expected and how to fix it; command-line entry points are wrapped in :func:`exits_cleanly`, so a
user sees that line and no traceback. Programming errors still raise normally.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # a training run stopped by a streak of non-finite losses

F = TypeVar("F", bound=Callable[..., object])


class UsageError(Exception):
    """Bad input from the user (a path, a name, a value): reported in one line, exit code 2."""


def exits_cleanly(main: F) -> F:
    """Wrap a CLI ``main`` so a :class:`UsageError` prints ``error: <message>`` and exits with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            message = " ".join(str(err).split())  # always exactly one line
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None

    return wrapper  # type: ignore[return-value]
