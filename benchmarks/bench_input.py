"""The pretraining input side per CPU core: PIL views vs the batched backend's CPU half, and its device half.

CPU side, one thread, the three measured in alternating bursts (their ratios hold on a shared
machine), synthetic JPEGs (smooth random colour fields; 500×375 for 224 px like an ImageNet photo,
32×32 for CIFAR-sized inputs), images/s of:

- ``decode``: JPEG -> RGB PIL image only;
- ``batched (CPU)``: decode + both views' random-resized-crop regions cut to uint8 canvases + every
  later op's parameters (``augment.backend=batched``, :class:`selfsup.ssl.batched_views.CropAndParams`;
  the resize runs on the device, :mod:`selfsup.ssl.crop_canvas`);
- ``pil``: decode + both full BYOL views with PIL (``augment.backend=pil``, lightly's transforms).

Device side: the batched ops (resize included) on one collated batch
(:class:`~selfsup.ssl.batched_views.BatchedViews`) against one MoCo v3 training step of the CIFAR
config's model (tiny ViT 4×128, patch 4, batch 128, fp32) on the same device, as a share of the step.

    .venv/bin/python benchmarks/bench_input.py              # 32 and 224 px, CPU (or the GPU when present)
    .venv/bin/python benchmarks/bench_input.py --smoke      # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from PIL import Image

from selfsup.ssl.augment import byol_views
from selfsup.ssl.batched_views import BatchedViews, CropAndParams, view_recipes
from selfsup.ssl.settings import AugmentSettings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SOURCES = {32: (32, 32), 224: (500, 375)}  # output size -> synthetic JPEG width, height


def jpegs(count: int, size: tuple[int, int]) -> list[bytes]:
    g = np.random.default_rng(0)
    out = []
    for _ in range(count):
        field = Image.fromarray(g.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        field.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def interleaved_rates(fns: dict, items: list, seconds: float, burst: float = 0.25) -> dict[str, float]:
    """Items per second of each function over ``items``, measured in alternating bursts of ``burst``
    seconds until each has run ``seconds``: on a shared machine a load change hits all of them alike,
    so their ratios hold even when the absolute rates drift."""
    done = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn(items[0])  # warm-up
    while min(spent.values()) < seconds:
        for name, fn in fns.items():
            start = time.perf_counter()
            while time.perf_counter() - start < burst:
                fn(items[done[name] % len(items)])
                done[name] += 1
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in fns}


def cpu_rates(size: int, images: int, seconds: float) -> dict[str, float]:
    settings = AugmentSettings(min_scale=0.08)
    data = jpegs(images, SOURCES[size])
    pil1, pil2 = byol_views(settings, size, MEAN, STD)
    crop1, crop2 = (CropAndParams(r) for r in view_recipes(settings, size))

    def pil(item):
        image = decode(item)
        return pil1(image), pil2(image)

    def crops(item):
        image = decode(item)
        return crop1(image), crop2(image)

    return interleaved_rates({"decode": decode, "batched (CPU)": crops, "pil": pil}, data, seconds)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (after one warm-up), synchronising a GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def collated_views(size: int, batch: int) -> list[dict[str, torch.Tensor]]:
    recipes = view_recipes(AugmentSettings(min_scale=0.08), size)
    image = decode(jpegs(1, SOURCES[size])[0])
    views = []
    for recipe in recipes:
        crop = CropAndParams(recipe)
        samples = [crop(image) for _ in range(batch)]
        views.append({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
    return views


def device_share(batch: int, depth: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds of the batched ops and of one training step on the CIFAR config's model, same batch."""
    from selfsup.models import BackboneSpec, create_backbone
    from selfsup.ssl.builder import MoCoV3

    views = collated_views(32, batch)
    finish = BatchedViews(view_recipes(AugmentSettings(min_scale=0.08), 32), MEAN, STD)
    extra = {"depth": depth, "embed_dim": 128, "num_heads": 4}
    spec = BackboneSpec(arch="moco_vit_tiny", img_size=32, patch_size=4, extra=extra, frozen_patch_embed=True)
    model = MoCoV3(create_backbone(spec), 128, 512).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    x1, x2 = finish(views, device)

    def step():
        loss = model(x1, x2, 0.99)
        opt.zero_grad()
        loss.backward()
        opt.step()

    ops, train = timed(lambda: finish(views, device), repeats), timed(step, repeats)
    return {"ops_s": ops, "step_s": train, "share": ops / (ops + train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per CPU measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(SOURCES))
    parser.add_argument("--batch", type=int, default=128, help="device-side batch")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, short runs (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    seconds, images, batch, depth, repeats = args.seconds, 64, args.batch, 4, 5
    if args.smoke:
        seconds, images, batch, depth, repeats = 0.3, 4, 8, 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("| size | decode img/s | batched CPU side img/s | PIL views img/s | batched / PIL |")
    print("|---|---|---|---|---|")
    results = {}
    for size in args.sizes:
        r = results[size] = cpu_rates(size, images, seconds)
        print(
            f"| {size} | {r['decode']:.0f} | {r['batched (CPU)']:.0f} | {r['pil']:.0f} | "
            f"{r['batched (CPU)'] / r['pil']:.1f}x |"
        )
    share = device_share(batch, depth, repeats, device)
    print(
        f"\ndevice ({device}), batch {batch} at 32 px: batched ops {share['ops_s'] * 1e3:.1f} ms, "
        f"training step {share['step_s'] * 1e3:.1f} ms, ops = {share['share']:.1%} of ops + step"
    )
    print(json.dumps({"cpu_images_per_s": results, "device": str(device), **share}))


if __name__ == "__main__":
    main()
