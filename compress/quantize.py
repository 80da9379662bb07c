"""INT8 deployment through ONNX Runtime: export to ONNX, check the fp32 export against torch, then
quantize dynamically (MatMul/Gemm weights, activations quantized on the fly: ViTs) or statically (QDQ,
per-channel weights, activation ranges calibrated on images: CNNs).

torch.ao.quantization (eager/FX) is deprecated and PT2E moved to torchao, so the default path does not
build on them. Without VNNI (AVX2-only x86) the u8 x s8 products can saturate: weights use 7 bits
(``reduce_range``), as ONNX Runtime advises.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfsup.errors import UsageError
from selfsup.files import atomic_write_bytes

MODES = ("int8-dynamic", "int8-static")


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX: the int8 dot-product instructions ONNX Runtime uses."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """The model as ONNX (opset 18, dynamic batch), written atomically; input ``images``, output ``logits``."""
    path = Path(path)
    model = model.eval()
    if len(example) < 2:  # torch.export specializes a batch of 1: trace with 2 for a dynamic batch
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=18,
            dynamo=True,
            verbose=False,
        )
    buffer = io.BytesIO()
    program.save(buffer)  # one file: the weights embedded
    atomic_write_bytes(path, buffer.getvalue())
    return path


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(sess, images: np.ndarray) -> np.ndarray:
    return sess.run(["logits"], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


def check_export(model: nn.Module, path: str | Path, images: torch.Tensor, atol: float = 1e-4) -> float:
    """Largest |torch - onnxruntime| logit difference of the fp32 export; refuse above ``atol``."""
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    got = run_onnx(session(path), images.numpy())
    diff = float(np.abs(expected - got).max())
    if diff > atol:
        raise RuntimeError(
            f"the fp32 ONNX export differs from torch by {diff:.2e} (> {atol:.0e}): not quantizing it"
        )
    return diff


class _Calibration:
    """ONNX Runtime's calibration reader over a fixed list of batches (the same every run)."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = iter([{"images": np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # pragma: no cover - not used by MinMax
        pass


def quantize(
    src: str | Path, dst: str | Path, mode: str, calibration: list[np.ndarray] | None = None
) -> Path:
    """``src`` (fp32 ONNX) -> ``dst`` (INT8 ONNX). ``int8-static`` needs ``calibration`` batches."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise UsageError(f"unknown quantization mode {mode!r}; expected one of: {', '.join(MODES)}")
    src, dst = Path(src), Path(dst)
    prepared = dst.with_name(dst.stem + ".prepared.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # shapes + graph clean-up
    reduce_range = not cpu_has_vnni()
    if mode == "int8-dynamic":
        quantize_dynamic(
            str(prepared),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=False,
            reduce_range=reduce_range,
        )
    else:
        if not calibration:
            raise UsageError("int8-static needs calibration images: pass --calibrate N (e.g. 256)")
        quantize_static(
            str(prepared),
            str(dst),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    prepared.unlink(missing_ok=True)
    return dst
