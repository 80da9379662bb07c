"""``pretrain --config FILE [key=value ...]``: parse, call :func:`selfsup.ssl.train.train`, report.

Exit codes: 0 finished (or exported), 2 bad input (one line), 3 the loss diverged, 128+signal
when stopped by SIGTERM/SIGINT after saving a checkpoint (rerun with ``resume=auto``).
"""

from __future__ import annotations

from selfsup.config import CommandParser, load_config, parse_command
from selfsup.errors import exits_cleanly
from selfsup.precision import add_precision_flag
from selfsup.ssl.settings import PretrainConfig


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    parser = CommandParser(
        prog="pretrain",
        description="MoCo v3 pretraining of a ViT; exports OUT/backbone.safetensors. "
        "Any config key can be set as key=value (nested with dots, e.g. optim.base_lr=1e-4).",
    )
    parser.add_argument("--config", help="YAML file, e.g. configs/pretrain/digits_cpu.yaml")
    parser.add_argument("--dataset", help="dataset name (same as dataset=...)")
    parser.add_argument("--data-root", help="folder holding the dataset (same as data_root=...)")
    parser.add_argument("--out", help="run folder (same as out=...)")
    add_precision_flag(parser)
    args, overrides = parse_command(parser, argv)
    return args.config, overrides


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(argv)
    config = load_config(PretrainConfig, config_path, overrides)
    from selfsup.loop import run_command  # heavy imports after argument checks
    from selfsup.ssl.train import train

    result = run_command(train, config, ": pretrain ... out={out} resume=auto")
    if result.backbone is not None:
        print(f"backbone: {result.backbone}")
        if result.timm_call:
            print(f"in stock timm (no selfsup needed): import timm; model = {result.timm_call}")
