"""Where a run stands on disk: checkpoints, the resume position, and stop requests from signals.

A checkpoint is ``OUT/checkpoints/step_XXXXXXXX/``: accelerate's ``save_state`` (model,
optimizer, scaler, every process's RNG states), the stage's extra modules as ``NAME.safetensors``
(fine-tuning's EMA), plus ``runstate.json`` (the step reached, NaN counters, the dataset's
normalisation and identity, the resolved config, and the name, size and SHA-256 of every file of
the checkpoint), written last. It is assembled under a temporary name and renamed when
complete, and older ones are deleted only afterwards (renamed away first), so a kill at any moment
leaves a complete checkpoint; resume skips a damaged one (a file missing, truncated, or other
than its recorded hash) for the one before. The epoch and the sampler's position follow from the step.

Reading a checkpoint runs no code from it. Audited against accelerate 1.16's ``load_state``
(``accelerate/checkpointing.py``): the model is read with safetensors; ``optimizer.bin``,
``scheduler.bin``, ``sampler.bin``, ``scaler.pt`` and ``random_states_N.pkl`` with ``torch.load``
under ``weights_only=True`` (tensors, numbers and numpy arrays only; anything else is an
``UnpicklingError``, refused here in one line). Only ``custom_checkpoint_N.pkl`` (objects given to
``register_for_checkpointing``) is unpickled with ``weights_only=False``: no run registers any, and
a checkpoint holding one is refused before accelerate sees it. accelerate swallows a failure to read
the RNG states (the resume would silently differ), so :func:`load_state` reads them first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from selfsup.config import check_rules, setting
from selfsup.errors import UsageError
from selfsup.files import atomic_write_bytes, disk_errors_at, file_sha256

if TYPE_CHECKING:  # torch, accelerate and safetensors load when a checkpoint does: configs import this module
    from torch import nn

STATE_FILE = "runstate.json"
MODEL_FILE = "model.safetensors"  # what accelerate's save_state writes for the first model
PREFIX = "step_"
TMP, OLD, TRASH = ".tmp-", ".old-", ".trash-"  # folders in flight: never read as checkpoints
PICKLED_OBJECTS = "custom_checkpoint_*.pkl"  # what accelerate unpickles with weights_only=False


@dataclass
class Position:
    step: int = 0  # optimisation steps done (skipped NaN steps included)
    nan_skipped: int = 0
    nan_streak: int = 0
    scaler_skipped: int = 0  # fp16: updates the gradient scaler skipped (an overflow, not divergence)
    data: dict[str, Any] = field(default_factory=dict)  # dataset mean/std/classes, for export
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config that produced the weights
    data_identity: dict[str, Any] = field(default_factory=dict)  # the training images (dataset_identity)


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def _step_of(folder: Path) -> int:
    return int(folder.name[len(PREFIX) :])


def is_complete(folder: Path) -> bool:
    """runstate.json (written last) is readable and every file it lists has its recorded size."""
    try:
        record = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = record.get("files") or {MODEL_FILE: None}  # checkpoints from before the file list
    for name, size in files.items():
        try:  # one stat: a folder renamed away between two calls must read as incomplete, not raise
            found = (folder / name).stat()
        except OSError:
            return False
        if not stat.S_ISREG(found.st_mode) or (size is not None and found.st_size != size):
            return False
    return True


def _recover(root: Path) -> None:
    """Undo what a kill left half-done: an old checkpoint set aside and not yet replaced comes back;
    temporary and trash folders go."""
    if not root.is_dir():
        return
    for aside in root.glob(f"{OLD}{PREFIX}*"):
        final = root / aside.name[len(OLD) :]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(final)
    for stale in [*root.glob(f"{TMP}*"), *root.glob(f"{TRASH}*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Delete a checkpoint so that no kill leaves it looking complete: rename it away first."""
    trash = folder.with_name(f"{TRASH}{folder.name}")
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def damaged_file(folder: Path) -> str | None:
    """The first file of a complete checkpoint whose bytes differ from the SHA-256 recorded when it
    was saved (a flipped bit, a file replaced by one of the same size); None when all match, or for
    checkpoints from before the hashes."""
    recorded = json.loads((folder / STATE_FILE).read_text()).get("sha256") or {}
    for name, digest in recorded.items():
        try:
            if file_sha256(folder / name) != digest:
                return name
        except OSError:
            return name
    return None


