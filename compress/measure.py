"""What a deployment table compares, measured the same way for every variant: top-1 on the validation
split, agreement of top-1 predictions with the original, parameters, MACs, file size, and latency at
batch 1 and 32 (median of repeats, same process and threads) with the throughput it implies."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

Predict = Callable[[np.ndarray], np.ndarray]  # normalized images (B, 3, H, W) float32 -> logits


def torch_predict(model: nn.Module, set_eval: bool = True) -> Predict:
    """``set_eval=False`` for exported programs, which are in inference form already (and refuse .eval())."""
    if set_eval:
        model = model.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    return predict


def onnx_predict(sess) -> Predict:
    from selfsup.compress.quantize import run_onnx

    return lambda images: run_onnx(sess, images)


@dataclass
class Variant:
    name: str
    top1: float
    agreement: float | None  # share (%) of top-1 predictions equal to the original's
    params: int | None
    macs: int | None
    file_bytes: int
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch -> median ms per batch
    note: str = ""
    fp32_bytes: int | None = None  # INT8 variants: the fp32 file in the same container (ONNX or .pt2)
    peak_mib: float | None = None  # peak memory of one inference at the largest latency batch (see below)

    def throughput(self, batch: int) -> float:
        return 1000.0 * batch / self.latency_ms[batch]


def predictions(predict: Predict, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([predict(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def latency_ms(predict: Predict, images: np.ndarray, batch: int, repeats: int) -> float:
    """Median wall time of one batch over ``repeats`` runs after one warm-up."""
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32)
    predict(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


# Run in a fresh process per variant: one process running every variant cannot tell their peaks apart.
_PEAK_SCRIPT = """
import json, os, resource, sys
import numpy as np
kind, path, shape, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
import torch
torch.set_num_threads(threads)
from selfsup.checkpoint import load_backbone, read_meta
from selfsup.compress.quantize import run_onnx, session
import onnxruntime
if kind == "pt2":
    import torchao.quantization.pt2e.quantize_pt2e  # registers the quantized ops the program calls
torch.nn.functional.layer_norm(torch.ones(64, 64) @ torch.ones(64, 64), (64,))  # the runtime's own start-up
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
before = rss()
if kind == "pt2":
    with torch.no_grad():
        torch.export.load(path).module()(torch.from_numpy(x))
elif kind == "torch":
    model, _ = load_backbone(path, num_classes=read_meta(path).num_classes, drop_path_rate=0.0)
    with torch.no_grad():
        model.eval()(torch.from_numpy(x))
else:
    run_onnx(session(path, threads), x)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(max(peak - before, 0) / 2**20))
"""


def peak_memory_mib(kind: str, path, shape: tuple[int, ...], threads: int) -> float | None:
    """Peak resident memory (MiB) a fresh process adds, after its imports and a first torch op, to load the variant at
    ``path`` (``kind``: torch checkpoint or onnx) and run one batch of ``shape``; None where the
    platform has no /proc (not Linux) or the child fails."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, kind, str(path), json.dumps(list(shape)), str(threads)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None
