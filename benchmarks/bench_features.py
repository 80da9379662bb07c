"""Feature-extraction throughput of a ViT-S/16 at 224 px: fp32 vs bf16 autocast, through ``extract_features``.

    .venv/bin/python benchmarks/bench_features.py                 # CPU, 128 images, batch 32
    .venv/bin/python benchmarks/bench_features.py --images 512 --batch-size 128 --feature cls_last4

Images are random tensors already at 224 px, so the figure is the model's throughput, not JPEG
decoding. Both precisions are measured in the same run; the probe's ``auto`` picks bf16 on GPUs and on
CPUs with bf16 instructions (AVX512-BF16 / AMX), where it pays off, and fp32 elsewhere.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from selfsup.features import extract_features
from selfsup.models import BackboneSpec, create_backbone
from selfsup.precision import describe_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--feature", default="cls")
    p.add_argument("--smoke", action="store_true", help="a tiny ViT, 8 images (CI)")
    args = p.parse_args()
    if args.smoke:
        args.arch, args.img_size, args.images, args.batch_size = "vit_tiny_patch16_224", 32, 8, 4
    torch.manual_seed(0)
    model = create_backbone(BackboneSpec(args.arch, img_size=args.img_size, pos_embed="learned")).eval()
    data = TensorDataset(
        torch.randn(args.images, 3, args.img_size, args.img_size), torch.zeros(args.images, dtype=torch.long)
    )
    warm = TensorDataset(data.tensors[0][: args.batch_size], data.tensors[1][: args.batch_size])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# machine: {describe_cpu() if device == 'cpu' else torch.cuda.get_device_name()}")
    print(
        f"{args.arch} at {args.img_size} px on {device}, {torch.get_num_threads()} threads, "
        f"{args.images} images, batch {args.batch_size}, feature {args.feature}"
    )
    rates, outputs = {}, {}
    for precision in ("no", "bf16"):
        options = dict(batch_size=args.batch_size, num_workers=0, mixed_precision=precision, progress=False)
        extract_features(model, warm, args.feature, **options)  # warm-up
        start = time.perf_counter()
        feats, _ = extract_features(model, data, args.feature, **options)
        seconds = time.perf_counter() - start
        rates[precision], outputs[precision] = args.images / seconds, feats
        print(f"  {precision}: {rates[precision]:7.1f} images/s ({seconds:.1f} s)")
    cos = np.sum(outputs["no"] * outputs["bf16"], 1) / (
        np.linalg.norm(outputs["no"], axis=1) * np.linalg.norm(outputs["bf16"], axis=1)
    )
    print(
        f"  bf16 / fp32 throughput: {rates['bf16'] / rates['no']:.2f}x; "
        f"feature cosine similarity bf16 vs fp32: min {cos.min():.4f}, mean {cos.mean():.4f}"
    )


if __name__ == "__main__":
    main()
