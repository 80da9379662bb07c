"""No code runs from a data file: a WebDataset shard's pickle members and a checkpoint's pickles are
never unpickled; fine-tuning's EMA is checkpointed as safetensors and resumes exactly."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfsup.config import load_config
from selfsup.finetune import cli
from selfsup.finetune.settings import FinetuneConfig
from selfsup.finetune.train import train
from selfsup.runstate import STATE_FILE, complete_checkpoints
from selfsup.shards import shard_dataset

# a tiny fine-tuning of a fresh classifier (no pretraining checkpoint), with an EMA
TINY_EMA = [
    "dataset=synthetic",
    "synthetic_size=64",
    "batch_size=16",
    "epochs=2",
    "seed=3",
    "model=vit_tiny_patch16_224",
    "model_kwargs.depth=1",
    "img_size=32",
    "patch_size=8",
    "optim.warmup_epochs=1",
    "ema_decay=0.9",
    "num_workers=0",
    "threads=1",
    "progress_bar=false",
    "mixed_precision=no",
]


class Planted:
    """A pickle that creates ``marker`` when unpickled: what a crafted file would do with worse code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker) -> bytes:
    return pickle.dumps(Planted(marker))


def test_the_planted_pickle_runs_when_unpickled(tmp_path):
    """The payload is live: the tests below mean something."""
    pickle.loads(payload(tmp_path / "ran")).close()
    assert (tmp_path / "ran").exists()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def test_a_shards_pickle_members_are_never_decoded(tmp_path):
    marker = tmp_path / "ran"
    image = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(image, format="JPEG")
    with tarfile.open(tmp_path / "shard-0000.tar", "w") as tar:
        _add(tar, "s000.jpg", image.getvalue())
        _add(tar, "s000.cls", b"2")
        for ext in ("pyd", "pkl", "pickle", "pth"):
            _add(tar, f"s000.{ext}", payload(marker))
    (sample,) = list(shard_dataset([str(tmp_path / "shard-0000.tar")]))
    picture, label = sample
    assert not marker.exists()
    assert label == 2 and picture.mode == "RGB" and picture.size == (8, 8)


def finetune_config(out, *extra):
    return load_config(FinetuneConfig, None, [*TINY_EMA, f"out={out}", *extra])


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run stopped by max_steps after 2 of 8 steps: its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("ema") / "run"
    train(finetune_config(out, "max_steps=2"))
    return out


def test_the_ema_is_checkpointed_as_safetensors_and_resumes_exactly(two_steps, tmp_path):
    (checkpoint,) = complete_checkpoints(two_steps)
    assert (checkpoint / "ema.safetensors").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    straight = tmp_path / "straight"
    train(finetune_config(straight, "max_steps=4"))
    resumed = tmp_path / "resumed"  # continues the checkpoint in a folder of its own
    train(finetune_config(resumed, "max_steps=4", f"resume={checkpoint}"))
    for name in ("ema.safetensors", "model.safetensors"):
        a = load_file(complete_checkpoints(straight)[-1] / name)
        b = load_file(complete_checkpoints(resumed)[-1] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _plant(checkpoint, name: str, data: bytes) -> None:
    """Replace or add ``name`` as a crafted folder would, its size recorded (the folder looks complete)."""
    (checkpoint / name).write_bytes(data)
    record = json.loads((checkpoint / STATE_FILE).read_text())
    if name in record["files"]:
        record["files"][name] = len(data)
        (checkpoint / STATE_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_pickle_planted_in_a_checkpoint_is_never_unpickled(capsys, two_steps, tmp_path, name):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (checkpoint,) = complete_checkpoints(two_steps)
    copy = out / "checkpoints" / checkpoint.name
    copy.mkdir()
    for path in checkpoint.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"state": Planted(marker)}, buffer)  # torch's format, as accelerate writes these files
    _plant(copy, name, buffer.getvalue())
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TINY_EMA, f"out={out}", "max_steps=4", "resume=auto"])
    assert not marker.exists()
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    err = errors[0]
    assert str(copy) in err and ("pickled objects" in err or "never writes" in err), err
