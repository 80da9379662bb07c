"""Shared fixtures: the repository root and the CIFAR-10 subset from ../shared (skipped when absent)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_TAR = REPO.parent / "shared" / "data" / "cifar10-20k.tar.gz"
SHARED_SHA256 = "722f0d9a64512df0c87ecc79d1daba7eb097184265ebb9b051600c27ebcd56b9"

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A pretraining run small enough for a test: 4 steps per epoch on 64 synthetic images, seconds on a CPU.
TINY_PRETRAIN = [
    "dataset=synthetic",
    "synthetic_size=64",
    "batch_size=16",
    "epochs=3",
    "seed=3",
    "model.arch=moco_vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "model.extra.depth=1",
    "model.extra.embed_dim=32",
    "model.extra.num_heads=2",
    "moco.dim=16",
    "moco.mlp_dim=32",
    "optim.base_lr=0.02",
    "optim.warmup_epochs=1",
    "num_workers=0",
    "threads=1",
    "progress_bar=false",
    "augment.blur_sigmas=[0.1, 0.5]",
]


def free_port() -> int:
    """A TCP port nobody listens on now (for `accelerate launch --main_process_port`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_gloo_processes(
    script: Path, *args: str, timeout: int, precision: str = "no"
) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 script args``: two gloo processes on the CPU,
    one thread each (``--cpu`` would silently start one). A test comparing them with one process
    pins ``mixed_precision=`` on both sides (``precision`` is the launcher's)."""
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        precision,
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launch, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="session")
def cifar10_subset(tmp_path_factory) -> Path:
    """../shared/data/cifar10-20k.tar.gz extracted once per session; the test is skipped without it."""
    if not SHARED_TAR.is_file():
        pytest.skip(f"{SHARED_TAR} is absent (only the project's machines have ../shared)")
    digest = hashlib.sha256(SHARED_TAR.read_bytes()).hexdigest()
    assert digest == SHARED_SHA256, f"{SHARED_TAR} has an unexpected SHA-256"
    target = tmp_path_factory.mktemp("shared")
    with tarfile.open(SHARED_TAR) as tar:
        try:
            tar.extractall(target, filter="data")
        except TypeError:  # Python < 3.10.12 has no extraction filters; the archive is checked above
            tar.extractall(target)
    return target / "cifar10-20k"


def refused(capsys, main, *args) -> str:
    """Run a command's ``main`` on bad input: it must exit 2 with one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def save_model(
    folder: Path, spec, classes: list[str], stage: str, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
):
    """A randomly initialised backbone (``classes`` empty) or classifier of ``spec`` in the project format."""
    from selfsup.checkpoint import CheckpointMeta, save_checkpoint
    from selfsup.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(spec, len(classes))
    meta = CheckpointMeta(
        backbone=spec.to_dict(),
        img_size=spec.img_size,
        mean=tuple(mean),
        std=tuple(std),
        stage=stage,
        num_classes=len(classes),
        class_names=list(classes),
    )
    return save_checkpoint(folder / "classifier", model.state_dict(), meta, model)