def _problem(folder: Path) -> tuple[str, bool] | None:
    """Why ``folder`` cannot be resumed, and whether it is damaged (rather than unfinished); None: sound."""
    if not is_complete(folder):
        return f"{folder} is incomplete (files missing or truncated)", False
    damaged = damaged_file(folder)
    if damaged is None:
        return None
    what = "other bytes than the SHA-256 recorded when it was saved, which this program never writes"
    return f"{folder / damaged} holds {what} (a damaged or crafted file)", True


def resolve_resume(resume: str, out: str | Path, *, recover: bool = True) -> Path | None:
    """``auto``: the latest sound checkpoint in ``out`` (None if there is none); ``never``: None;
    otherwise the given checkpoint folder, which must be sound.

    A latest checkpoint that is incomplete (files missing or truncated) or damaged (a file's bytes
    differ from its recorded SHA-256) is skipped for the one before it, with a warning naming it;
    when a damaged one leaves none to resume, the run is refused rather than restarted in silence.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return _latest_sound(out, recover)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(
            f"resume={resume}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"use resume=auto, resume=never or a folder such as {checkpoint_root(out)}/{PREFIX}00001000"
        )
    problem = _problem(path)
    if problem is not None:
        raise UsageError(f"resume={resume}: {problem[0]}; use resume=auto or an older checkpoint")
    return path


def _latest_sound(out: str | Path, recover: bool) -> Path | None:
    if recover:
        _recover(checkpoint_root(out))
    newest, damaged = None, False
    for candidate in reversed(complete_checkpoints(out)):
        problem = _problem(candidate)
        if problem is None:
            if newest is not None:
                print(
                    f"warning: {newest}; resuming from the previous complete checkpoint {candidate}",
                    file=sys.stderr,
                )
            return candidate
        newest = newest or problem[0]
        damaged = damaged or problem[1]
    if damaged:
        raise UsageError(
            f"{newest}, and no earlier checkpoint under {checkpoint_root(out)} is sound: "
            "start fresh with resume=never or a new out=..."
        )
    if newest is not None:
        print(
            f"warning: no complete checkpoint under {checkpoint_root(out)}; starting from step 0",
            file=sys.stderr,
        )
    return None


def load_position(checkpoint: Path) -> Position:
    record = json.loads((checkpoint / STATE_FILE).read_text())
    record.pop("files", None)
    record.pop("sha256", None)
    try:
        return Position(**record)
    except TypeError as error:  # another version's or a hand-edited state file
        raise UsageError(
            f"{checkpoint / STATE_FILE} is not a run state this version reads ({error}); "
            "use resume=never or an older checkpoint"
        ) from None


def save(
    accelerator, out: str | Path, position: Position, keep: int, modules: dict[str, nn.Module] | None = None
) -> Path:
    """Collective: every process calls it. Returns the completed checkpoint folder.

    ``modules``: the stage's extra modules (the same in every process), saved by the main process
    as ``NAME.safetensors``.

    Assembled under ``.tmp-step_N`` and renamed into place; a checkpoint of the same step already
    there is first renamed aside (``.old-step_N``) and deleted only after the new one is in, so at
    every moment one complete checkpoint of the newest step exists (or is restored by ``_recover``).
    """
    root = checkpoint_root(out)
    final = root / f"{PREFIX}{position.step:08d}"
    tmp = root / f"{TMP}{final.name}"
    if accelerator.is_main_process:
        _recover(root)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _save_state(accelerator, tmp)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. out of disk: free what was written
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            _save_modules(tmp, modules or {})
            atomic_write_bytes(tmp / STATE_FILE, json.dumps(_record(tmp, position), indent=1).encode())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        aside = root / f"{OLD}{final.name}"
        if final.exists():  # the same step saved twice (e.g. end of run after a signal save)
            final.rename(aside)
        tmp.rename(final)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        for old in complete_checkpoints(out)[: -max(1, keep)]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _record(folder: Path, position: Position) -> dict[str, Any]:
    """runstate.json: the position, and the size and SHA-256 of every file saved beside it (checked
    at resume by :func:`is_complete` and :func:`damaged_file`)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {
        **asdict(position),
        "files": files,
        "sha256": {name: file_sha256(folder / name) for name in files},
    }


def _save_state(accelerator, folder: Path) -> None:
    with disk_errors_at(folder):  # accelerate's writers name no file (torch's not even its errno)
        accelerator.save_state(str(folder))


def _save_modules(folder: Path, modules: dict[str, nn.Module]) -> None:
    from safetensors.torch import save_model

    for name, module in modules.items():
        path = folder / f"{name}.safetensors"
        if path.exists():  # a programming error: the name of one of accelerate's files
            raise ValueError(f"checkpointed module {name!r}: {path.name} is taken by accelerate's save_state")
        with disk_errors_at(path):  # safetensors names no file
            save_model(module, str(path))  # shared tensors stored once, as accelerate does for models


