"""The pretraining loop: ``train(config) -> PretrainResult``, run identically by 1 or W processes.

Per step, as the official ``main_moco.py``: set lr (warm-up + cosine) and momentum (cosine to 1)
from the fractional epoch, forward both views (the momentum encoder moves first), backward,
AdamW step. Around it: a NaN/inf loss skips the step (K in a row stop the run, keeping the last
checkpoint from before), SIGTERM/SIGINT save a checkpoint at the next step boundary and return,
``resume`` continues from a checkpoint with the same losses an uninterrupted run would log.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from selfsup.checkpoint import timm_call
from selfsup.config import save_config, to_dict
from selfsup.errors import UsageError
from selfsup.files import describe_os_error, ensure_writable_dir, is_user_os_error
from selfsup.imagefolder import report_corrupt
from selfsup.precision import resolve_precision
from selfsup.ssl import runstate
from selfsup.ssl.builder import MoCoV3, build_model
from selfsup.ssl.export import export_backbone, export_latest
from selfsup.ssl.monitor import KnnMonitor
from selfsup.ssl.pipeline import build_pipeline, data_options
from selfsup.ssl.runlog import RunLog, check_tracker
from selfsup.ssl.schedules import learning_rate, moco_momentum, scaled_lr
from selfsup.ssl.settings import PretrainConfig
from selfsup.ssl.syncbn import convert_batchnorm


class TrainingDiverged(Exception):
    """``max_nan_steps`` non-finite losses in a row; the last checkpoint (if any) predates them."""


@dataclass
class PretrainResult:
    status: str  # "finished" | "interrupted" | "exported"
    out: Path
    step: int
    total_steps: int
    backbone: Path | None = None
    last_loss: float | None = None
    nan_skipped: int = 0
    signal: int | None = None
    monitor: list[dict[str, Any]] = field(default_factory=list)
    timm_call: str = ""  # how stock timm rebuilds the exported backbone


def make_accelerator(config: PretrainConfig) -> Accelerator:
    """The run's Accelerator; ``config.mixed_precision`` is resolved (``auto`` -> bf16 or no) in place."""
    check_tracker(config.log_with)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config.mixed_precision = resolve_precision(config.mixed_precision, device)  # type: ignore[assignment]
    # `accelerate launch --multi_gpu` on a machine without GPUs starts W processes but accelerate
    # only joins them (gloo, MULTI_CPU) when told to use the CPU.
    kwargs: dict[str, Any] = {"cpu": device == "cpu", "mixed_precision": config.mixed_precision}
    if config.log_with != "none":
        kwargs.update(log_with=config.log_with, project_dir=config.out)
    try:
        return Accelerator(**kwargs)
    except ValueError as err:
        if "already been initialized" not in str(err):  # e.g. fp16 without a GPU
            raise UsageError(f"mixed_precision={config.mixed_precision}: {err}") from None
    # A second train() in this process with another precision: accelerate keeps its state per
    # process; reset it (the process group, held by PartialState, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**kwargs)


