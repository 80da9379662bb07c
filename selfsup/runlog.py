"""Per-step records of a training run: a tqdm bar, ``OUT/log.jsonl`` and optional TensorBoard (main process only).

The stage chooses what the bar shows (``bar_fields``); every record goes to the log whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfsup.errors import UsageError
from selfsup.files import append_whole, dumps_strict


def check_tracker(log_with: str) -> None:
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError(
                "log_with=tensorboard needs the tensorboard package: pip install tensorboard"
            ) from None


class RunLog:
    """``step(record)`` writes one JSON line (every ``every`` steps), moves the bar, logs to trackers.

    ``bar_fields`` maps a short name on the bar to a format of the record, e.g.
    ``{"loss": "{loss:.4f}", "data": "{data_s:.3f}s"}``.
    """

    def __init__(
        self,
        accelerator,
        out: Path,
        total: int,
        start: int,
        every: int = 1,
        bar: bool = True,
        bar_fields: dict[str, str] | None = None,
    ):
        self.accelerator = accelerator
        self.bar_fields = bar_fields if bar_fields is not None else {"loss": "{loss:.4f}"}
        self.main = accelerator.is_main_process
        self.every = max(1, every)
        self.path = out / "log.jsonl"
        self.file = self.path.open("ab", buffering=0) if self.main else None  # see write
        self.bar = (
            tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if self.main and bar else None
        )

    def step(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(1)
            shown = {name: template.format(**record) for name, template in self.bar_fields.items()}
            self.bar.set_postfix(refresh=False, **shown)
        if record["step"] % self.every == 0:
            self.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def event(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.write(record)
        if self.bar is not None:
            self.bar.write(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            )

    def write(self, record: dict[str, Any]) -> None:
        assert self.file is not None
        line = dumps_strict(record) + "\n"  # NaN/inf as null: strict JSON readers accept it
        append_whole(self.file, line.encode(), self.path)  # whole lines only, even on a full disk

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