def load_state(accelerator, checkpoint: Path, modules: dict[str, nn.Module] | None = None) -> None:
    """Collective: restore accelerate's state and the extra ``modules`` from ``checkpoint`` without
    running code from it (see the module docstring); one :class:`UsageError` line otherwise."""
    from safetensors.torch import load_model

    _refuse_unsafe(checkpoint, accelerator.process_index)
    try:
        accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met an object
        raise UsageError(f"{checkpoint}: {_not_plain(err)}") from None
    for name, module in (modules or {}).items():
        path = checkpoint / f"{name}.safetensors"
        if not path.is_file():
            raise UsageError(f"{checkpoint} has no {path.name} to resume the run's {name} from; start fresh")
        load_model(module, str(path))  # strict: every tensor present and of its shape


def _refuse_unsafe(checkpoint: Path, process_index: int) -> None:
    """Refuse what accelerate would unpickle with ``weights_only=False``, and RNG states it would
    fail to read and skip in silence (the resume would then quietly differ)."""
    pickled = sorted(p.name for p in checkpoint.glob(PICKLED_OBJECTS))
    if pickled:
        raise UsageError(
            f"{checkpoint} holds {', '.join(pickled)}: pickled objects, which could run code when read and "
            "which this program never writes; resume from a checkpoint it saved, or start fresh with a new out=..."
        )
    from accelerate.utils import load as weights_only_load  # torch.load(weights_only=True), numpy allowed

    rng = checkpoint / f"random_states_{process_index}.pkl"
    if rng.is_file():
        try:
            weights_only_load(rng)
        except Exception as err:  # accelerate would catch it and resume with other random numbers
            raise UsageError(f"{rng}: {_not_plain(err)}") from None


