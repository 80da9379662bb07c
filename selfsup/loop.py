"""The training loop every stage shares: resume, save cadence, stop signals, the NaN policy, the run log.

A stage gives a :class:`Step` (its forward pass, which sets its per-step schedules, and its update)
and its batches; :class:`TrainingRun` does the rest, in the order of the official loops (MoCo v3
``main_moco.py``, MAE ``engine_pretrain.py``: schedules from the fractional epoch, forward,
backward, optimizer step), run identically by 1 or W processes:

* one run per output folder: the main process holds ``OUT/.lock`` (:mod:`selfsup.runlock`) from
  :func:`start_process` to the end of the run;
* ``resume`` continues from a checkpoint (:mod:`selfsup.runstate`) with the same losses an
  uninterrupted run would log, says so in one line, and refuses (before anything is written) a
  checkpoint of another recipe or of other training images; a stage's extra modules
  (fine-tuning's EMA) are checkpointed beside the model as safetensors, never pickled;
* a checkpoint every ``save_every_steps`` steps and ``save_every_epochs`` epochs, and at the end;
* SIGTERM/SIGINT save a checkpoint at the next step boundary (the processes agree in the same
  all-reduce as the loss) and :meth:`TrainingRun.steps` returns ``"interrupted"``;
* a NaN/inf loss skips the update; ``max_nan_steps`` in a row raise :class:`TrainingDiverged`,
  keeping the last checkpoint from before (none is saved during a streak, not even at a stop
  signal: the stop line says so); an update that fp16's gradient scaler skips (overflowing
  gradients, finite loss) is logged and counted, not a NaN step;
* one record per step goes to the :class:`~selfsup.runlog.RunLog`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from selfsup import runlock, runstate
from selfsup.accel import announce_precision, make_accelerator
from selfsup.config import save_config, to_dict
from selfsup.errors import EXIT_DIVERGED, UsageError
from selfsup.files import describe_os_error, ensure_writable_dir, is_user_os_error, remove_orphan_temporaries
from selfsup.runlog import RunLog

# What the last stop signal of this process's run left on disk, for run_command's line: a stage's
# result carries the signal, not whether its checkpoint could be saved (none is during a NaN streak).
_stop_outcome: list[str] = []


class TrainingDiverged(Exception):
    """``max_nan_steps`` non-finite losses in a row; the last checkpoint (if any) predates them."""


@dataclass(kw_only=True)
class RunSettings(runstate.RunKeys):
    """What :class:`TrainingRun` needs of a stage's config: the shared run keys, ``out`` and ``epochs``."""

    out: str
    epochs: int

    @classmethod
    def of(cls, config: Any, **overrides: Any) -> RunSettings:
        """The run settings of a stage's config dataclass (``overrides``: e.g. another ``out``)."""
        values = {f.name: getattr(config, f.name) for f in fields(cls) if f.name not in overrides}
        return cls(**values, **overrides)


class Step(Protocol):
    """A stage's training iteration, split where the NaN policy needs it: the gradients are
    computed first, and applied only when the loss is finite in every process."""

    def forward(self, batch: Any, progress: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward and backward of ``batch`` at fractional epoch ``progress`` (one backward per
        micro-batch when gradients are accumulated): the loss, and the schedule values to log."""
        ...

    def update(self, loss: torch.Tensor) -> None:
        """Apply the gradients (clipping, optimizer step, EMA); called only when ``loss`` is finite
        in every process. The next ``forward`` clears the gradients of a skipped step."""
        ...


def start_process(config: Any) -> Accelerator:
    """What every training process does before it builds anything, in this order, from a stage
    config's ``out``, ``mixed_precision``, ``log_with``, ``batch_size``, ``threads`` and ``seed``.

    ``out`` is proven writable first (a run must be able to save), the Accelerator is made, the main
    process claims ``out`` for this run (:mod:`selfsup.runlock`: a second run there is refused in
    one line before it writes anything; :func:`disk_errors_as_usage_errors` and :func:`run_command`
    release it at their end, the OS when the process ends), its precision is announced (``auto``
    resolved and written back into the config, as config.yaml records it), the global batch must
    split evenly, then torch's threads and the seed are set (the same initial weights in every
    process).
    """
    ensure_writable_dir(config.out, "out=")
    asked = config.mixed_precision
    accelerator = make_accelerator(asked, log_with=config.log_with, project_dir=config.out)
    on_main(accelerator, lambda: _claim(config.out))  # a refusal stops the other processes too
    announce_precision(accelerator, asked)
    config.mixed_precision = accelerator.mixed_precision
    world = accelerator.num_processes
    if config.batch_size % world:
        raise UsageError(f"batch_size={config.batch_size} must be divisible by the {world} processes")
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)
    return accelerator


def _claim(out: str | Path) -> None:
    """Hold ``out`` for this run, then remove what a killed run's atomic writes left there."""
    runlock.claim(out)
    removed = remove_orphan_temporaries(out)
    if removed:
        print(
            f"note: removed {len(removed)} temporary file(s) an interrupted run left: "
            + ", ".join(str(p) for p in removed[:3])
            + (", ..." if len(removed) > 3 else ""),
            file=sys.stderr,
        )


