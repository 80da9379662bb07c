"""Where a run stands on disk: checkpoints, the resume position, and stop requests from signals.

A checkpoint is ``OUT/checkpoints/step_XXXXXXXX/``: accelerate's ``save_state`` (model,
optimizer, scaler, every process's RNG states) plus ``runstate.json`` (the step reached, NaN
counters, the dataset's normalisation), written last. It is assembled under a temporary name
and renamed when complete, and older ones are deleted only afterwards, so a kill at any moment
leaves the previous good checkpoint. The epoch and the sampler's position follow from the step.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfsup.checkpoint import atomic_write_bytes
from selfsup.errors import UsageError

STATE_FILE = "runstate.json"
PREFIX = "step_"


@dataclass
class Position:
    step: int = 0  # optimisation steps done (skipped NaN steps included)
    nan_skipped: int = 0
    nan_streak: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # dataset mean/std/classes, for export


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str, out: str | Path) -> Path | None:
    """``auto``: the latest complete checkpoint in ``out`` (None if there is none); ``never``: None;
    otherwise the given checkpoint folder, which must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(
            f"resume={resume}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use resume=auto, resume=never or a folder such as {checkpoint_root(out)}/{PREFIX}00001000"
        )
    return path


def load_position(checkpoint: Path) -> Position:
    return Position(**json.loads((checkpoint / STATE_FILE).read_text()))


def save(accelerator, out: str | Path, position: Position, keep: int) -> Path:
    """Collective: every process calls it. Returns the completed checkpoint folder."""
    root = checkpoint_root(out)
    final = root / f"{PREFIX}{position.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_bytes(tmp / STATE_FILE, json.dumps(asdict(position), indent=1).encode())
        if final.exists():  # the same step saved twice (e.g. end of run after a signal save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(out)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def truncate_log(path: Path, step: int) -> None:
    """Drop log records of steps at or after ``step`` (they will be run again after a resume)."""
    if not path.is_file():
        return

    def keep(record: dict[str, Any]) -> bool:
        if "event" in record:  # monitors etc. ran at a step boundary: kept up to the checkpoint's step
            return record.get("at_step", 0) <= step
        return record.get("step", -1) < step

    kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


class StopSignals:
    """SIGTERM/SIGINT set :attr:`requested` instead of killing; the loop saves and exits at the
    next step boundary. A second signal of the same kind is not caught again (a hard stop)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        self.requested = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they were
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
