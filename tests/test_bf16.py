"""bf16 on any CPU: every training stage trains in bf16 and hands on plain fp32.

bf16 autocast runs on every CPU (natively with AVX-512 BF16/AMX, emulated on AVX2), so these use
micro models (thousands of parameters, 16-32 px) that stay fast where it is emulated. What they
check: nothing a stage saves, exports or passes on carries bf16 (checkpoint tensors, ONNX graph
types, PT2E programs), the run records the precision it trained in, 2 processes = 1 process within
bf16's tolerance, and a resume in bf16 is exact.
"""

import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import REPO, TINY_PRETRAIN, save_model, two_gloo_processes
from safetensors.torch import load_file

from selfsup.compress.pipeline import run as compress
from selfsup.compress.settings import CompressConfig
from selfsup.config import load_config
from selfsup.eval.probe import ProbeConfig, run_probe
from selfsup.finetune.settings import FinetuneConfig
from selfsup.finetune.train import train as finetune
from selfsup.models import BackboneSpec
from selfsup.ssl.settings import PretrainConfig
from selfsup.ssl.train import train as pretrain

BF16 = "mixed_precision=bf16"
PRETRAIN = [*TINY_PRETRAIN, "resume=never", "monitor_every=0", BF16]
MICRO = BackboneSpec(
    "moco_vit_tiny", 16, 4, pos_embed="learned", extra={"depth": 1, "embed_dim": 16, "num_heads": 2}
)


def fp32_only(path) -> None:
    tensors = load_file(str(path))
    assert tensors and {str(t.dtype) for t in tensors.values() if t.is_floating_point()} == {
        "torch.float32"
    }, path


def losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "event" not in r]


def save_micro(folder, num_classes: int = 0, stage: str = "pretrain"):
    classes = [str(i) for i in range(num_classes)]
    return save_model(folder, MICRO, classes, stage, mean=(0.3, 0.3, 0.3), std=(0.35, 0.35, 0.35))


def test_pretraining_in_bf16_exports_fp32_and_records_bf16(tmp_path):
    result = pretrain(load_config(PretrainConfig, None, [*PRETRAIN, "max_steps=2", f"out={tmp_path}"]))
    assert result.status == "finished" and np.isfinite(result.last_loss)
    fp32_only(result.backbone)
    assert json.loads(result.backbone.with_suffix(".json").read_text())["config"]["mixed_precision"] == "bf16"


def test_pretraining_resumed_in_bf16_equals_the_uninterrupted_run(tmp_path):
    straight = pretrain(
        load_config(PretrainConfig, None, [*PRETRAIN, "max_steps=4", f"out={tmp_path / 'a'}"])
    )
    pretrain(load_config(PretrainConfig, None, [*PRETRAIN, "max_steps=2", f"out={tmp_path / 'b'}"]))
    resumed = pretrain(
        load_config(PretrainConfig, None, [*PRETRAIN, "max_steps=4", "resume=auto", f"out={tmp_path / 'b'}"])
    )
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 4
    a, b = load_file(str(straight.backbone)), load_file(str(resumed.backbone))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_gloo_processes_in_bf16_match_one_process_within_bf16_rounding(tmp_path):
    args = [*PRETRAIN, "max_steps=3", "save_every_epochs=0"]
    pretrain(load_config(PretrainConfig, None, [*args, f"out={tmp_path / 'one'}"]))
    run = two_gloo_processes(
        REPO / "ssl" / "pretrain.py", *args, f"out={tmp_path / 'two'}", timeout=120, precision="bf16"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [0, 1, 2]
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); each process multiplies half the
    # batch, so sums round in another order: the losses agree to 1%, not to fp32's 1e-4
    for (_, l1), (_, l2) in zip(one, two):
        assert l1 == pytest.approx(l2, rel=1e-2)
    assert "precision: bf16" in run.stderr