@contextlib.contextmanager
def disk_errors_as_usage_errors(out: str | Path) -> Iterator[None]:
    """The guard around a training stage's run: a disk error the user can fix (no space, no
    permission, read-only) becomes one :class:`UsageError` line naming the last good checkpoint,
    which the atomic saves keep intact; at its end the run's hold on ``out`` is released."""
    try:
        yield
    except Exception as err:  # OSError, or a writer's wrapper of one (safetensors, torch.save)
        if not is_user_os_error(err):
            raise
        found = runstate.complete_checkpoints(out)
        last = (
            f"the last good checkpoint {found[-1]} is intact" if found else "no checkpoint had been saved yet"
        )
        raise UsageError(
            f"cannot write the run's files ({describe_os_error(err)}); {last}: "
            f"free space or fix permissions, then rerun with out={out} resume=auto"
        ) from None
    finally:
        runlock.release(out)


def on_main(accelerator: Accelerator, work: Callable[[], Any]) -> Any:
    """Collective: ``work()`` on the main process only (exports, reports), its failure shared.

    An error there (a full disk, say) is re-raised on the main process, and the others exit too
    instead of waiting forever at the next barrier for a process that has gone.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:  # handed to the caller below, after the others know
            error = err
    if accelerator.num_processes > 1:
        failed = torch.tensor(float(error is not None), device=accelerator.device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise SystemExit("the main process failed (its error is on its stderr); stopping this one too")
    if error is not None:
        raise error
    return result


def run_command(train: Callable[[Any], Any], config: Any, continue_with: str) -> Any:
    """A stage command's run: ``train(config)``, with the exit codes every training command shares.

    Divergence is one error line and :data:`~selfsup.errors.EXIT_DIVERGED`; a run stopped by
    SIGTERM/SIGINT says what it saved and how to continue (``continue_with``, formatted with
    ``out``) and exits 128 + the signal. Otherwise the finished run's result is returned.
    """
    _stop_outcome.clear()
    try:
        result = train(config)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None
    finally:
        runlock.release(config.out)  # the command's run is over (held since start_process)
    if result.status == "interrupted":
        print(
            f"stopped at step {result.step}/{result.total_steps} (signal {result.signal}); "
            f"{_stop_outcome[-1] if _stop_outcome else 'checkpoint saved'}, "
            f"continue with{continue_with.format(out=result.out)}",
            file=sys.stderr,
        )
        raise SystemExit(128 + (result.signal or 15))
    return result


def agree(accelerator: Accelerator, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """The mean loss over processes and whether any process was asked to stop (one all-reduce)."""
    t = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
    if accelerator.num_processes > 1:
        dist.all_reduce(t)
        t[0] /= accelerator.num_processes
    return float(t[0]), bool(t[1] > 0)


def _short(value: Any, limit: int = 5) -> str:
    if isinstance(value, list) and len(value) > limit:
        return f"{len(value)}: " + ", ".join(map(str, value[:limit])) + ", ..."
    return str(value)


def shared_resume(accelerator: Accelerator, resume: str, out: str | Path) -> Path | None:
    """Collective: the checkpoint every process resumes from (None: a fresh start), as the main
    process resolves it (:func:`runstate.resolve_resume`).

    The main process first repairs what a killed save left in ``out`` (a checkpoint set aside comes
    back, temporary folders go); a process listing the folder meanwhile could pick another
    checkpoint, so the others take the main process's answer, or its refusal (the same one line in
    every process), broadcast (``torch.distributed.broadcast_object_list``, as accelerate's helper).
    """

    def decide() -> tuple[str, str | None]:
        try:
            found = runstate.resolve_resume(resume, out, recover=True)
        except UsageError as err:
            return "refused", str(err)
        return "resume", None if found is None else str(found)

    decision = on_main(accelerator, decide)  # a crash there stops the others (see on_main)
    if accelerator.num_processes > 1:
        box = [decision]
        dist.broadcast_object_list(box, src=0, device=accelerator.device)
        decision = box[0]
    kind, value = decision
    if kind == "refused":
        raise UsageError(value)
    return None if value is None else Path(value)


def resume_point(
    settings: RunSettings,
    config: Any,
    data: dict[str, Any],
    resumable: frozenset[str],
    same_data: tuple[str, ...] = (),
    dataset: Any = None,
    *,
    accelerator: Accelerator | None = None,
) -> tuple[Path | None, runstate.Position]:
    """The checkpoint a run continues (None: a fresh start) and the position it starts at, after
    every refusal and before anything is written or loaded, so a stage may call it ahead of its own
    first write: another recipe (keys not in ``resumable``), a ``same_data`` entry of ``data`` (such
    as the class names) other than the checkpoint's, or other training images (``dataset``, see
    :func:`runstate.dataset_identity`). ``force_resume`` makes a changed recipe or changed images
    a warning instead. With ``accelerator``, the checkpoint is the main process's choice
    (:func:`shared_resume`); without, the caller resolves it (and repairs, as a single process)."""
    requested = to_dict(config)
    identity = runstate.dataset_identity(dataset) if dataset is not None else {}
    fresh = runstate.Position(data=data, config=requested, data_identity=identity)
    if accelerator is not None:
        checkpoint = shared_resume(accelerator, settings.resume, settings.out)
    else:
        checkpoint = runstate.resolve_resume(settings.resume, settings.out)
    if checkpoint is None:
        return None, fresh
    stored = runstate.load_position(checkpoint)
    runstate.check_resume_config(checkpoint, stored, requested, settings.force_resume, resumable)
    for key in same_data:
        if stored.data.get(key) != data.get(key):
            raise UsageError(
                f"{checkpoint} was trained with other {key} than the data now has "
                f"({_short(stored.data.get(key))} vs {_short(data.get(key))}): "
                f"use a new out=... for this data"
            )
    runstate.check_same_images(checkpoint, stored.data_identity, identity, settings.force_resume)
    stored.config, stored.data_identity = requested, identity
    return checkpoint, stored


class TrainingRun:
    """One training run of a stage: ``start`` (resume or not), then ``with run: run.steps(...)``.

    ``resumable``: the config keys that may change across a resume (:data:`runstate.RUN_KEYS` and
    the stage's own). ``bar_fields``: what the progress bar shows (:class:`RunLog`). ``advice``:
    what a diverged run should try, in the :class:`TrainingDiverged` message. ``modules``: state
    beside the model and optimizer (e.g. ``{"ema": ema}``; None entries skipped), checkpointed as
    ``NAME.safetensors``: accelerate's ``register_for_checkpointing`` would pickle it.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        settings: RunSettings,
        steps_per_epoch: int,
        *,
        stage: str,
        resumable: frozenset[str],
        images_per_step: int,
        bar_fields: dict[str, str] | None = None,
        advice: str = "lower the learning rate or use mixed_precision=no",
        modules: dict[str, nn.Module | None] | None = None,
    ):
        self.accelerator, self.settings, self.steps_per_epoch = accelerator, settings, steps_per_epoch
        self.stage, self.resumable, self.images_per_step = stage, resumable, images_per_step
        self.bar_fields, self.advice = bar_fields, advice
        self.modules = {name: m for name, m in (modules or {}).items() if m is not None}
        self.out = Path(settings.out)
        self.total = steps_per_epoch * settings.epochs
        self.end = min(self.total, settings.max_steps) if settings.max_steps is not None else self.total
        self.position = runstate.Position()
        self.last_loss: float | None = None
        self.signal: int | None = None
        self.log: RunLog | None = None
        self._signals: runstate.StopSignals | None = None
        self._tick = 0.0  # when the current step started waiting for its batch
        self._saved_at: int | None = None  # the step of the checkpoint this run saved or resumed last

    def start(
        self, config: Any, data: dict[str, Any], same_data: tuple[str, ...] = (), dataset: Any = None
    ) -> Path | None:
        """Resume from the checkpoint ``resume`` names (model, optimizer and RNG states through
        accelerate) after :func:`resume_point`'s refusals, saying so in one line, then write
        ``config.yaml`` and drop log records of the steps that will run again. ``dataset``: the
        training images, whose identity the checkpoint records. Returns the checkpoint resumed from."""
        accelerator, out, s = self.accelerator, self.out, self.settings
        checkpoint, self.position = resume_point(
            s, config, data, self.resumable, same_data, dataset, accelerator=accelerator
        )
        if checkpoint is not None:
            runstate.load_state(accelerator, checkpoint, self.modules)
            if checkpoint.parent.resolve() == runstate.checkpoint_root(out).resolve():  # not another run's
                self._saved_at = self.position.step
            if accelerator.is_main_process:
                print(f"resuming at step {self.position.step}/{self.end} from {checkpoint}", file=sys.stderr)

        def prepare_out() -> None:
            out.mkdir(parents=True, exist_ok=True)
            runstate.truncate_log(out / "log.jsonl", self.position.step)  # may refuse a corrupt line
            save_config(config, out / "config.yaml")

        on_main(accelerator, prepare_out)  # a refusal there stops every process, not the main one alone
        if s.log_with != "none":
            accelerator.init_trackers(self.stage)
        return checkpoint

    def save(self) -> None:
        """Collective: a checkpoint of the current position (see :func:`runstate.save`)."""
        runstate.save(self.accelerator, self.out, self.position, self.settings.keep_checkpoints, self.modules)
        self._saved_at = self.position.step

    def __enter__(self) -> TrainingRun:
        s, main = self.settings, self.accelerator.is_main_process
        self.log = RunLog(
            self.accelerator,
            self.out,
            self.end,
            self.position.step,
            s.log_every,
            s.progress_bar and main,
            self.bar_fields,
        )
        self._signals = runstate.StopSignals().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.log is not None:
                self.log.close()
            if self.settings.log_with != "none":
                self.accelerator.end_training()
        finally:
            if self._signals is not None:
                self._signals.__exit__(*exc)

    def _diverged(self) -> TrainingDiverged:
        position = self.position
        saved = runstate.complete_checkpoints(self.out)
        where = (
            f"the last checkpoint {saved[-1]} predates the divergence: {self.advice}, then resume=auto"
            if saved
            else f"no checkpoint was saved before it: {self.advice} and start again"
        )
        return TrainingDiverged(
            f"loss was NaN/inf for {position.nan_streak} steps in a row (up to step {position.step - 1}); {where}"
        )

    def steps(
        self,
        step: Step,
        batches: Callable[[int, int], Iterable[Any]],
        at_epoch: Callable[[int], None] | None = None,
    ) -> Literal["finished", "interrupted"]:
        """Run from the current position to the end (or a stop signal); call inside ``with run:``.

        ``batches(epoch, first_step)``: that epoch's batches from step ``first_step`` on.
        ``at_epoch(e)``: called with 0 before the first step of a fresh run and with e after epoch e
        (monitors; collective when the stage makes it so). The phases, in order: one step (forward,
        the processes' agreement, update or NaN count, log), the stop decision, the save rule, the
        epoch boundary, the final save.
        """
        assert self.log is not None and self._signals is not None, "use `with run:` around run.steps()"
        position = self.position
        if position.step == 0 and at_epoch is not None:
            at_epoch(0)
        while position.step < self.end:
            epoch, first = position.step // self.steps_per_epoch, position.step
            self._tick = time.perf_counter()
            for batch in batches(epoch, position.step - epoch * self.steps_per_epoch):
                stop = self._one_step(step, batch, epoch)
                if position.step >= self.end:
                    break
                if stop:
                    return self._interrupt(epoch, at_epoch)
                if self.settings.save_every_steps and position.step % self.settings.save_every_steps == 0:
                    self._save_unless_diverging()
                self._tick = time.perf_counter()  # the next step's data time starts after the save
            if position.step == first:  # re-entering would wait for a batch forever
                raise self._no_batch(epoch)
            if self._epoch_complete(epoch):
                self._end_epoch(epoch, at_epoch)
        if self._saved_at != position.step:  # a folder of this step not saved by this run is a damaged one
            self._save_unless_diverging()  # the final checkpoint, unless a save at this step made it
        return "finished"

    def _no_batch(self, epoch: int) -> UsageError:
        """A pass over indexed data that gave no batch at all (an empty stream is refused earlier, in
        :meth:`~selfsup.sampling.EndlessBatches.take`): re-entering it would wait forever."""
        offset = self.position.step - epoch * self.steps_per_epoch
        return UsageError(
            f"the training data gave no batch for step {self.position.step} (epoch {epoch + 1} expected "
            f"{self.steps_per_epoch} batches of {self.images_per_step} images, its steps per epoch, and "
            f"gave none from its batch {offset} on): the data holds fewer images than one batch per process; "
            "use more data or a smaller batch_size"
        )

    def _one_step(self, step: Step, batch: Any, epoch: int) -> bool:
        """Forward, agree across processes, update (or count the NaN), log; True if a stop was asked."""
        position = self.position
        data_s = time.perf_counter() - self._tick
        progress = epoch + (position.step - epoch * self.steps_per_epoch) / self.steps_per_epoch
        loss, scheduled = step.forward(batch, progress)
        value, stop = agree(self.accelerator, loss, self._signals.requested is not None)
        scaler_skipped = self._apply(step, loss, value)
        elapsed = time.perf_counter() - self._tick
        record = {
            "step": position.step,
            "epoch": round(progress, 6),
            "loss": value,
            **scheduled,
            "images_per_s": self.images_per_step / max(elapsed, 1e-9),
            "data_s": data_s,
            "compute_s": elapsed - data_s,
            "skipped": not math.isfinite(value),
        }
        if self.accelerator.scaler is not None:
            record["scaler_skipped"] = scaler_skipped
        self.log.step(record)
        position.step += 1
        if position.nan_streak >= self.settings.max_nan_steps:
            raise self._diverged()
        return stop

    def _apply(self, step: Step, loss: torch.Tensor, value: float) -> bool:
        """The NaN policy: a finite loss updates and ends any streak; a NaN/inf one is skipped and
        counted. fp16's scaler may still skip a finite step whose gradients overflowed (it then
        lowers its scale): routine, so counted apart and never part of a streak. Returns that skip."""
        position = self.position
        if not math.isfinite(value):
            position.nan_skipped += 1
            position.nan_streak += 1
            return False
        step.update(loss)
        position.nan_streak = 0
        self.last_loss = value
        skipped = self.accelerator.optimizer_step_was_skipped
        position.scaler_skipped += skipped
        return skipped

    def _epoch_complete(self, epoch: int) -> bool:
        return self.position.step == (epoch + 1) * self.steps_per_epoch

    def _interrupt(self, epoch: int, at_epoch: Callable[[int], None] | None) -> Literal["interrupted"]:
        """A stop signal: the epoch hook if the epoch just completed (as an unstopped run would run it
        before its save), a checkpoint of this step, and the signal recorded for the exit code."""
        if self._epoch_complete(epoch) and at_epoch is not None:
            at_epoch(epoch + 1)
        saved = self._save_unless_diverging()
        self.signal = self._signals.requested or 15
        _stop_outcome[:] = ["checkpoint saved" if saved else self._unsaved()]
        return "interrupted"

    def _unsaved(self) -> str:
        """Why a stop saved nothing, and what a resume continues from instead."""
        saved = runstate.complete_checkpoints(self.out)
        before = f"the last checkpoint {saved[-1]} predates them" if saved else "none was saved before them"
        return (
            f"no checkpoint saved at step {self.position.step} (the loss was NaN/inf for its last "
            f"{self.position.nan_streak} steps; {before})"
        )

    def _end_epoch(self, epoch: int, at_epoch: Callable[[int], None] | None) -> None:
        """After a whole epoch: its hook, then its checkpoint if ``save_every_epochs`` asks for one (the
        last epoch's is the final save)."""
        if at_epoch is not None:
            at_epoch(epoch + 1)
        every = self.settings.save_every_epochs
        if every and (epoch + 1) % every == 0 and self.position.step < self.end:
            self._save_unless_diverging()

    def _save_unless_diverging(self) -> bool:
        """The save rule: no checkpoint during a NaN streak, so the last one predates it. Returns
        whether it saved."""
        if self.position.nan_streak:
            return False
        self.save()
        return True
