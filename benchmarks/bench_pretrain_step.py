"""Images/s and peak memory of one MoCo v3 training step: selfsup.ssl vs a minimal plain-PyTorch step.

Both run the same timm backbone, heads of the same size and the same batch; "selfsup" is the
stage's path (MoCoV3 module, accelerate-prepared model and optimizer, accelerate's autocast),
"plain" a ~40-line re-statement of the official step (torch.autocast only). Each
(case, implementation, precision) runs in a fresh process so that peak memory is its own (peak
RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU).

    .venv/bin/python benchmarks/bench_pretrain_step.py                   # all cases, fp32 and bf16
    .venv/bin/python benchmarks/bench_pretrain_step.py --cases vit_tiny32 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

from selfsup.precision import PRECISIONS

CASES = {
    # name: backbone spec fields, heads (dim, mlp_dim), batch
    "vit_small16_224": ({"arch": "moco_vit_small", "img_size": 224, "patch_size": 16}, (256, 4096), 16),
    "vit_tiny32": (
        {
            "arch": "moco_vit_tiny",
            "img_size": 32,
            "patch_size": 8,
            "extra": {"depth": 4, "embed_dim": 128, "num_heads": 4},
        },
        (128, 512),
        64,
    ),
    "vit_tiny32_p4": (  # configs/pretrain/cifar10_subset_cpu.yaml
        {
            "arch": "moco_vit_tiny",
            "img_size": 32,
            "patch_size": 4,
            "extra": {"depth": 4, "embed_dim": 128, "num_heads": 4},
        },
        (128, 512),
        128,
    ),
}


def plain_step_factory(backbone, dim, mlp_dim, precision, device):
    """The official builder.py + main_moco.py step, restated with torch only."""
    import torch
    from torch import nn

    def mlp(layers, d_in, d_hidden, d_out):
        mods = []
        for i in range(layers):
            a, b = d_in if i == 0 else d_hidden, d_out if i == layers - 1 else d_hidden
            mods.append(nn.Linear(a, b, bias=False))
            mods += (
                [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
                if i < layers - 1
                else [nn.BatchNorm1d(b, affine=False)]
            )
        return nn.Sequential(*mods)

    base = nn.Sequential(backbone, mlp(3, backbone.num_features, mlp_dim, dim)).to(device)
    pred = mlp(2, dim, mlp_dim, dim).to(device)
    mom = copy.deepcopy(base)
    for p in mom.parameters():
        p.requires_grad = False
    params = [p for p in [*base.parameters(), *pred.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4, weight_decay=0.1)

    def ctr(q, k, t=0.2):
        q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
        return nn.functional.cross_entropy(q @ k.T / t, torch.arange(q.shape[0], device=q.device)) * 2 * t

    from selfsup.precision import autocast

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # as accelerate does for fp16

    def step(x1, x2, m=0.99):
        with autocast(device, precision):
            q1, q2 = pred(base(x1)), pred(base(x2))
            with torch.no_grad():
                for pb, pm in zip(base.parameters(), mom.parameters()):
                    pm.mul_(m).add_(pb.detach(), alpha=1 - m)
                k1, k2 = mom(x1), mom(x2)
            loss = ctr(q1, k2) + ctr(q2, k1)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


def selfsup_step_factory(spec, dim, mlp_dim, precision):
    import torch

    from selfsup.accel import make_accelerator
    from selfsup.models import BackboneSpec, create_backbone
    from selfsup.ssl.builder import MoCoV3

    accelerator = make_accelerator(precision)
    model = MoCoV3(create_backbone(BackboneSpec(**spec, frozen_patch_embed=True)), dim, mlp_dim)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4, weight_decay=0.1)
    model, opt = accelerator.prepare(model, opt)

    def step(x1, x2, m=0.99):
        loss = model(x1, x2, m)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        return loss

    return step, accelerator.device


def run_one(case: str, impl: str, precision: str, steps: int, warmup: int, threads: int | None) -> dict:
    import torch

    from selfsup.accel import default_device
    from selfsup.models import BackboneSpec, create_backbone
    from selfsup.precision import resolve_precision

    if threads:
        torch.set_num_threads(threads)
    precision = resolve_precision(precision, default_device())  # both implementations in the same one
    torch.manual_seed(0)
    spec, (dim, mlp_dim), batch = CASES[case]
    if impl == "selfsup":
        step, device = selfsup_step_factory(spec, dim, mlp_dim, precision)
    else:
        device = default_device()
        step = plain_step_factory(
            create_backbone(BackboneSpec(**spec, frozen_patch_embed=True)), dim, mlp_dim, precision, device
        )
    size = spec["img_size"]
    x1, x2 = (
        torch.randn(batch, 3, size, size, device=device),
        torch.randn(batch, 3, size, size, device=device),
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(warmup):
        step(x1, x2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(x1, x2)
        float(loss)
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "case": case,
        "impl": impl,
        "precision": precision,
        "batch": batch,
        "step_s": median,
        "images_per_s": batch / median,
        "peak_mib": peak,
        "device": device.type,
        "step_mib": peak - rss_before if device.type == "cpu" else peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--precisions", nargs="*", default=["no", "bf16"], choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is robust on a shared CPU; 0: torch's default)",
    )
    parser.add_argument("--one", nargs=3, metavar=("CASE", "IMPL", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="one tiny case, one step (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.cases, args.precisions, args.steps, args.warmup = ["vit_tiny32"], ["auto"], 1, 0
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps, args.warmup, args.threads)))
        return
    rows = []
    for case in args.cases:
        for precision in args.precisions:
            pair = {}
            for impl in ("plain", "selfsup"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    case,
                    impl,
                    precision,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = (
                    subprocess.run(cmd, capture_output=True, text=True, check=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                pair[impl] = json.loads(out)
                rows.append(pair[impl])
            ratio = pair["selfsup"]["images_per_s"] / pair["plain"]["images_per_s"]
            print(
                f"{case:16s} {pair['plain']['precision']:4s} batch {pair['plain']['batch']:3d} | plain {pair['plain']['images_per_s']:7.1f} img/s "
                f"{pair['plain']['peak_mib']:6.0f} MiB (+{pair['plain']['step_mib']:.0f} in steps) | selfsup {pair['selfsup']['images_per_s']:7.1f} img/s "
                f"{pair['selfsup']['peak_mib']:6.0f} MiB (+{pair['selfsup']['step_mib']:.0f}) | ratio {ratio:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
