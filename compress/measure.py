"""What a deployment table compares, measured the same way for every variant: top-1 on the validation
split, agreement of top-1 predictions with the original, parameters, MACs, file size, and latency at
batch 1 and 32 (median of repeats, same process and threads) with the throughput it implies."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

Predict = Callable[[np.ndarray], np.ndarray]  # normalized images (B, 3, H, W) float32 -> logits


def torch_predict(model: nn.Module) -> Predict:
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
    fp32_onnx_bytes: int | None = None  # INT8 variants: the size of the fp32 ONNX they were quantized from

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
