"""``tta --checkpoint CLASSIFIER --dataset cifar10-c [--method source,tent,eata,sar] [--protocol reset]
[--severity 5] [--batch-size 64] [key=value ...]``: adapt at test time and report the errors.

Writes OUT/report.html/md (error per corruption per method beside the source row, a plot, cost and
forgetting), OUT/results.json and OUT/config.yaml. Exit codes: 0 done, 2 bad input (one line).
"""

from __future__ import annotations

from selfsup.config import CommandParser, load_config, parse_command
from selfsup.errors import UsageError, exits_cleanly
from selfsup.precision import add_precision_flag
from selfsup.tta.settings import TTAConfig

KEYS = {"method": "methods"}  # flags named otherwise than their config key


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = CommandParser(
        prog="tta",
        description="Test-time adaptation of a classifier on a corruption benchmark (CIFAR-10-C, CIFAR-100-C, "
        "ImageNet-C, or a set built by python -m selfsup.tta.generate or generate_imagenet_c). Any config key can be set as key=value.",
    )
    parser.add_argument("--config", help="YAML file of settings (see tta/settings.py)")
    parser.add_argument("--checkpoint", help="a classifier: fine-tune's best.safetensors")
    parser.add_argument(
        "--dataset",
        help="cifar10-c, cifar100-c, imagenet-c (under --data-root) or a folder in the npy or ImageNet-C layout",
    )
    parser.add_argument("--data-root", help="folder holding CIFAR-10-C/, CIFAR-100-C/ or ImageNet-C/")
    parser.add_argument("--method", help="comma-separated: source,norm,tent,eta,eata,sar,memo")
    parser.add_argument("--protocol", help="reset (before each corruption), continual or mixed")
    parser.add_argument("--severity", help="1-5")
    parser.add_argument("--batch-size", help="test batch size (64, 16, 1, ...)")
    parser.add_argument(
        "--corruptions", help="comma-separated subset (default: the benchmark's 15 in the set)"
    )
    parser.add_argument("--out", help="output folder")
    add_precision_flag(parser)
    args, overrides = parse_command(parser, argv, KEYS)
    return args.config, overrides


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(argv)
    config = load_config(TTAConfig, config_path, overrides)
    if not config.checkpoint:
        raise UsageError("no classifier given: pass --checkpoint runs/finetune/best.safetensors")
    from selfsup.tta.pipeline import run  # heavy imports after the argument checks

    tables, paths = run(config)
    print(tables)
    print(f"report: {paths['html']}")
