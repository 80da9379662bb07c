"""INT8 deployment through ONNX Runtime: export to ONNX, check the fp32 export against torch, then
quantize dynamically (MatMul/Gemm weights, activations quantized on the fly: ViTs) or statically (QDQ,
per-channel weights, activation ranges calibrated on images: CNNs).

torch.ao.quantization (eager/FX) is deprecated and PT2E moved to torchao, so the default path does not
build on them. Without VNNI (AVX2-only x86) the u8 x s8 products can saturate: weights use 7 bits
(``reduce_range``), as ONNX Runtime advises.

The pure-PyTorch path (``int8-pt2e``) is torchao's PT2E flow: ``torch.export`` with a dynamic batch,
``X86InductorQuantizer`` (static, per-channel weights, calibrated activations), the unused fp32
weights dropped, then ``torch.compile`` with Inductor's freezing lowers the graph to int8 kernels. torchao is optional (``pip install 'selfsup[torchao]'``).
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
from selfsup.files import atomic_path, atomic_write_bytes

MODES = ("int8-dynamic", "int8-static", "int8-pt2e")  # the last: pure PyTorch (torchao), no ONNX


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX: the int8 dot-product instructions ONNX Runtime uses."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def int8_instructions() -> str:
    """The CPU's int8 dot-product instructions, named for the benchmark and report lines."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    found = [name for flag, name in _INT8_FLAGS if flag in flags]
    return ", ".join(found) if found else "none (no VNNI: u8 x s8 with 7-bit weights)"


_INT8_FLAGS = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))


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
    """``src`` (fp32 ONNX) -> ``dst`` (INT8 ONNX), written atomically. ``int8-static`` needs
    ``calibration`` batches."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise UsageError(f"unknown quantization mode {mode!r}; expected one of: {', '.join(MODES)}")
    if mode == "int8-static" and not calibration:
        raise UsageError("int8-static needs calibration images: pass --calibrate N (e.g. 256)")
    with atomic_path(dst) as written:
        prepared = written.with_name(written.name + ".prepared.onnx")  # scratch, beside the output
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # shapes + graph clean-up
            _quantize_onnx(prepared, written, mode, calibration)
        finally:
            prepared.unlink(missing_ok=True)
    return Path(dst)


def _quantize_onnx(src: Path, dst: Path, mode: str, calibration: list[np.ndarray] | None) -> None:
    """ONNX Runtime's dynamic (MatMul/Gemm weights) or static (QDQ, MinMax-calibrated) INT8."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    reduce_range = not cpu_has_vnni()
    if mode == "int8-dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=False,
            reduce_range=reduce_range,
        )
        return
    quantize_static(
        str(src),
        str(dst),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def quantize_pt2e(
    model: nn.Module, example: torch.Tensor, calibration: list[np.ndarray]
) -> torch.export.ExportedProgram:
    """torchao PT2E static INT8 for x86 (X86InductorQuantizer), calibrated on ``calibration``; returns
    the quantized program (``.module()`` runs it eagerly; ``torch.compile`` of that runs int8 kernels)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise UsageError(
            "int8-pt2e needs torchao: pip install 'selfsup[torchao]' (or use int8-dynamic)"
        ) from None
    if not calibration:
        raise UsageError("int8-pt2e needs calibration images: pass --calibrate N (e.g. 256)")
    if len(example) < 2:  # a batch of 1 would be specialized: trace with 2 for a dynamic batch
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in calibration:
                prepared(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        converted = convert_pt2e(prepared)  # int8 weights folded in as new constants
        _drop_unused_tensors(converted)
        return torch.export.export(converted, (example,), dynamic_shapes=dynamic)


def _drop_unused_tensors(graph: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers no node reads. convert_pt2e leaves the fp32 originals of the
    weights it folded to int8 on the module, and torch.export would save them beside the int8 copies
    (measured: the INT8 program 1.3x the size of the fp32 one, instead of 0.4x)."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    names = [name for name, _ in graph.named_parameters()] + [name for name, _ in graph.named_buffers()]
    for name in names:
        if name not in used:
            *path, leaf = name.split(".")
            owner = graph.get_submodule(".".join(path)) if path else graph
            delattr(owner, leaf)


class FrozenCompiled(nn.Module):
    """``torch.compile`` of a PT2E program, every call (and so every recompilation for a new batch
    size) under Inductor's weight freezing, which is what swaps the quantize/dequantize pattern for
    packed int8 kernels (oneDNN; VNNI/AMX where the CPU has them). Without freezing the graph runs
    dequantized fp32 matmuls."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.compiled = torch.compile(program.module())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        with inductor.patch(freezing=True):
            return self.compiled(images)


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """``torch.export.save`` (graph and tensors, no pickled code), written atomically."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
