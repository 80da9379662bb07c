"""The shared core a training stage runs on, with a toy stage: a linear regression step.

The loop's promises hold for any step, not only MoCo's: exact resume, the save cadence, the NaN/inf
policy, a stage-chosen progress bar, and the resume refusal with the stage's own resumable keys.
The MoCo-specific runs (signals, two processes, disks) are in test_ssl_runs.py / test_ssl_faults.py.
"""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from selfsup import runstate
from selfsup.accel import make_accelerator, threads_for
from selfsup.errors import UsageError
from selfsup.loop import RunSettings, TrainingDiverged, TrainingRun
from selfsup.metrics import check_finite, per_class_accuracy, topk_accuracy
from selfsup.runstate import RUN_KEYS
from selfsup.schedules import scaled_lr, warmup_cosine

STEPS_PER_EPOCH = 4


@dataclass
class ToyConfig:
    out: str
    epochs: int = 3
    lr: float = 0.1
    max_steps: int | None = None
    save_every_steps: int = 0
    save_every_epochs: int = 1
    keep_checkpoints: int = 2
    max_nan_steps: int = 3
    progress_bar: bool = False
    resume: str = "auto"
    force_resume: bool = False
    log_every: int = 1
    log_with: str = "none"


class ToyStep:
    """SGD on y = 2x; ``nan_at`` steps return a NaN loss (as a diverging model would)."""

    def __init__(self, accelerator, model, optimizer, lr: float, epochs: int, nan_at=(), on_call=None):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.lr, self.epochs, self.nan_at, self.calls = lr, epochs, set(nan_at), 0
        self.on_call = on_call or (lambda call: None)

    def forward(self, batch, progress):
        lr = warmup_cosine(progress, self.lr, 1, self.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = batch
        self.optimizer.zero_grad()
        loss = ((self.model(x) - y) ** 2).mean()
        self.on_call(self.calls)
        self.calls += 1
        loss = loss * float("nan") if self.calls - 1 in self.nan_at else loss
        self.accelerator.backward(loss)
        return loss.detach(), {"lr": lr}

    def update(self, loss):
        self.optimizer.step()


def batches(epoch: int, first: int):
    for i in range(first, STEPS_PER_EPOCH):
        g = torch.Generator().manual_seed(epoch * 100 + i)
        x = torch.randn(8, 1, generator=g)
        yield x, 2 * x


class OverflowingScaler:
    """torch.amp.GradScaler's interface, finding inf gradients at every step (an fp16 overflow):
    ``step`` skips the optimizer's step, as the real scaler does then."""

    def __init__(self):
        self.skipped = 0

    def scale(self, loss):
        return loss

    def step(self, optimizer, closure=None):
        self.skipped += 1

    def update(self):
        pass

    def unscale_(self, optimizer):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def toy_run(config: ToyConfig, nan_at=(), stop_at: int | None = None, scaler=None):
    """(status, run, losses logged) of a fresh process-like start of ``config``."""
    accelerator = make_accelerator("no")
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    if scaler is not None:  # what accelerate holds under mixed_precision=fp16 (CUDA only)
        accelerator.scaler = scaler
    model, optimizer = accelerator.prepare(model, optimizer)
    run = TrainingRun(
        accelerator,
        RunSettings.of(config),
        STEPS_PER_EPOCH,
        stage="toy",
        resumable=RUN_KEYS,
        images_per_step=8,
        bar_fields={"loss": "{loss:.3f}", "lr": "{lr:.1e}"},
        advice="lower lr",
    )
    run.start(config, {"mean": [0.0]})

    def on_call(call: int) -> None:  # SIGTERM arriving during the step of this call
        if call == stop_at:
            run._signals.requested = 15

    step = ToyStep(accelerator, model, optimizer, config.lr, config.epochs, nan_at, on_call)
    boundaries = []
    with run:
        status = run.steps(step, batches, boundaries.append)
    return status, run, boundaries


def logged_losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_toy_stage_resumes_exactly_and_saves_on_its_cadence(tmp_path):
    whole, _, boundaries = toy_run(ToyConfig(str(tmp_path / "whole")))
    assert whole == "finished" and boundaries == [0, 1, 2, 3]
    assert [p.name for p in runstate.complete_checkpoints(tmp_path / "whole")] == [
        "step_00000008",
        "step_00000012",
    ]

    parts = tmp_path / "parts"
    toy_run(ToyConfig(str(parts), max_steps=6, save_every_steps=3))
    status, run, boundaries = toy_run(ToyConfig(str(parts)))  # resume=auto from step 6
    assert status == "finished" and run.position.step == 12
    assert boundaries == [2, 3]  # after epochs 2 and 3; no start hook on a resume
    assert logged_losses(parts) == logged_losses(tmp_path / "whole")


def test_a_stop_in_an_epochs_last_step_runs_the_epoch_hook_before_saving(tmp_path):
    _, _, all_boundaries = toy_run(ToyConfig(str(tmp_path / "whole")))
    status, run, boundaries = toy_run(ToyConfig(str(tmp_path / "parts")), stop_at=7)  # epoch 1: steps 4-7
    assert status == "interrupted" and run.position.step == 8 and boundaries == [0, 1, 2]
    status, _, after = toy_run(ToyConfig(str(tmp_path / "parts")))
    assert status == "finished" and boundaries + after == all_boundaries
    assert logged_losses(tmp_path / "parts") == logged_losses(tmp_path / "whole")


def test_nan_losses_skip_the_update_and_a_streak_raises_with_the_stages_advice(tmp_path):
    _, run, _ = toy_run(ToyConfig(str(tmp_path / "a")), nan_at={2, 5})
    assert run.position.nan_skipped == 2 and math.isfinite(run.last_loss)
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records[:6]] == [False, False, True, False, False, True]
    assert records[2]["loss"] is None and set(records[0]) >= {"step", "epoch", "loss", "lr", "images_per_s"}

    with pytest.raises(
        TrainingDiverged,
        match=r"3 steps in a row \(up to step 7\); the last checkpoint .*step_00000004.* lower lr",
    ):
        toy_run(ToyConfig(str(tmp_path / "b")), nan_at={5, 6, 7})


