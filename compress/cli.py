"""``compress --checkpoint CLASSIFIER --dataset NAME [--prune l1 --target-macs 0.5] [--recover-epochs N
[--teacher self]] [--quantize int8-dynamic|int8-static|int8-pt2e] [--calibrate N] --out DIR [key=value ...]``.

Writes OUT/report.html/md and OUT/metrics.json (every variant's accuracy, agreement with the original,
parameters, MACs, size, latency), OUT/pruned.safetensors and OUT/recovered.safetensors (+ .json sidecars)
and OUT/*.onnx. Recovery is a resumable training run in OUT/recovery (rerun the same command to continue
it). Exit codes: 0 done, 2 bad input (one line), 3 recovery diverged, 128 + signal when stopped (its
checkpoint saved). Under ``accelerate launch compress/compress.py ...`` recovery runs in every process.
"""

from __future__ import annotations

from selfsup.compress.settings import CompressConfig
from selfsup.config import CommandParser, load_config, parse_command
from selfsup.errors import exits_cleanly
from selfsup.precision import add_precision_flag


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = CommandParser(
        prog="compress",
        description="Prune (L1, structured), recover and quantize (INT8 via ONNX Runtime) a classifier, and "
        "measure every variant side by side. Any config key can be set as key=value.",
    )
    parser.add_argument("--config", help="YAML file of settings (see compress/settings.py)")
    parser.add_argument("--checkpoint", help="a classifier: fine-tune's best.safetensors")
    parser.add_argument("--dataset", help="the classifier's dataset (registry name or imagefolder:<path>)")
    parser.add_argument("--data-root")
    parser.add_argument("--prune", help="l1: structured L1-norm pruning (heads and MLP neurons for ViTs)")
    parser.add_argument("--target-macs", help="pruned MACs as a share of the original's, in (0, 1)")
    parser.add_argument("--recover-epochs", help="fine-tuning epochs after pruning")
    parser.add_argument("--teacher", help="self (the unpruned model) or a classifier checkpoint")
    parser.add_argument(
        "--quantize",
        help="int8-dynamic (ViTs), int8-static (CNNs; calibrated): ONNX Runtime; int8-pt2e: torchao",
    )
    parser.add_argument("--calibrate", help="calibration images for int8-static")
    parser.add_argument("--out", help="output folder")
    add_precision_flag(parser)
    args, overrides = parse_command(parser, argv)
    return args.config, overrides


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(argv)
    config = load_config(CompressConfig, config_path, overrides)
    config.check_steps()
    from selfsup.compress.pipeline import run  # heavy imports after the argument checks
    from selfsup.loop import run_command

    result = run_command(run, config, " the same command (resume=auto continues {out}/recovery)")
    if result.table:  # the main process's
        print(result.table)
        print(f"report: {result.paths['html']}")
