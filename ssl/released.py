"""A released MoCo v3 pretraining run as this run's first checkpoint: ``pretrain ... import_run=FILE``.

MoCo v3's ``main_moco.py`` (github.com/facebookresearch/moco-v3) saves ``{'epoch', 'arch',
'state_dict', 'optimizer', 'scaler'}``; :func:`selfsup.weights.read_moco_v3_run` reads it without
unpickling code. Its base and momentum encoders, their projection MLPs and the predictor become
:class:`~selfsup.ssl.builder.MoCoV3`'s (a strict load against the config's model: one line naming the
keys that do not fit), and the loop's own save (:func:`selfsup.runstate.save`) writes the checkpoint
at the step where the file's completed epochs end on this config's data, so ``resume=auto`` continues
it under every check an ordinary run gets (same recipe, same images, file digests).

What the file cannot honestly give is fresh: the optimizer (its moments belong to ``main_moco.py``'s
optimizer, whose parameter groups are not this run's), the gradient scaler and the random states
(from ``seed``). The config and the data identity recorded are this command's: the run continues on
them, and a later resume is checked against them. The file's ``source`` is kept in the run's data
facts, so the backbone the continued run exports names it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from selfsup import runstate
from selfsup.checkpoint import load_state_checked, source_line
from selfsup.config import to_dict
from selfsup.errors import UsageError
from selfsup.loop import on_main, start_process
from selfsup.schedules import warmup_cosine
from selfsup.ssl.builder import build_model
from selfsup.ssl.pipeline import build_pipeline
from selfsup.ssl.schedules import moco_momentum
from selfsup.ssl.settings import PretrainConfig
from selfsup.weights import ReleasedRun, read_moco_v3_run

# Where main_moco.py keeps an encoder's projection MLP: MoCo_ViT replaces the ViT's ``head``,
# MoCo_ResNet the ResNet's ``fc`` (moco/builder.py, ``_build_projector_and_predictor_mlps``).
PROJECTOR_NAMES = ("head.", "fc.")


def run_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``main_moco.py``'s names as :class:`MoCoV3`'s: an encoder's backbone keys go under ``.backbone``,
    its ``head`` (ViT) or ``fc`` (ResNet), the projection MLP, under ``.projector.layers``, the predictor
    under ``predictor.layers``. lightly's ``ProjectionHead`` numbers its Sequential as
    ``moco/builder.py``'s ``_build_mlp`` does (Linear, BatchNorm1d, ReLU per hidden layer; Linear and
    the affine-free BatchNorm1d last; MoCo_ResNet's predictor without it, as
    :func:`~selfsup.ssl.heads.predictor` builds it for a ResNet); timm's ResNets name their layers as
    torchvision's, which main_moco.py wraps."""
    mapped = {}
    for key, value in state.items():
        owner, _, rest = key.partition(".")
        head = next((name for name in PROJECTOR_NAMES if rest.startswith(name)), None)
        if owner == "predictor":
            mapped[f"predictor.layers.{rest}"] = value
        elif head:
            mapped[f"{owner}.projector.layers.{rest[len(head) :]}"] = value
        else:
            mapped[f"{owner}.backbone.{rest}"] = value
    return mapped


def write_run(
    config: PretrainConfig, make_optimizer: Callable[[torch.nn.Module, PretrainConfig], torch.optim.Optimizer]
) -> tuple[Path, int, int]:
    """Collective: ``config.out``'s first checkpoint from ``config.import_run``; returns the checkpoint,
    its step and the run's total steps. Refused (one line, nothing written) for a file of another
    layout or architecture, a folder that already holds checkpoints, or epochs not above the file's."""
    released = read_moco_v3_run(config.import_run)
    if runstate.complete_checkpoints(config.out):
        raise UsageError(
            f"{config.out} already holds a run's checkpoints: continue it with resume=auto and without "
            "import_run, or import into a new out=..."
        )
    model = build_model(config)  # resolves the recipe keys that config.yaml records
    what = f"{config.import_run} (main_moco.py, arch {released.arch!r}) as model.arch={config.model.arch}"
    load_state_checked(model, run_keys(released.state), what)  # every tensor: the seed's init is overwritten
    if released.epoch >= config.epochs:
        raise UsageError(
            f"{config.import_run} completed {released.epoch} epochs, the whole of epochs={config.epochs}: "
            f"set epochs above {released.epoch} to continue it"
        )
    accelerator = start_process(config)  # refusals above come before it claims out and says its precision
    pipeline = build_pipeline(
        config, accelerator.process_index, accelerator.num_processes, accelerator.device
    )
    with contextlib.closing(pipeline):
        data = pipeline.facts() | {"source": released.source}  # kept across resumes, named by the export
        position = runstate.Position(
            step=released.epoch * pipeline.steps_per_epoch,
            data=data,
            config=to_dict(config),
            data_identity=runstate.dataset_identity(pipeline.dataset),
        )
        total = config.epochs * pipeline.steps_per_epoch
    model, _ = accelerator.prepare(model, make_optimizer(model, config))  # a fresh optimizer, saved with it
    folder = runstate.save(accelerator, config.out, position, config.keep_checkpoints)
    on_main(accelerator, lambda: _say(config, released, folder, position.step, total))
    return folder, position.step, total


def _say(config: PretrainConfig, released: ReleasedRun, folder: Path, step: int, total: int) -> None:
    print(
        f"{source_line(released.source)} Wrote {folder}: base and momentum encoders, projector and predictor "
        f"from the file, at epoch {released.epoch} (step {step}/{total}); the optimizer, gradient scaler and "
        "random states are fresh (the file's optimizer state is main_moco.py's optimizer's). Continue with: "
        f"pretrain ... out={config.out} resume=auto",
        file=sys.stderr,
    )
    print(schedule_note(config, released.epoch), file=sys.stderr)


def schedule_note(config: PretrainConfig, epoch: int) -> str:
    """The schedules do not continue the file's: they are this config's, over its ``epochs`` (the file
    does not record the epochs main_moco.py scheduled; a finished run's ended at lr 0, momentum 1)."""
    lr = warmup_cosine(epoch, 1.0, config.optim.warmup_epochs, config.epochs)
    m = moco_momentum(epoch, config.moco.momentum, config.epochs, config.moco.momentum_cosine)
    return (
        f"Note: the lr and momentum schedules are this config's, recomputed over epochs={config.epochs} "
        f"(warm-up {config.optim.warmup_epochs:g}), not the file's: at epoch {epoch} the lr restarts at "
        f"{lr:.3g} x its peak and the momentum at {m:.5g} (a run that finished its own schedule ended at lr 0, "
        "momentum 1)."
    )
