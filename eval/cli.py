"""``probe``: evaluate frozen backbones (kNN and linear probes) and write a report.

    probe --checkpoint runs/demo/pretrain/backbone.safetensors --compare-random-init --dataset digits
    probe --checkpoint a.safetensors --checkpoint b.safetensors --dataset cifar100 --method knn
    probe --model vit_small_patch16_224 --random-init --dataset cifar10 --img-size 224

Trailing ``key=value`` overrides reach any config field (``linear_head.epochs=30``,
``data.synthetic_size=64``); ``--config FILE`` reads a YAML file first. A flag and a ``key=value``
for the same key: the ``key=value`` wins, as in every stage's command (``selfsup.config.parse_command``).
"""

from __future__ import annotations

import argparse
import json
import sys

from selfsup.config import CommandParser, load_config, parse_command
from selfsup.errors import UsageError, exits_cleanly
from selfsup.eval.probe import ProbeConfig, run_probe
from selfsup.precision import add_precision_flag

# Flags named otherwise than their config key; --random-init only confirms --model and sets nothing.
KEYS = {
    "data_root": "data.root",
    "download": "data.download",
    "val_fraction": "data.val_fraction",
    "random_init": None,
}


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="probe",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--checkpoint", dest="checkpoints", action="append", help="backbone .safetensors (repeatable)"
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        help="timm model name, evaluated at random init (repeatable)",
    )
    p.add_argument(
        "--random-init", action="store_true", help="required with --model: weights are never downloaded"
    )
    p.add_argument(
        "--compare-random-init",
        action="store_true",
        default=None,
        help="add each checkpoint's architecture at random init as a baseline row",
    )
    p.add_argument("--dataset", help="a registered dataset name or imagefolder:<path> (default cifar100)")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true", default=None)
    p.add_argument("--val-fraction", help="validation share carved from imagefolder trees without val/")
    p.add_argument("--method", dest="methods", help="knn,linear (default both)")
    p.add_argument("--feature", help="cls | patch_mean | cls_last4")
    p.add_argument("--ks", help="kNN k values, e.g. 10,20,100,200")
    p.add_argument("--temperature")
    p.add_argument("--knn-backend", choices=["auto", "faiss-gpu", "faiss-cpu", "torch"])
    p.add_argument(
        "--knn-index",
        choices=["auto", "flat", "ivf", "ivfpq"],
        help="flat: exact; ivf/ivfpq: approximate faiss index; auto: flat below 2 M training rows",
    )
    p.add_argument(
        "--linear-protocol",
        metavar="{sklearn,mocov3,mae}",
        help="sklearn (CLIP, default), mocov3 (main_lincls.py) or mae (main_linprobe.py); checked by the probe",
    )
    p.add_argument("--img-size")
    p.add_argument("--patch-size")
    p.add_argument("--batch-size")
    p.add_argument("--num-workers")
    add_precision_flag(p)  # the arithmetic of the frozen features
    p.add_argument("--seed", help="seed of random-init baselines")
    p.add_argument(
        "--cache-dir", help="feature cache (default $SELFSUP_CACHE/features or ~/.cache/selfsup/features)"
    )
    p.add_argument("--no-cache", action="store_true", default=None)
    p.add_argument("--out", help="report folder (default runs/probe)")
    p.add_argument("--config", help="YAML file of ProbeConfig fields, read before the flags")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """(the --config file, the overrides in the order they apply): flags, then key=value."""
    args, overrides = parse_command(build_parser(), argv, KEYS)
    if args.models and not args.random_init:
        raise UsageError(
            "--model evaluates an architecture at random initialisation: add --random-init "
            "(trained weights come only from --checkpoint)"
        )
    return args.config, overrides


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    config = load_config(ProbeConfig, config_path, overrides)
    metrics = run_probe(config)
    for m in metrics["models"]:
        knn = ", ".join(f"k={k} {v['top1']:.2f}" for k, v in m.get("knn", {}).items())
        linear = f"linear {m['linear']['top1']:.2f}" if "linear" in m else ""
        print(
            f"{m['name']}: " + "; ".join(part for part in (f"kNN top-1 {knn}" if knn else "", linear) if part)
        )
    if config.out:
        print(f"report: {config.out}/report.html (metrics.json, report.md)")
    else:
        json.dump(metrics, sys.stdout, indent=2, default=str)
    return 0


if __name__ == "__main__":
    main()
