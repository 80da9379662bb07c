"""Disk faults in every stage (issue 19, section 3): no space, a file-size limit, a quota, a
read-only disk, wherever a file is written (accelerate's optimizer.bin, safetensors, the run log,
figures, reports, ONNX files, the feature cache). Each command ends with one ``error:`` line naming
the file and what to do, exit code 2, no traceback; the last good checkpoint stays complete and
resumes; no torn or temporary file is left behind.

The platform has no tmpfs to fill, so faults are real where the kernel can make them in-process (a
file-size limit, RLIMIT_FSIZE, gives a real EFBIG to any writer; a write to /dev/full a real
ENOSPC) and injected at the write call otherwise (``savefig``, ``fsync``)."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

import accelerate.checkpointing
import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN, save_model
from matplotlib.figure import Figure

from selfsup import plots, runstate
from selfsup.errors import DiskError, describe_os_error, is_user_os_error
from selfsup.files import append_whole, atomic_path, disk_errors_at
from selfsup.models import BackboneSpec

# --- fault injection -------------------------------------------------------------------------


@contextmanager
def file_size_limit(nbytes: int):
    """A real EFBIG for every write past ``nbytes`` in this process (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextmanager
def full_device(path: Path):
    """``path`` made a link to /dev/full: a writer that opens it meets a real ENOSPC."""
    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("/dev/full is not the full device here")
    path.symlink_to("/dev/full")
    yield


FAULTS = {"EFBIG": lambda path: file_size_limit(256), "ENOSPC": full_device}


def fault_in_checkpoint(monkeypatch, name: str, fault: str, after: int = 0) -> None:
    """The fault strikes when accelerate's ``save_state`` writes ``name`` (optimizer.bin: torch's
    zip writer, which loses the errno; model.safetensors: safetensors), after ``after`` saves."""
    original = accelerate.checkpointing.save
    saves = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if Path(f).name != name:
            return original(obj, f, *args, **kwargs)
        saves["n"] += 1
        if saves["n"] <= after:
            return original(obj, f, *args, **kwargs)
        with FAULTS[fault](Path(f)):
            return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)


def torn_savefig(monkeypatch, name: str, code: int = errno.ENOSPC) -> None:
    """``savefig`` of ``name`` writes half an image, then fails, as on a disk that filled up."""
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        original(self, fname, *args, **kwargs)
        if Path(fname).name == name or Path(fname).name.startswith(f".{name}."):
            with open(fname, "r+b") as f:
                f.truncate(f.seek(0, os.SEEK_END) // 2)
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Figure, "savefig", savefig)


def failing_fsync(monkeypatch, name: str, code: int) -> None:
    """``fsync`` of the file being written as ``name`` fails with ``code`` (delayed write errors of
    NFS and quotas surface there)."""
    original = os.fsync

    def fsync(fd):
        written = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if written == name or written.startswith(f".{name}."):
            raise OSError(code, os.strerror(code))
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# --- what every refusal must look like ----------------------------------------------------------