def _agree(accelerator: Accelerator, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """The mean loss over processes and whether any process was asked to stop (one all-reduce)."""
    t = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
    if accelerator.num_processes > 1:
        dist.all_reduce(t)
        t[0] /= accelerator.num_processes
    return float(t[0]), bool(t[1] > 0)


def train(config: PretrainConfig) -> PretrainResult:
    """Run (or continue) the pretraining ``config`` describes; see the module docstring.

    A disk error the user can fix (no space, no permission, read-only) becomes one
    :class:`UsageError` line naming the last good checkpoint, which the atomic saves keep intact.
    """
    try:
        if config.export_only:
            return PretrainResult("exported", Path(config.out), 0, 0, backbone=export_latest(config))
        return _train(config)
    except Exception as err:  # OSError, or a writer's wrapper of one (safetensors, torch.save)
        if not is_user_os_error(err):
            raise
        found = runstate.complete_checkpoints(config.out)
        last = f"the last good checkpoint {found[-1]} is intact" if found else "no checkpoint had been saved yet"
        raise UsageError(
            f"cannot write the run's files ({describe_os_error(err)}); {last}: "
            f"free space or fix permissions, then rerun with out={config.out} resume=auto"
        ) from None


def _train(config: PretrainConfig) -> PretrainResult:
    out = Path(config.out)
    ensure_writable_dir(out, "out=")  # before any work: a run must be able to save
    asked = config.mixed_precision
    accelerator = make_accelerator(config)
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.is_main_process:
        why = f" (auto: {'bf16 is native' if config.mixed_precision == 'bf16' else 'no native bf16'} on {accelerator.device.type})"
        print(f"precision: {config.mixed_precision}{why if asked == 'auto' else ''}", file=sys.stderr)
    if config.batch_size % world:
        raise UsageError(f"batch_size={config.batch_size} must be divisible by the {world} processes")
    if config.threads:
        torch.set_num_threads(config.threads)
    set_seed(config.seed)  # the same initial weights in every process

    pipeline = build_pipeline(config, rank, world, accelerator.device)
    try:
        return _run(config, accelerator, pipeline)
    finally:
        # Every exit path (error, divergence, signal, success) stops the DataLoader workers: they
        # ignore SIGTERM (see pipeline), so a process left waiting for them would never exit.
        pipeline.close()


def _run(config: PretrainConfig, accelerator: Accelerator, pipeline) -> PretrainResult:
    out = Path(config.out)
    world = accelerator.num_processes
    steps_per_epoch = pipeline.steps_per_epoch

    model = build_model(config)
    if world > 1:
        model = convert_batchnorm(model, accelerator.device)
    o = config.optim
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.0, betas=o.betas, weight_decay=o.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    moco: MoCoV3 = accelerator.unwrap_model(model)

    requested = to_dict(config)
    position = runstate.Position(data=pipeline.facts(), config=requested)
    checkpoint = runstate.resolve_resume(config.resume, out, recover=accelerator.is_main_process)
    if checkpoint is not None:
        stored = runstate.load_position(checkpoint)
        runstate.check_resume_config(checkpoint, stored, requested, config.force_resume)
        accelerator.load_state(str(checkpoint))
        position = stored
        position.config = requested
        if not pipeline.indexed and accelerator.is_main_process:
            print(
                f"warning: resuming a stream of shards at step {position.step}: the stream restarts from the "
                "start of its shards instead of skipping the samples already seen (see docs/data.md)",
                file=sys.stderr,
            )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        runstate.truncate_log(out / "log.jsonl", position.step)
        save_config(config, out / "config.yaml")
    if config.log_with != "none":
        accelerator.init_trackers("pretrain")

    total = steps_per_epoch * config.epochs
    end = min(total, config.max_steps) if config.max_steps is not None else total
    peak_lr = scaled_lr(o.base_lr, config.batch_size)
    monitor = None
    if config.monitor_every > 0 and accelerator.is_main_process and not pipeline.indexed:
        print("note: the kNN monitor is off for a stream of shards (it needs an indexed, labelled set); "
              "evaluate exported checkpoints with probe instead", file=sys.stderr)
    if config.monitor_every > 0 and accelerator.is_main_process and pipeline.indexed:
        monitor = KnnMonitor(
            config.dataset,
            data_options(config),
            config.model.img_size,
            config.monitor_train_size,
            config.monitor_val_size,
            config.monitor_k,
        )
    log = RunLog(
        accelerator,
        out,
        end,
        position.step,
        config.log_every,
        config.progress_bar and accelerator.is_main_process,
    )
    result = PretrainResult("finished", out, position.step, end, nan_skipped=position.nan_skipped)

    def run_monitor(epoch: int) -> None:
        if monitor is not None:
            top1 = monitor(moco.backbone, accelerator.device)
            record = {
                "event": "monitor",
                "epoch": epoch,
                "at_step": position.step,
                f"knn_top1_k{config.monitor_k}": top1,
            }
            result.monitor.append(record)
            log.event(record)
        accelerator.wait_for_everyone()

    def save() -> None:
        runstate.save(accelerator, out, position, config.keep_checkpoints)

    model.train()
    with runstate.StopSignals() as signals:
        try:
            if position.step == 0 and config.monitor_at_start:
                run_monitor(0)
            while position.step < end:
                epoch, in_epoch = divmod(position.step, steps_per_epoch)
                tick = time.perf_counter()
                for x1, x2 in pipeline.batches(epoch, in_epoch):
                    data_s = time.perf_counter() - tick
                    progress = epoch + in_epoch / steps_per_epoch
                    lr = learning_rate(progress, peak_lr, o.warmup_epochs, config.epochs)
                    m = moco_momentum(
                        progress, config.moco.momentum, config.epochs, config.moco.momentum_cosine
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    x1 = x1.to(accelerator.device, non_blocking=True)
                    x2 = x2.to(accelerator.device, non_blocking=True)
                    loss = model(x1, x2, m)
                    value, stop = _agree(accelerator, loss, signals.requested is not None)
                    finite = math.isfinite(value)
                    if finite:
                        optimizer.zero_grad(set_to_none=True)
                        accelerator.backward(loss)
                        if o.clip_grad is not None:
                            accelerator.clip_grad_norm_(moco.parameters(), o.clip_grad)
                        optimizer.step()
                        position.nan_streak = 0
                        result.last_loss = value
                    else:
                        position.nan_skipped += 1
                        position.nan_streak += 1
                    elapsed = time.perf_counter() - tick
                    log.step(
                        {
                            "step": position.step,
                            "epoch": round(progress, 6),
                            "loss": value,
                            "lr": lr,
                            "momentum": m,
                            "images_per_s": config.batch_size / max(elapsed, 1e-9),
                            "data_s": data_s,
                            "compute_s": elapsed - data_s,
                            "skipped": not finite,
                        }
                    )
                    position.step += 1
                    in_epoch += 1
                    if position.nan_streak >= config.max_nan_steps:
                        saved = runstate.complete_checkpoints(out)
                        where = (
                            f"the last checkpoint {saved[-1]} predates the divergence: "
                            "lower optim.base_lr, set optim.clip_grad or use mixed_precision=no, then resume=auto"
                            if saved
                            else "no checkpoint was saved before it: lower optim.base_lr, set optim.clip_grad "
                            "or use mixed_precision=no and start again"
                        )
                        raise TrainingDiverged(
                            f"loss was NaN/inf for {position.nan_streak} steps in a row "
                            f"(up to step {position.step - 1}); {where}"
                        )
                    if position.step >= end:
                        break
                    if stop and position.nan_streak == 0:
                        save()
                    if stop:
                        result.status, result.signal = "interrupted", signals.requested or 15
                        return result
                    if (
                        config.save_every_steps
                        and position.step % config.save_every_steps == 0
                        and position.nan_streak == 0
                    ):
                        save()
                    tick = time.perf_counter()
                if in_epoch == steps_per_epoch:  # a whole epoch done
                    if config.monitor_every and (epoch + 1) % config.monitor_every == 0:
                        run_monitor(epoch + 1)
                    due = config.save_every_epochs and (epoch + 1) % config.save_every_epochs == 0
                    if position.step < end and due and position.nan_streak == 0:
                        save()
            if (
                position.nan_streak == 0
                and not (runstate.checkpoint_root(out) / f"step_{position.step:08d}").is_dir()
            ):
                save()
            if accelerator.is_main_process:
                result.backbone = export_backbone(moco.backbone, config, position.data)
                result.timm_call = timm_call(result.backbone)
                if pipeline.indexed:
                    report_corrupt(pipeline.dataset)
            accelerator.wait_for_everyone()
        finally:
            result.step, result.nan_skipped = position.step, position.nan_skipped
            log.close()
            if config.log_with != "none":
                accelerator.end_training()
    return result