def _not_plain(err: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f"an object of {found.group(1)}" if found else "more than tensors and plain values"
    return (
        f"the checkpoint holds {what}, which this program never writes (a damaged or crafted file); "
        "resume from another checkpoint or start fresh with a new out=..."
    )


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """The training images as a resume compares them: their count, and for image files a SHA-256 of
    their sorted paths relative to the folder, which changes when a file is added, removed or
    renamed. Names only, from the listing already in memory: a stat per file would cost minutes on
    a network file system for an ImageNet-sized folder. Empty for a stream of shards (no length)."""
    try:
        count = len(dataset)
    except TypeError:
        return {}
    found = _image_files(dataset)
    if found is None:  # a registry dataset held in arrays: its size is what can change
        return {"images": count}
    root, paths = found
    names = sorted(os.path.relpath(path, root) for path in paths)
    return {"images": count, "files_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}


def _image_files(dataset: Any) -> tuple[str, list[str]] | None:
    """(root, files) of an image folder's samples that ``dataset`` reads, through the subset and
    wrapper layers above it (``dataset`` and ``indices`` attributes); None for data not in files."""
    indices = None
    while dataset is not None:
        samples = getattr(dataset, "samples", None)
        if isinstance(samples, list) and hasattr(dataset, "root"):
            chosen = samples if indices is None else [samples[i] for i in indices]
            return str(dataset.root), [path for path, *_ in chosen]
        own = getattr(dataset, "indices", None)
        if own is not None:
            indices = list(own) if indices is None else [own[i] for i in indices]
        dataset = getattr(dataset, "dataset", None)
    return None


def check_same_images(checkpoint: Path, stored: dict[str, Any], now: dict[str, Any], force: bool) -> None:
    """Refuse to continue a run on other images than it trained on (the epochs, the sampler's order
    and the steps per epoch would change mid-run), in one line saying what changed;
    ``force``: a warning instead. Checkpoints from before the identity was recorded pass."""
    if not stored or not now or stored == now:
        return
    old, new = stored.get("images"), now.get("images")
    what = (
        f"{old} images then, {new} now"
        if old != new
        else f"the same number of images ({new}) but other files"
    )
    if force:
        print(
            f"warning: force_resume=true: continuing {checkpoint} on changed data ({what})", file=sys.stderr
        )
        return
    raise UsageError(
        f"{checkpoint} was trained on other data ({what}): resuming would change its epochs mid-run. "
        "Start fresh with a new out=..., or add force_resume=true to continue anyway"
    )


def truncate_log(path: Path, step: int) -> None:
    """Drop log records of steps at or after ``step`` (they will be run again after a resume)."""
    if not path.is_file():
        return

    def keep(record: dict[str, Any]) -> bool:
        if "event" in record:  # monitors etc. ran at a step boundary: kept up to the checkpoint's step
            return record.get("at_step", 0) <= step
        return record.get("step", -1) < step

    kept = [line for line, record in log_records(path) if keep(record)]
    atomic_write_bytes(path, b"\n".join(kept) + b"\n" if kept else b"")


def log_records(path: Path) -> list[tuple[bytes, dict[str, Any]]]:
    """(line, record) of each line of a run's ``log.jsonl``. A last line that is no JSON record is
    what a kill in the middle of its write leaves: dropped, with one warning. Any other such line
    was not written by a run: one UsageError line naming it."""
    lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    records = []
    for n, line in lines:
        record = _json_record(line)
        if record is not None:
            records.append((line, record))
        elif n == lines[-1][0]:
            print(
                f"warning: {path} line {n} was cut short (a run killed while writing it); dropped",
                file=sys.stderr,
            )
        else:
            raise UsageError(
                f"{path} line {n} is not a JSON record (the run writes one per line): delete or repair "
                "that line, or start fresh with a new out=..."
            )
    return records


def _json_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        return None
    return record if isinstance(record, dict) else None


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


# Settings of every training stage that may differ between a checkpoint and the run that resumes
# it: where and how the run is driven, not what it computes. A stage adds its own (e.g. monitors)
# and passes the union as ``resumable``; anything else changes the recipe mid-run and is refused.
@dataclass(kw_only=True)
class RunKeys:
    """The run-management keys of every training stage's config, declared once: pretraining,
    fine-tuning and compression's recovery inherit them (same names, defaults and meaning), and
    :class:`selfsup.loop.RunSettings` reads them with the stage's ``out`` and ``epochs``."""

    resume: str = "auto"  # "auto": latest checkpoint in `out` if any; "never"; or a checkpoint folder
    # continue a checkpoint even though recipe settings changed (listed in a warning)
    force_resume: bool = False
    max_steps: int | None = setting(None, ge=1)  # stop early (the schedules still span the epochs)
    save_every_steps: int = setting(0, ge=0)  # 0: off
    save_every_epochs: int = setting(1, ge=0)
    keep_checkpoints: int = setting(2, ge=1)
    log_every: int = setting(1, ge=1)  # steps between log.jsonl records
    log_with: Literal["none", "tensorboard"] = "none"
    progress_bar: bool = True
    max_nan_steps: int = setting(5, ge=1)  # this many non-finite losses in a row stop the run


RUN_KEYS = frozenset(
    {
        "out",
        "resume",
        "force_resume",
        "data_root",
        "max_steps",
        "save_every_steps",
        "save_every_epochs",
        "keep_checkpoints",
        "log_every",
        "log_with",
        "progress_bar",
        "num_workers",
        "threads",
        "mixed_precision",
        "max_nan_steps",
    }
)


def check_run_settings(config: Any, minimums: dict[str, int] | None = None) -> None:
    """A stage's config holds values its fields' rules accept (the run keys' ``setting(ge=...)``
    above, the stage's ``epochs``, ``batch_size``, ``num_workers``, ``threads``: each rule written
    once, beside its field), and ``minimums`` for keys that declare no rule. One UsageError line otherwise."""
    check_rules(config)
    for name, low in (minimums or {}).items():
        value = getattr(config, name)
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(stored: dict[str, Any], requested: dict[str, Any], resumable: frozenset[str]) -> list[str]:
    """``key: old -> new`` for every setting whose top-level key is not in ``resumable`` that differs."""
    old, new = _flatten(stored), _flatten(requested)
    changed = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in resumable:
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changed.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return changed


def check_resume_config(
    checkpoint: Path, position: Position, requested: dict[str, Any], force: bool, resumable: frozenset[str]
) -> None:
    """Refuse to continue a run under another recipe (one line listing the differing keys).

    ``resumable``: the stage's top-level keys that may change (:data:`RUN_KEYS` and its own).
    """
    if not position.config:  # checkpoints from before configs were recorded
        return
    changed = config_changes(position.config, requested, resumable)
    if not changed:
        return
    listed = "; ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
    if force:
        print(
            f"warning: force_resume=true: continuing {checkpoint} with changed settings: {listed}",
            file=sys.stderr,
        )
        return
    raise UsageError(
        f"{checkpoint} was trained with other settings ({listed}); resuming would mix two recipes in one run. "
        "Start fresh with a new out=..., or add force_resume=true to continue anyway"
    )