def test_resume_refuses_another_recipe_but_not_the_stages_resumable_keys(tmp_path):
    toy_run(ToyConfig(str(tmp_path), max_steps=4))
    with pytest.raises(UsageError, match=r"lr: 0.1 -> 0.2.*force_resume=true"):
        toy_run(ToyConfig(str(tmp_path), max_steps=8, lr=0.2))
    assert toy_run(ToyConfig(str(tmp_path), max_steps=8, keep_checkpoints=1))[0] == "finished"


def test_schedules_metrics_and_the_thread_rule():
    assert warmup_cosine(0.5, 1.0, 1, 3) == 0.5 and warmup_cosine(2.0, 1.0, 1, 3) == pytest.approx(0.5)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_accuracy(scores, np.array([1, 2]), np.arange(3)) == (50.0, 100.0)
    acc = per_class_accuracy(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert acc[0] == 50.0 and acc[1] == 100.0 and np.isnan(acc[2])
    check_finite(np.zeros(3))
    for bad in (np.array([1.0, np.nan]), torch.tensor([float("inf")])):
        with pytest.raises(UsageError, match="train features contain NaN or inf"):
            check_finite(bad, "train features")
    assert threads_for(1000) == 1 and threads_for(10**9) is None


def test_updates_skipped_by_the_fp16_scaler_are_logged_and_never_count_as_divergence(tmp_path):
    scaler = OverflowingScaler()
    config = ToyConfig(out=str(tmp_path), max_nan_steps=3)  # 12 skipped updates in a row, finite losses
    status, run, _ = toy_run(config, scaler=scaler)
    assert status == "finished" and scaler.skipped == 12
    assert run.position.scaler_skipped == 12 and run.position.nan_skipped == 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["scaler_skipped"] for r in records] == [True] * 12 and not any(r["skipped"] for r in records)
    last = runstate.complete_checkpoints(tmp_path)[-1]
    torch.manual_seed(0)
    initial = nn.Linear(1, 1).state_dict()
    saved = load_file(str(last / runstate.MODEL_FILE))
    assert all(torch.equal(saved[k], initial[k]) for k in initial)  # no update reached the weights
    assert runstate.load_position(last).scaler_skipped == 12  # saved, so a resume keeps counting


