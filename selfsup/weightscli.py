"""``selfsup-weights import FILE --format auto|moco-v3|mocov3-lincls|deit|mae|dino|timm --out DIR``:
released self-supervised weights as a selfsup checkpoint every stage reads (see docs/weights.md).

Exit codes: 0 written, 2 bad input (one line: a file that is no known layout, or needs unpickling code).
"""

from __future__ import annotations

import argparse

from selfsup.config import CommandParser
from selfsup.errors import UsageError, exits_cleanly

FORMAT_HELP = (
    "auto (recognise the layout and say which), moco-v3 (main_moco.py), mocov3-lincls (main_lincls.py), "
    "deit (convert_to_deit.py, DeiT), mae, dino, timm (FILE is a timm name with its tag)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from selfsup.weights import ENCODERS, FORMATS, HEADS

    parser = CommandParser(prog="selfsup-weights", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("import", help="write a released checkpoint in the project's format")
    cmd.add_argument("file", help="the released file (.pth, .pth.tar), or a timm name with --format timm")
    cmd.add_argument("--format", default="auto", choices=FORMATS, help=FORMAT_HELP)
    cmd.add_argument(
        "--encoder", default="base", choices=ENCODERS, help="MoCo v3: which encoder becomes the backbone"
    )
    cmd.add_argument(
        "--arch",
        help="timm name or MoCo v3 alias giving the heads (default by width: moco_vit_small/base for "
        "MoCo v3 and DeiT files, vit_small/base/large_patch16_224 for MAE and DINO)",
    )
    cmd.add_argument(
        "--num-heads", type=int, help="attention heads, where --arch's default is not the file's"
    )
    cmd.add_argument(
        "--head",
        default="keep",
        choices=HEADS,
        help="a classifier's head (lincls, DeiT, fine-tuned MAE, a timm tag with classes): keep it "
        "(classifier.safetensors) or drop it (backbone.safetensors)",
    )
    cmd.add_argument("--img-size", type=int, help="resolution to write (position embedding resampled)")
    cmd.add_argument("--out", required=True, help="folder for backbone.safetensors (classifier.safetensors)")
    return parser.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, value in (("--num-heads", args.num_heads), ("--img-size", args.img_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be 1 or more, got {value}")
    from selfsup.checkpoint import timm_call  # heavy imports after the arguments are checked
    from selfsup.weights import import_file, import_timm

    if args.format == "timm":
        path, fmt = import_timm(args.file, args.out, args.img_size, args.head)
    else:
        path, fmt = import_file(
            args.file,
            args.out,
            args.format,
            args.encoder,
            args.arch,
            args.num_heads,
            args.img_size,
            args.head,
        )
    print(f"read {args.file} as {fmt}; wrote {path} (+ {path.with_suffix('.json').name})")
    print(f"in stock timm (no selfsup needed): import timm; model = {timm_call(path)}")
    if fmt == "moco-v3":  # the projector, predictor and epoch are a pretraining run's, not a checkpoint's
        print(
            f"to continue its pretraining run instead: pretrain --config ... out=DIR import_run={args.file}"
        )
    return 0


if __name__ == "__main__":
    main()
