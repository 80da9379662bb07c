"""DataLoader workers under a training run that saves on SIGTERM/SIGINT: they leave the signals to
the main process, and are stopped on every exit path.
"""

from __future__ import annotations

import signal
from typing import Any

from torch.utils.data import DataLoader


def leave_signals_to_the_main_process(_worker_id: int) -> None:
    """``worker_init_fn`` for the loaders of a training run.

    Ctrl-C and scancel signal the whole process group; a worker that died of it would turn the main
    process's orderly "save and exit at the next step" (:class:`selfsup.runstate.StopSignals`) into
    a DataLoader error.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s worker processes now (safe to call twice).

    Workers that ignore SIGTERM (above) would keep a stopped run's process waiting forever.
    Persistent workers live in the loader's iterator until it is garbage-collected; torch has no
    public call to stop them, so the iterator's own shutdown is invoked (it joins the workers with a
    timeout and then terminates them).
    """
    shutdown_iterator(getattr(loader, "_iterator", None))
    loader._iterator = None


def shutdown_iterator(iterator: Any) -> None:
    """Stop the workers of a DataLoader iterator (``None`` or a worker-less iterator: nothing to do)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
