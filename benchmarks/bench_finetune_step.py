"""Images/s of one fine-tuning step: the stage's ``finetune_step`` against a minimal plain timm step.

Same model, same batch (in memory, so the input pipeline is not measured), same precision, in one
process, the two implementations interleaved repeat by repeat so that a shared or throttled CPU
slows both alike; the ratio is the figure to read. "selfsup" is the stage's path (accelerate-prepared
model and optimizer, layer-decay parameter groups with the lr applied per step, mixup/cutmix and
soft-target cross-entropy, the NaN-policy split of forward and update); "plain" is
``F.cross_entropy(model(x), y)``, ``backward()``, ``AdamW.step()``.

    .venv/bin/python benchmarks/bench_finetune_step.py                    # both cases, fp32
    .venv/bin/python benchmarks/bench_finetune_step.py --cases vit_tiny32_p4 --repeats 10 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from selfsup.accel import make_accelerator
from selfsup.config import load_config
from selfsup.finetune.settings import FinetuneConfig
from selfsup.finetune.train import _criterion, _mixup, finetune_step, param_groups
from selfsup.models import BackboneSpec, create_backbone
from selfsup.precision import PRECISIONS, autocast, describe_cpu, resolve_precision

CASES = {
    # name: (backbone spec, batch)
    "vit_small16_224": (BackboneSpec("moco_vit_small", 224, 16, pos_embed="learned"), 16),
    # configs/finetune/cifar10_subset_cpu.yaml's model (the CPU-pretrained backbone's shape)
    "vit_tiny32_p4": (
        BackboneSpec(
            "moco_vit_tiny", 32, 4, pos_embed="learned", extra={"depth": 4, "embed_dim": 128, "num_heads": 4}
        ),
        128,
    ),
}
NUM_CLASSES = 10


def _plain(spec: BackboneSpec, device: torch.device, precision: str):
    model = create_backbone(spec, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as accelerate does for fp16

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    return step


def _stage(spec: BackboneSpec, precision: str):
    config = load_config(
        FinetuneConfig,
        None,
        ["model=bench", "optim.layer_decay=0.75", "augment.mixup=0.8", "augment.cutmix=1.0"],
    )
    accelerator = make_accelerator(precision)
    model = create_backbone(spec, NUM_CLASSES)
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    step = finetune_step(
        config, accelerator, model, optimizer, _mixup(config, NUM_CLASSES), _criterion(config)
    )

    def run(x: torch.Tensor, y: torch.Tensor) -> float:
        loss, _ = step.forward((x, y), 5.0)
        step.update(loss)
        return float(loss)

    return run, accelerator.device


def measure(case: str, repeats: int, precision: str) -> dict:
    spec, batch = CASES[case]
    torch.manual_seed(0)
    stage, device = _stage(spec, precision)
    precision = resolve_precision(precision, device)  # the plain step autocasts as the stage resolved
    plain = _plain(spec, device, precision)
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    times: dict[str, list[float]] = {"plain": [], "selfsup": []}
    for i in range(repeats + 1):  # the first round warms both up and is not counted
        for name, fn in (("plain", plain), ("selfsup", stage)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": case,
        "batch": batch,
        "precision": precision,
        "device": device.type,
        "plain_images_per_s": batch / median["plain"],
        "selfsup_images_per_s": batch / median["selfsup"],
        "ratio_selfsup_over_plain": median["plain"] / median["selfsup"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mixed-precision", default="no", choices=PRECISIONS)
    parser.add_argument("--smoke", action="store_true", help="one tiny case, one step (CI)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.repeats = ["vit_tiny32_p4"], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | batch | precision | plain img/s | selfsup img/s | selfsup / plain |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        r = measure(case, args.repeats, args.mixed_precision)
        print(
            f"| {r['case']} | {r['batch']} | {r['precision']} | {r['plain_images_per_s']:.1f} | "
            f"{r['selfsup_images_per_s']:.1f} | {r['ratio_selfsup_over_plain']:.3f} |"
        )
        print("# " + json.dumps(r))


if __name__ == "__main__":
    main()
