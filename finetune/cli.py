"""``finetune --dataset NAME --checkpoint BACKBONE.safetensors [--config FILE] [key=value ...]``.

Exit codes: 0 finished, 2 bad input (one line), 3 the loss diverged, 128+signal when stopped by
SIGTERM/SIGINT after saving a checkpoint (rerun the same command: ``resume=auto`` continues).
"""

from __future__ import annotations

from selfsup.config import CommandParser, load_config, parse_command
from selfsup.errors import exits_cleanly
from selfsup.finetune.settings import FinetuneConfig
from selfsup.precision import add_precision_flag

KEYS = {"teacher": "distill.teacher"}  # flags named otherwise than their config key


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    parser = CommandParser(
        prog="finetune",
        description="Fine-tune a pretrained backbone (or a timm model from scratch) as a classifier; "
        "exports OUT/best.safetensors and OUT/last.safetensors and writes OUT/report.html. "
        "Any config key can be set as key=value (nested with dots, e.g. optim.layer_decay=0.75).",
    )
    parser.add_argument("--config", help="YAML recipe, e.g. configs/finetune/vit_small_cifar100.yaml")
    parser.add_argument(
        "--dataset", help="cifar10, cifar100, flowers102, pets, ..., digits, imagefolder:<path>"
    )
    parser.add_argument("--data-root", help="folder holding the dataset (same as data_root=...)")
    parser.add_argument(
        "--checkpoint", help="a backbone exported by pretrain, or a classifier to fine-tune again"
    )
    parser.add_argument("--model", help="a timm model name trained from random init instead of a checkpoint")
    parser.add_argument(
        "--random-init",
        action="store_const",
        const="true",
        help="the --checkpoint's architecture from random init (baseline)",
    )
    parser.add_argument("--teacher", help="a classifier checkpoint to distil from (distill.teacher=...)")
    parser.add_argument("--out", help="run folder (same as out=...)")
    add_precision_flag(parser)
    args, overrides = parse_command(parser, argv, KEYS)
    return args.config, overrides


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(argv)
    config = load_config(FinetuneConfig, config_path, overrides)
    config.check_start()
    from selfsup.finetune.train import train  # heavy imports after argument checks
    from selfsup.loop import run_command

    result = run_command(train, config, " the same command (resume=auto, out={out})")
    print(f"best top-1 {_pct(result.best_top1)}, last {_pct(result.last_top1)}")
    print(
        f"classifier: {result.best or result.last} (last: {result.last}); report: {result.out / 'report.html'}"
    )
    if result.timm_call:
        print(f"in stock timm (no selfsup needed): import timm; model = {result.timm_call}")
