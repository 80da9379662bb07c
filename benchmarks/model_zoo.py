"""CPU-scale model zoo on the CIFAR-10 subset: each architecture against the small ViT at the same budget.

For every architecture: MoCo v3 pretraining (``configs/pretrain/cifar10_subset_cpu.yaml`` with
``--pretrain-epochs``, or the architecture's own ``configs/pretrain/*_cifar10_subset_cpu.yaml``:
convolutional backbones get the paper's ResNet recipe, LARS, lr 0.6 per 256, T = 1), the kNN and linear probes of the backbone, fine-tuning (``configs/finetune/cifar10_subset_cpu.yaml``
with ``--finetune-epochs``), and for SkipNet the share of gated blocks the fine-tuned classifier executes
on the validation images and its MACs per input. Parameters and MACs are counted at 32 px
(``selfsup.flops``). Every step is a stage command (printed before it runs) and resumes where it
stopped when the script is run again. Writes RUNS/zoo.md and RUNS/zoo.json.

    python benchmarks/model_zoo.py --data /tmp/c10/cifar10-20k --runs runs/zoo [--pretrain-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = "configs/pretrain/cifar10_subset_cpu.yaml"  # the small ViT's
ARCHS = {  # name -> (pretraining config, overrides)
    "vit_tiny (MoCo v3 small ViT)": (BASE, []),
    "t2t_vit_t_tiny": (BASE, ["model.arch=t2t_vit_t_tiny", "model.frozen_patch_embed=false"]),
    "botnet_tiny": ("configs/pretrain/botnet_tiny_cifar10_subset_cpu.yaml", []),
    # the paper anneals the attention temperature over the first 10% of training (10 of 100 epochs)
    "dy_resnet_tiny": (
        "configs/pretrain/dy_resnet_tiny_cifar10_subset_cpu.yaml",
        ["model.extra.anneal_epochs=0.2"],
    ),
    "skip_resnet38": ("configs/pretrain/skip_resnet38_cifar10_subset_cpu.yaml", []),
}


def slug(name: str) -> str:
    return name.split(" ")[0]


def run(cmd: list[str], times: dict, key: str) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    times[key] = times.get(key, 0.0) + time.perf_counter() - start


def skipnet_usage(classifier: Path, data: str) -> dict:
    """Share of gated blocks the classifier executes on the validation split, MACs per input."""
    from selfsup.checkpoint import load_classifier
    from selfsup.data import DataOptions, build_dataset
    from selfsup.transforms import eval_transform

    model, meta = load_classifier(classifier, "the zoo")
    val, info = build_dataset(f"imagefolder:{data}", "val", None, DataOptions(val_fraction=0.1, seed=0))
    transform = eval_transform(meta.img_size, meta.mean, meta.std, info.image_size)
    model.eval().reset_usage()
    with torch.no_grad():
        for start in range(0, len(val), 250):
            batch = torch.stack([transform(val[i][0]) for i in range(start, min(start + 250, len(val)))])
            model(batch)
    return model.usage(meta.img_size)


SMOKE = ["max_steps=1", "batch_size=8", "num_workers=0"]  # appended to every training command


def smoke(args) -> None:
    """The driver end to end on a generated 2-class folder, one step per training command."""
    import tempfile

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for label in ("a", "b"):
            (Path(tmp) / "data" / label).mkdir(parents=True)
            for i in range(16):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(Path(tmp) / "data" / label / f"{i}.png")
        args.data, args.runs, args.only = f"{tmp}/data", f"{tmp}/runs", ["vit_tiny"]
        args.pretrain_epochs = args.finetune_epochs = 1
        args.smoke = False
        main_with(args, extra=SMOKE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the extracted CIFAR-10 subset (ImageFolder)")
    parser.add_argument("--runs", default="runs/zoo")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="one step of each command on a tiny folder (CI)")
    args = parser.parse_args()
    if args.smoke:
        return smoke(args)
    if not args.data:
        parser.error("--data is required (the extracted CIFAR-10 subset)")
    main_with(args)


def main_with(args, extra: tuple[str, ...] | list[str] = ()) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    times_path = runs / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    dataset = f"dataset=imagefolder:{args.data}"
    chosen = {n: o for n, o in ARCHS.items() if not args.only or slug(n) in args.only}
    # pretraining and probes of every backbone first, then the fine-tunings
    for name, (config, overrides) in chosen.items():
        key, out = slug(name), runs / slug(name)
        backbone = out / "pretrain" / "backbone.safetensors"
        if not backbone.is_file():
            run(
                [
                    str(BIN / "pretrain"),
                    "--config",
                    str(REPO / config),
                    dataset,
                    f"out={out / 'pretrain'}",
                    f"epochs={args.pretrain_epochs}",
                    "monitor_every=0",
                    "progress_bar=false",
                    *overrides,
                    *extra,
                ],
                times,
                f"{key}/pretrain",
            )
            times_path.write_text(json.dumps(times, indent=1))
        if not (out / "probe" / "metrics.json").is_file():
            run(
                [
                    str(BIN / "probe"),
                    "--checkpoint",
                    str(backbone),
                    "--dataset",
                    f"imagefolder:{args.data}",
                    "--val-fraction",
                    "0.1",
                    "--out",
                    str(out / "probe"),
                    *(["--no-cache", "--batch-size", "8", "--num-workers", "0"] if extra else []),
                ],
                times,
                f"{key}/probe",
            )
    for name in chosen:
        key, out = slug(name), runs / slug(name)
        if not (out / "finetune" / "last.safetensors").is_file():
            run(
                [
                    str(BIN / "finetune"),
                    "--config",
                    str(REPO / "configs/finetune/cifar10_subset_cpu.yaml"),
                    dataset,
                    f"checkpoint={out / 'pretrain' / 'backbone.safetensors'}",
                    f"out={out / 'finetune'}",
                    f"epochs={args.finetune_epochs}",
                    f"optim.warmup_epochs={args.finetune_epochs / 8:g}",  # the config's 1 of 8, scaled
                    "progress_bar=false",
                    *extra,
                ],
                times,
                f"{key}/finetune",
            )
            times_path.write_text(json.dumps(times, indent=1))
    rows = [_row(name, slug(name), runs / slug(name), args.data, times) for name in chosen]
    hardware = f"{platform.processor() or platform.machine()}; {torch.get_num_threads()} torch threads"
    (runs / "zoo.json").write_text(
        json.dumps({"rows": rows, "machine": hardware, "args": vars(args)}, indent=1)
    )
    table = _markdown(rows)
    (runs / "zoo.md").write_text(table)
    print(table)


def _row(name: str, key: str, out: Path, data: str, times: dict) -> dict:
    import selfsup.architectures  # noqa: F401
    from selfsup.checkpoint import load_backbone
    from selfsup.flops import count_macs, count_params

    backbone, meta = load_backbone(out / "pretrain" / "backbone.safetensors")
    probe = json.loads((out / "probe" / "metrics.json").read_text())["models"][0]
    history = [
        json.loads(line)
        for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    row = {
        "name": name,
        "arch": meta.spec.arch,
        "params_m": count_params(backbone) / 1e6,
        "mmacs": count_macs(backbone, torch.zeros(1, 3, meta.img_size, meta.img_size)) / 1e6,
        "knn_top1": probe["knn"]["20"]["top1"],
        "linear_top1": probe["linear"]["top1"],
        "finetune_top1": history[-1]["top1"],  # after the last epoch
        "pretrain_min": _step_minutes(out / "pretrain" / "log.jsonl"),
        "finetune_min": _step_minutes(out / "finetune" / "log.jsonl"),
    }
    if meta.spec.arch.startswith("skip_"):
        row["skipnet"] = skipnet_usage(out / "finetune" / "last.safetensors", data)
    return row


def _step_minutes(log: Path) -> float:
    """Minutes of training steps (data wait + compute) in a run log: start-up, evaluation and export
    excluded, and a run that was stopped and resumed counted once."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sum(r["data_s"] + r["compute_s"] for r in records if "event" not in r) / 60


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| backbone | params (M) | MMACs @ 32 px | kNN top-1 (k=20) | linear top-1 | fine-tuned top-1 | pretraining steps (min) | fine-tuning steps (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params_m']:.2f} | {r['mmacs']:.1f} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | "
            f"{r['finetune_top1']:.2f} | {r['pretrain_min']:.1f} | {r['finetune_min']:.1f} |"
        )
    for r in rows:
        if "skipnet" in r:
            s = r["skipnet"]
            lines.append(
                f"\n{r['name']}: the fine-tuned classifier executes {100 * s['executed_share']:.1f}% of its gated "
                f"blocks on the validation images: {s['macs_per_input'] / 1e6:.1f} MMACs per input against "
                f"{s['macs_full'] / 1e6:.1f} with every block run."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