def test_fine_tuning_in_bf16_exports_fp32_classifiers(tmp_path):
    backbone = save_micro(tmp_path / "pretrain")
    args = [
        "dataset=synthetic", "synthetic_size=32", "batch_size=8", "epochs=2", "optim.warmup_epochs=1", "max_steps=2", "ema_decay=0.9",
        "num_workers=0", "threads=1", "progress_bar=false", "resume=never", f"checkpoint={backbone}",
        BF16, f"out={tmp_path / 'ft'}",
    ]  # fmt: skip
    result = finetune(load_config(FinetuneConfig, None, args))
    assert result.status == "finished"
    for name in ("best", "last", "ema"):
        fp32_only(tmp_path / "ft" / f"{name}.safetensors")
    assert json.loads((tmp_path / "ft" / "last.json").read_text())["config"]["mixed_precision"] == "bf16"


def _compress_args(checkpoint, out, quantize):
    return [
        f"checkpoint={checkpoint}", "dataset=digits", "prune=l1", "target_macs=0.6", "recover_epochs=1",
        "max_steps=2", "batch_size=16", "teacher=self", f"quantize={quantize}", "calibrate=32", "threads=1",
        "progress_bar=false", "measure_memory=false", "latency_repeats=1", "latency_batches=[1]", "limit=64",
        BF16, f"out={out}",
    ]  # fmt: skip


BFLOAT16 = onnx.TensorProto.BFLOAT16


def onnx_bf16_tensors(path) -> list[str]:
    """Names of everything in an ONNX graph typed bf16 or cast to it."""
    graph = onnx.load(str(path)).graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    found = [v.name for v in typed if v.type.tensor_type.elem_type == BFLOAT16]
    found += [t.name for t in graph.initializer if t.data_type == BFLOAT16]
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == BFLOAT16 for a in node.attribute):
            found.append(node.name)
    return found


def test_compression_recovered_in_bf16_exports_an_fp32_onnx_and_int8(tmp_path):
    checkpoint = save_micro(tmp_path / "classifier", num_classes=10, stage="finetune")
    out = tmp_path / "out"
    result = compress(load_config(CompressConfig, None, _compress_args(checkpoint, out, "int8-dynamic")))
    assert result.status == "finished" and result.step == 2
    fp32_only(out / "recovered.safetensors")
    for stem in ("original", "pruned"):
        assert (out / f"{stem}.int8.onnx").is_file()
        assert onnx_bf16_tensors(out / f"{stem}.fp32.onnx") == [], stem
    names = [v["name"] for v in json.loads((out / "metrics.json").read_text())["variants"]]
    assert names[-1] == "pruned + recovered + INT8"
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "bf16"


def test_the_onnx_check_finds_bf16_where_there_is_some(tmp_path):
    model = torch.nn.Linear(4, 2)

    class Cast(torch.nn.Module):
        def forward(self, x):
            return model(x.to(torch.bfloat16).float())

    torch.onnx.export(Cast(), (torch.randn(2, 4),), str(tmp_path / "m.onnx"), dynamo=True)
    assert onnx_bf16_tensors(tmp_path / "m.onnx")


def test_compression_recovered_in_bf16_quantizes_with_pt2e(tmp_path):
    pytest.importorskip("torchao")
    checkpoint = save_micro(tmp_path / "classifier", num_classes=10, stage="finetune")
    out = tmp_path / "out"
    result = compress(load_config(CompressConfig, None, _compress_args(checkpoint, out, "int8-pt2e")))
    assert result.status == "finished"
    program = torch.export.load(out / "pruned.int8.pt2")
    dtypes = {str(t.dtype) for t in program.state_dict.values()}
    assert "torch.bfloat16" not in dtypes and "torch.int8" in dtypes
    assert not any("bfloat16" in str(n.meta.get("val", "")) for n in program.graph.nodes)


def test_the_probe_extracts_bf16_features_and_records_the_precision(tmp_path):
    backbone = save_micro(tmp_path / "pretrain")
    config = ProbeConfig(
        dataset="synthetic", checkpoints=[str(backbone)], methods=["knn"], ks=[5], batch_size=16
    )
    config.num_workers, config.no_cache, config.out, config.mixed_precision = (
        0,
        True,
        str(tmp_path / "p"),
        "bf16",
    )
    config.data.synthetic_size = 32
    metrics = run_probe(config)
    assert metrics["mixed_precision"] == "bf16" and metrics["models"][0]["knn"]
