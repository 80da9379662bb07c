"""Per-batch cost of test-time adaptation: selfsup's Tent and SAR against a plain forward pass and
against the reference implementations' update, restated minimally here.

"forward": ``model(x)`` under ``no_grad`` (what source costs). "tent reference": DequanWang/tent's
``forward_and_adapt`` (forward, mean entropy, backward, SGD step, zero grad). "sar reference":
mr-eggplant/SAR's step (forward, reliable-entropy filter, backward, SAM climb, second forward on the
reliable samples, filter again, backward, SAM step back + SGD step). Same model and batch, in one
process, interleaved repeat by repeat so a shared CPU slows all alike; read the ratios.

    .venv/bin/python benchmarks/bench_tta_step.py                      # both cases, fp32
    .venv/bin/python benchmarks/bench_tta_step.py --cases vit_tiny32_p4 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch

from selfsup.accel import default_device
from selfsup.models import BackboneSpec, create_backbone
from selfsup.precision import describe_cpu
from selfsup.tta.adapter import norm_affine_parameters, softmax_entropy, test_time_mode
from selfsup.tta.sar import SAR, frozen_prefixes
from selfsup.tta.tent import Tent

CASES = {
    "vit_small16_224": (BackboneSpec("moco_vit_small", 224, 16, pos_embed="learned"), 64, 1000),
    # the fine-tuned CIFAR-10 subset classifier's shape (README results)
    "vit_tiny32_p4": (
        BackboneSpec(
            "moco_vit_tiny", 32, 4, pos_embed="learned", extra={"depth": 4, "embed_dim": 128, "num_heads": 4}
        ),
        64,
        10,
    ),
}
LR = 0.001


def reference_tent(model):
    """DequanWang/tent's update, restated: one SGD step on the batch's mean entropy."""
    params = norm_affine_parameters(test_time_mode(model))
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)

    def step(x):
        with torch.enable_grad():
            outputs = model(x)
            loss = softmax_entropy(outputs).mean(0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return outputs

    return step


def reference_sar(model, num_classes):
    """mr-eggplant/SAR's step, restated: filtered entropy, SAM climb, filtered entropy again, step."""
    params = norm_affine_parameters(test_time_mode(model), skip=frozen_prefixes(model))
    for p in params:
        p.requires_grad_(True)
    base = torch.optim.SGD(params, lr=LR, momentum=0.9)
    margin = 0.4 * math.log(num_classes) * 2.5  # a margin every sample passes: the full cost is timed

    def step(x):
        with torch.enable_grad():
            base.zero_grad()
            outputs = model(x)
            entropy = softmax_entropy(outputs)
            keep = torch.where(entropy < margin)
            entropy[keep].mean(0).backward()
            with torch.no_grad():  # SAM first step
                norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params if p.grad is not None]), p=2)
                scale = 0.05 / (norm + 1e-12)
                offsets = []
                for p in params:
                    e = p.grad * scale if p.grad is not None else None
                    if e is not None:
                        p.add_(e)
                    offsets.append(e)
                base.zero_grad()
            second = softmax_entropy(model(x))[keep]
            second[torch.where(second < margin)].mean(0).backward()
            with torch.no_grad():  # SAM second step
                for p, e in zip(params, offsets):
                    if e is not None:
                        p.sub_(e)
            base.step()
            base.zero_grad()
        return outputs

    return step


def measure(case: str, repeats: int) -> dict:
    spec, batch, classes = CASES[case]
    device = default_device()
    torch.manual_seed(0)
    original = create_backbone(spec, classes).to(device).eval()
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, device=device)
    margin_coeff = 1.0  # every sample reliable for SAR: the full two-pass cost is what is timed

    def forward(v):
        with torch.no_grad():
            return original(v)

    fns = {
        "forward": forward,
        "tent (selfsup)": Tent(copy.deepcopy(original), lr=LR),
        "tent (reference)": reference_tent(copy.deepcopy(original)),
        "sar (selfsup)": SAR(copy.deepcopy(original), LR, e_margin_coeff=margin_coeff, reset_below=0.0),
        "sar (reference)": reference_sar(copy.deepcopy(original), classes),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats + 1):  # the first round warms up and is not counted
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "case": case,
        "batch": batch,
        "device": device.type,
        "ms_per_batch": ms,
        "tent_over_forward": ms["tent (selfsup)"] / ms["forward"],
        "sar_over_forward": ms["sar (selfsup)"] / ms["forward"],
        "tent_over_reference": ms["tent (selfsup)"] / ms["tent (reference)"],
        "sar_over_reference": ms["sar (selfsup)"] / ms["sar (reference)"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="one tiny case, one repeat (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.repeats = ["vit_tiny32_p4"], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    machine = describe_cpu() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"# machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(
        "| case | batch | forward ms | Tent / forward | SAR / forward | Tent / reference Tent | SAR / reference SAR |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        r = measure(case, args.repeats)
        print(
            f"| {r['case']} | {r['batch']} | {r['ms_per_batch']['forward']:.1f} | {r['tent_over_forward']:.2f} | "
            f"{r['sar_over_forward']:.2f} | {r['tent_over_reference']:.3f} | {r['sar_over_reference']:.3f} |"
        )
        print("# " + json.dumps(r))


if __name__ == "__main__":
    main()