def disk_refusal(capsys, main, argv: list[str]) -> str:
    """Run a command that meets a disk fault: exit 2, exactly one ``error:`` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == lines[0]  # the last word
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files (``.NAME.XXXX.tmp.EXT``) and checkpoints in flight (``.tmp-step_N``)."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name)


# --- the helpers themselves -----------------------------------------------------------------------


def test_a_failed_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(DiskError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")  # a Python write: no file named
    assert info.value.filename == str(target) and "no space left" in describe_os_error(info.value)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_writers_that_hide_the_errno_are_disk_errors_naming_the_file(tmp_path):
    """torch's zip writer says "unexpected pos", numpy's tofile "N requested and M written"."""
    for name, write in [
        ("a.pt", lambda p: torch.save({"w": torch.zeros(10_000)}, p)),
        ("b.npy", lambda p: np.save(p, np.zeros(10_000))),
    ]:
        with pytest.raises(DiskError) as info, file_size_limit(256), disk_errors_at(tmp_path / name):
            write(tmp_path / name)
        assert is_user_os_error(info.value) and info.value.filename == str(tmp_path / name)
        assert "file-size limit 256 bytes" in describe_os_error(info.value)


def test_a_figure_that_cannot_be_written_leaves_no_torn_image(tmp_path, monkeypatch):
    figure = tmp_path / "figures" / "curve.png"
    plots.plot_curves({"a": {1: 1.0, 2: 2.0}}, "x", "y", figure)
    before = figure.read_bytes()
    torn_savefig(monkeypatch, "curve.png")
    with pytest.raises(DiskError, match="No space|no space"):
        plots.plot_curves({"a": {1: 2.0, 2: 1.0}}, "x", "y", figure)
    assert figure.read_bytes() == before and leftovers(tmp_path) == []


def test_a_failed_log_line_is_undone_whole(tmp_path):

    log = tmp_path / "log.jsonl"
    with log.open("ab", buffering=0) as f:
        append_whole(f, b'{"step": 0}\n', log)
        with pytest.raises(DiskError), file_size_limit(20):
            append_whole(f, b'{"step": 1, "loss": 0.5}\n', log)
    assert log.read_bytes() == b'{"step": 0}\n'


# --- pretrain ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretraining run stopped at step 2 with its checkpoint (copied by each test)."""
    from selfsup.ssl.cli import main

    out = tmp_path_factory.mktemp("pretrain") / "run"
    main([*TINY_PRETRAIN, f"out={out}", "max_steps=2", "save_every_steps=1", "keep_checkpoints=1"])
    return out


def _pretrain(run: Path, *extra: str) -> list[str]:
    return [*TINY_PRETRAIN, f"out={run}", "save_every_steps=1", "keep_checkpoints=1", *extra]


