"""INT8 against fp32 on the CPU, both INT8 paths: ONNX Runtime dynamic quantization and torchao's PT2E
(compiled with frozen int8 weights), beside torch fp32 eager, the fp32 ONNX in ONNX Runtime, and torch
bf16 autocast where the CPU runs bf16 natively. Latency at batch 1 and throughput at batch 32, the
ratios in one run, same process and threads.

Random weights are fine for timing (the arithmetic is the same); accuracy is the compress report's job.
The CPU's int8 instructions decide the result (printed): AVX2 only (no VNNI) runs u8 x s8 products with
7-bit weights (``reduce_range``); AVX-512 VNNI, AVX-VNNI or AMX run them natively.

    .venv/bin/python benchmarks/bench_int8.py
    .venv/bin/python benchmarks/bench_int8.py --cases vit_tiny32_p4 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from selfsup.compress.measure import latency_ms, onnx_predict, torch_predict
from selfsup.compress.quantize import (
    FrozenCompiled,
    export_onnx,
    int8_instructions,
    quantize,
    quantize_pt2e,
    save_program,
    session,
)
from selfsup.models import BackboneSpec, create_backbone
from selfsup.precision import cpu_has_native_bf16, describe_cpu

CASES = {
    "vit_small16_224": BackboneSpec("moco_vit_small", 224, 16, pos_embed="learned"),
    # the fine-tuned CIFAR-10 subset classifier's shape (README results)
    "vit_tiny32_p4": BackboneSpec(
        "moco_vit_tiny", 32, 4, pos_embed="learned", extra={"depth": 4, "embed_dim": 128, "num_heads": 4}
    ),
}


def _bf16_predict(model):
    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(images)).float().numpy()

    return predict


def measure(case: str, repeats: int, batch: int, eager_pt2e: bool = False) -> dict:
    spec = CASES[case]
    torch.manual_seed(0)
    model = create_backbone(spec, 10).eval()
    images = (
        np.random.default_rng(0).standard_normal((batch, 3, spec.img_size, spec.img_size)).astype(np.float32)
    )
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, torch.from_numpy(images[:2]), Path(folder) / "m.onnx")
        int8 = quantize(fp32, Path(folder) / "m.int8.onnx", "int8-dynamic")
        program = quantize_pt2e(model, torch.from_numpy(images[:2]), [images])
        pt2 = save_program(program, Path(folder) / "m.int8.pt2")
        fp32_pt2 = save_program(
            torch.export.export(model, (torch.from_numpy(images[:2]),)), Path(folder) / "m.pt2"
        )
        runs = {
            "torch fp32": torch_predict(model),
            "onnxruntime fp32": onnx_predict(session(fp32, threads)),
            "onnxruntime int8": onnx_predict(session(int8, threads)),
            # --smoke: eager (the compiled path is tested in tests/test_bf16.py; compiling takes ~40 s)
            "pt2e int8": torch_predict(
                program.module() if eager_pt2e else FrozenCompiled(program), set_eval=False
            ),
        }
        if cpu_has_native_bf16():
            runs["torch bf16"] = _bf16_predict(model)
        sizes = {
            "fp32 onnx MB": fp32.stat().st_size / 1e6,
            "int8 onnx MB": int8.stat().st_size / 1e6,
            "fp32 pt2 MB": fp32_pt2.stat().st_size / 1e6,
            "int8 pt2 MB": pt2.stat().st_size / 1e6,
        }
        ms = {name: {b: latency_ms(fn, images, b, repeats) for b in (1, batch)} for name, fn in runs.items()}
    return {
        "case": case,
        "threads": threads,
        "ms": ms,
        **sizes,
        "int8_speedup_b1_vs_torch": ms["torch fp32"][1] / ms["onnxruntime int8"][1],
        "pt2e_speedup_b1_vs_torch": ms["torch fp32"][1] / ms["pt2e int8"][1],
        f"pt2e_throughput_ratio_b{batch}_vs_torch": ms["torch fp32"][batch] / ms["pt2e int8"][batch],
        "int8_speedup_b1_vs_ort_fp32": ms["onnxruntime fp32"][1] / ms["onnxruntime int8"][1],
        f"int8_throughput_ratio_b{batch}_vs_torch": ms["torch fp32"][batch] / ms["onnxruntime int8"][batch],
        f"int8_throughput_ratio_b{batch}_vs_ort_fp32": ms["onnxruntime fp32"][batch]
        / ms["onnxruntime int8"][batch],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: torch's default)"
    )
    parser.add_argument("--smoke", action="store_true", help="the tiny case, 1 repeat (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.repeats, args.batch = ["vit_tiny32_p4"], 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# machine: {describe_cpu()}; int8 instructions: {int8_instructions()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    b = args.batch
    print(
        f"| case | torch fp32 ms @1 | ORT fp32 ms @1 | ORT int8 ms @1 | PT2E int8 ms @1 | ORT int8 / torch speed-up @1 | "
        f"PT2E int8 / torch @1 | torch fp32 img/s @{b} | ORT int8 img/s @{b} | PT2E int8 img/s @{b} | ORT int8 / torch @{b} | "
        f"PT2E int8 / torch @{b} | ONNX fp32 -> int8 (MB) | pt2 fp32 -> int8 (MB) |"
    )
    print("|" + "---|" * 14)
    for case in args.cases:
        r = measure(case, args.repeats, b, eager_pt2e=args.smoke)
        ms = r["ms"]
        print(
            f"| {case} | {ms['torch fp32'][1]:.2f} | {ms['onnxruntime fp32'][1]:.2f} | {ms['onnxruntime int8'][1]:.2f} | "
            f"{ms['pt2e int8'][1]:.2f} | {r['int8_speedup_b1_vs_torch']:.2f} | {r['pt2e_speedup_b1_vs_torch']:.2f} | "
            f"{1000 * b / ms['torch fp32'][b]:.0f} | {1000 * b / ms['onnxruntime int8'][b]:.0f} | "
            f"{1000 * b / ms['pt2e int8'][b]:.0f} | {r[f'int8_throughput_ratio_b{b}_vs_torch']:.2f} | "
            f"{r[f'pt2e_throughput_ratio_b{b}_vs_torch']:.2f} | {r['fp32 onnx MB']:.2f} -> {r['int8 onnx MB']:.2f} | "
            f"{r['fp32 pt2 MB']:.2f} -> {r['int8 pt2 MB']:.2f} |"
        )
        if "torch bf16" in ms:
            print(
                f"# torch bf16 (native): {ms['torch bf16'][1]:.2f} ms @1, {1000 * b / ms['torch bf16'][b]:.0f} img/s @{b}"
            )
        print("# " + json.dumps(r))


if __name__ == "__main__":
    main()