class FakeAccelerator:
    """What :func:`selfsup.loop.shared_resume` reads of an Accelerator, for one of two processes."""

    def __init__(self, main: bool):
        self.is_main_process, self.num_processes, self.device = main, 2, torch.device("cpu")


def test_every_process_resumes_from_the_checkpoint_the_main_process_resolved(tmp_path, monkeypatch):
    """Only the main process repairs a folder a kill left half-done; the others take its decision
    (broadcast) rather than listing a folder that is being repaired under them."""
    import torch.distributed as dist

    from selfsup.loop import shared_resume

    toy_run(ToyConfig(str(tmp_path), max_steps=8, save_every_steps=4))
    root = runstate.checkpoint_root(tmp_path)
    latest, aside = root / "step_00000008", root / ".old-step_00000008"
    latest.rename(aside)  # killed while saving step 8 again: set aside, not yet replaced
    sent = []

    def broadcast(objects, src=0, device=None):  # the main process sends first, the other receives
        if sent:
            objects[0] = sent[0]
        else:
            sent.append(objects[0])

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: None)  # on_main's failure flag: none failed
    assert shared_resume(FakeAccelerator(True), "auto", tmp_path) == latest  # repaired, then chosen
    latest.rename(aside)  # what the other process would list mid-repair: step 8 missing
    assert shared_resume(FakeAccelerator(False), "auto", tmp_path) == latest

    sent.clear()
    with pytest.raises(UsageError, match="not a complete checkpoint folder") as refusal:
        shared_resume(FakeAccelerator(True), str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(UsageError) as other:  # the same one line in every process
        shared_resume(FakeAccelerator(False), "auto", tmp_path)
    assert str(other.value) == str(refusal.value)


@pytest.mark.timeout(30)  # the loop used to re-enter an epoch that gives no batch forever
def test_data_that_gives_no_batch_for_a_step_is_one_line_instead_of_a_hang(tmp_path):
    config = ToyConfig(str(tmp_path))
    accelerator = make_accelerator("no")
    settings = RunSettings.of(config)
    run = TrainingRun(
        accelerator, settings, STEPS_PER_EPOCH, stage="toy", resumable=RUN_KEYS, images_per_step=8
    )
    run.start(config, {})
    model = nn.Linear(1, 1)
    step = ToyStep(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), config.lr, config.epochs)

    def short(epoch: int, first: int):  # a stream with fewer images than one batch: no batch at all
        return iter(())

    with run, pytest.raises(UsageError, match=r"no batch for step 0 .*4 batches of 8 images"):
        run.steps(step, short)


def stopped(config, nan_at=()):
    """A stage command's result for a toy run that SIGTERM stops at step 6 (its 7th forward)."""
    from types import SimpleNamespace

    status, run, _ = toy_run(config, nan_at=nan_at, stop_at=6)
    return SimpleNamespace(
        status=status, step=run.position.step, total_steps=run.end, signal=run.signal, out=run.out
    )


def test_a_stop_during_a_nan_streak_says_no_checkpoint_was_saved(tmp_path, capsys):
    from selfsup.loop import run_command

    with pytest.raises(SystemExit) as exit_info:  # the stop comes with the second NaN loss in a row
        run_command(lambda config: stopped(config, nan_at={5, 6}), ToyConfig(str(tmp_path)), " resume=auto")
    err = capsys.readouterr().err
    assert exit_info.value.code == 128 + 15
    assert [p.name for p in runstate.complete_checkpoints(tmp_path)] == ["step_00000004"]
    assert "; checkpoint saved" not in err and "; no checkpoint saved at step 7" in err
    assert "step_00000004 predates" in err, err

    with pytest.raises(SystemExit):  # a stop outside a streak saves, and says so
        run_command(stopped, ToyConfig(str(tmp_path / "b")), " resume=auto")
    assert "step 7/12 (signal 15); checkpoint saved" in capsys.readouterr().err
    assert runstate.complete_checkpoints(tmp_path / "b")[-1].name == "step_00000007"