@pytest.mark.parametrize(
    "name, fault",
    [("optimizer.bin", "ENOSPC"), ("optimizer.bin", "EFBIG"), ("model.safetensors", "EFBIG")],
)
def test_pretrain_a_fault_in_a_checkpoint_keeps_the_last_one(
    pretrained, tmp_path, monkeypatch, capsys, name, fault
):
    from selfsup.ssl.cli import main

    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    fault_in_checkpoint(monkeypatch, name, fault)
    line = disk_refusal(capsys, main, _pretrain(run, "max_steps=4"))
    assert ".tmp-step_00000003" in line and "step_00000002 is intact" in line, line  # the file, or its folder
    assert "resume=auto" in line and ("file too large" in line or "does not say why" in line)
    assert [p.name for p in runstate.complete_checkpoints(run)] == ["step_00000002"]
    assert leftovers(run) == []
    monkeypatch.undo()
    main(_pretrain(run, "max_steps=3"))  # the kept checkpoint resumes
    assert [p.name for p in runstate.complete_checkpoints(run)] == ["step_00000003"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_pretrain_a_full_disk_at_the_log_or_the_export_is_one_line(pretrained, tmp_path, monkeypatch, capsys):
    from selfsup.ssl.cli import main

    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    import selfsup.runlog

    original = selfsup.runlog.append_whole

    def append_whole(file, data, path):
        with file_size_limit(file.tell() + len(data) // 2):  # the next log line does not fit
            original(file, data, path)

    monkeypatch.setattr(selfsup.runlog, "append_whole", append_whole)
    line = disk_refusal(capsys, main, _pretrain(run, "max_steps=3", "save_every_steps=0"))
    assert f"{run / 'log.jsonl'}" in line and "step_00000002 is intact" in line
    assert all(json.loads(row) for row in (run / "log.jsonl").read_text().splitlines())  # no torn line
    monkeypatch.undo()
    failing_fsync(monkeypatch, "backbone.safetensors", errno.EROFS)
    line = disk_refusal(capsys, main, _pretrain(run, "max_steps=3"))
    assert "read-only file system" in line and f"{run / 'backbone.safetensors'}" in line
    assert "step_00000003 is intact" in line and leftovers(run) == []


# --- fine-tuning --------------------------------------------------------------------------------

SPEC = BackboneSpec(
    "moco_vit_tiny", 32, 8, pos_embed="learned", extra={"depth": 1, "embed_dim": 32, "num_heads": 2}
)


def test_finetune_faults_at_a_figure_and_a_checkpoint_keep_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from selfsup.finetune.cli import main

    backbone = save_model(tmp_path, SPEC, [], "pretrain")
    run = tmp_path / "run"
    args = [
        "dataset=synthetic", "synthetic_size=32", "batch_size=16", "epochs=2", "optim.warmup_epochs=0.5",
        f"checkpoint={backbone}", "num_workers=0", "threads=1", "progress_bar=false", "save_every_steps=1",
        "keep_checkpoints=1", f"out={run}",
    ]  # fmt: skip
    torn_savefig(monkeypatch, "confusion.png")
    line = disk_refusal(capsys, main, [*args, "max_steps=2"])
    assert f"{run / 'figures' / 'confusion.png'}" in line and "step_00000002 is intact" in line
    assert not (run / "figures" / "confusion.png").exists() and leftovers(run) == []
    monkeypatch.undo()
    fault_in_checkpoint(monkeypatch, "optimizer.bin", "EFBIG")
    line = disk_refusal(capsys, main, [*args, "max_steps=3"])
    assert ".tmp-step_00000003" in line and "step_00000002 is intact" in line
    assert [p.name for p in runstate.complete_checkpoints(run)] == ["step_00000002"] and leftovers(run) == []
    monkeypatch.undo()
    main([*args, "max_steps=3"])  # resumes from step 2 and writes the report
    assert (run / "figures" / "confusion.png").is_file() and (run / "report.html").is_file()


# --- test-time adaptation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tta_files(tmp_path_factory):
    from selfsup.tta.generate import generate

    root = tmp_path_factory.mktemp("tta")
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    generate(images, np.arange(8) % 3, root / "set", ["contrast"], [1], seed=0, source="test")
    return save_model(root, SPEC, ["c0", "c1", "c2"], "finetune"), root / "set"


@pytest.mark.parametrize("where", ["figure", "results"])
def test_tta_a_full_disk_at_a_figure_or_the_results_is_one_line(
    tta_files, tmp_path, monkeypatch, capsys, where
):
    from selfsup.tta.cli import main

    checkpoint, folder = tta_files
    out = tmp_path / "out"
    if where == "figure":
        torn_savefig(monkeypatch, "errors.png")
    else:
        failing_fsync(monkeypatch, "results.json", errno.EDQUOT)
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        str(folder),
        "--method",
        "source",
        "--out",
        str(out),
    ]
    line = disk_refusal(capsys, main, [*argv, "--batch-size", "4", "corruptions=contrast", "severity=1"])
    written = out / "figures" / "errors.png" if where == "figure" else out / "results.json"
    assert f"{written}" in line and "then run the command again" in line
    assert not written.exists() and leftovers(out) == []


def test_tta_generate_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from selfsup.tta.generate import main

    failing_fsync(monkeypatch, "contrast.npy", errno.ENOSPC)
    out = tmp_path / "set"
    argv = ["--dataset", "synthetic", "--out", str(out), "--corruptions", "contrast", "--severities", "1"]
    line = disk_refusal(capsys, main, [*argv, "--limit", "4"])
    assert "no space left" in line and f"{out / 'contrast.npy'}" in line and leftovers(out) == []


# --- compression ----------------------------------------------------------------------------------

COMPRESS_VIT = BackboneSpec(
    "moco_vit_tiny", 32, 8, pos_embed="learned", extra={"depth": 2, "embed_dim": 64, "num_heads": 4}
)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return save_model(
        tmp_path_factory.mktemp("compress"), COMPRESS_VIT, [str(i) for i in range(10)], "finetune"
    )


def _compress(classifier: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint", str(classifier), "--dataset", "digits", "--out", str(out), "limit=16",
        "measure_memory=false", "latency_repeats=1", "latency_batches=[1]", "threads=1", "progress_bar=false",
        "mixed_precision=no", *extra,
    ]  # fmt: skip


def _matmul_onnx(path: Path) -> Path:
    """A one-MatMul fp32 ONNX model (64 KiB of weights), made without a slow torch export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["images", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 128])],
        [weight],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_compress_a_file_size_limit_at_the_int8_model_leaves_nothing_torn(tmp_path, monkeypatch):
    """ONNX Runtime writes the INT8 model to a file name: given one beside it, renamed when whole."""
    import onnx

    from selfsup.compress.quantize import quantize

    fp32 = _matmul_onnx(tmp_path / "original.fp32.onnx")
    original = onnx.save_model

    def save_model(proto, f, *args, **kwargs):
        if ".int8.onnx" not in Path(f).name:
            return original(proto, f, *args, **kwargs)
        with file_size_limit(4096):  # the INT8 weights alone are 16 KiB
            return original(proto, f, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save_model)
    with pytest.raises(DiskError) as info:
        quantize(fp32, tmp_path / "original.int8.onnx", "int8-dynamic")
    assert "file too large" in describe_os_error(info.value) and info.value.filename == str(
        tmp_path / "original.int8.onnx"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original.fp32.onnx"]  # no torn or scratch file
    monkeypatch.undo()
    assert quantize(fp32, tmp_path / "original.int8.onnx", "int8-dynamic").stat().st_size > 16384


def test_compress_a_fault_in_recovery_keeps_its_checkpoint_and_at_the_report_writes_nothing_torn(
    classifier, tmp_path, monkeypatch, capsys
):
    from selfsup.compress.cli import main

    out = tmp_path / "out"
    argv = _compress(
        classifier, out, "--prune", "l1", "--target-macs", "0.5", "--recover-epochs", "1", "batch_size=16",
        "save_every_steps=1", "keep_checkpoints=1",
    )  # fmt: skip
    fault_in_checkpoint(monkeypatch, "optimizer.bin", "ENOSPC", after=1)
    line = disk_refusal(capsys, main, [*argv, "max_steps=2"])
    assert (
        f"{out / 'recovery' / 'checkpoints' / '.tmp-step_00000002'}" in line
        and "run the command again" in line
    )
    recovery = out / "recovery"
    assert [p.name for p in runstate.complete_checkpoints(recovery)] == ["step_00000001"]
    assert leftovers(out) == []
    monkeypatch.undo()
    failing_fsync(monkeypatch, "metrics.json", errno.ENOSPC)
    line = disk_refusal(capsys, main, [*argv, "max_steps=2"])  # resumes recovery, then the report fails
    assert f"{out / 'metrics.json'}" in line and not (out / "metrics.json").exists()
    assert [p.name for p in runstate.complete_checkpoints(recovery)] == ["step_00000002"]
    assert (out / "recovered.safetensors").is_file() and leftovers(out) == []


# --- probe ----------------------------------------------------------------------------------------

PROBE = ["--dataset", "synthetic", "--num-workers", "0", "--batch-size", "64", "data.synthetic_size=64"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("probe"), SPEC, [], "pretrain")


@pytest.mark.parametrize("written", ["knn_vs_k.png", "metrics.json"])
def test_probe_a_fault_at_a_figure_or_the_metrics_is_one_line(
    backbone, tmp_path, monkeypatch, capsys, written
):
    from selfsup.eval.cli import main

    if written.endswith(".png"):
        torn_savefig(monkeypatch, written, errno.EDQUOT)
    else:
        failing_fsync(monkeypatch, written, errno.EROFS)
    out = tmp_path / "probe"
    line = disk_refusal(
        capsys, main, ["--checkpoint", str(backbone), "--out", str(out), "--no-cache", *PROBE]
    )
    assert written in line and str(out) in line and "then run the command again" in line
    assert not list(out.rglob(written)) and leftovers(out) == []


def test_probe_a_full_cache_disk_is_a_warning_and_the_report_is_written(
    backbone, tmp_path, monkeypatch, capsys
):
    """The feature cache only saves time: the probe goes on without it."""
    from selfsup.eval.cli import main

    cache = tmp_path / "cache"
    original = np.save

    def save(file, array, *args, **kwargs):
        if Path(file).is_relative_to(cache):
            with file_size_limit(1024):  # numpy's tofile: "N requested and M written"
                return original(file, array, *args, **kwargs)
        return original(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    code = main(
        ["--checkpoint", str(backbone), "--out", str(tmp_path / "p"), "--cache-dir", str(cache), *PROBE]
    )
    err = capsys.readouterr().err
    assert code == 0 and "warning: feature cache not written" in err and "Traceback" not in err
    assert (tmp_path / "p" / "report.html").is_file() and leftovers(cache) == []
