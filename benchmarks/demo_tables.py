"""The README's demo tables, written from a ``make demo`` folder's own outputs (never by hand).

Reads the probe's ``metrics.json``, both fine-tuning runs' ``metrics.jsonl``, the TTA ``results.json`` and
the compression ``metrics.json`` under RUNS, and prints markdown: the CPU and the precision each stage
resolved, then one table per stage. ``make demo`` ends by writing them to ``RUNS/RESULTS.md``.

    .venv/bin/python benchmarks/demo_tables.py runs/demo            # print
    .venv/bin/python benchmarks/demo_tables.py runs/demo --write    # also RUNS/RESULTS.md
    .venv/bin/python benchmarks/demo_tables.py --smoke              # the demo's commands at one step each, then the tables
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from tta_tables import error_table  # a sibling script: benchmarks/ is on sys.path when run

REPO = Path(__file__).resolve().parents[1]


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _precision(run: Path) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["mixed_precision"]


def probe_table(probe: dict) -> list[str]:
    ks = list(probe["models"][0].get("knn", {}))
    lines = [
        "| model | " + " | ".join(f"kNN k={k}" for k in ks) + " | linear |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for m in probe["models"]:
        knn = " | ".join(f"{m['knn'][k]['top1']:.2f}" for k in ks)
        linear = f"{m['linear']['top1']:.2f}" if "linear" in m else "-"
        lines.append(f"| {m['name']} | {knn} | {linear} |")
    return lines


def finetune_table(runs: dict[str, list[dict]]) -> list[str]:
    epochs = sorted({r["epoch"] for history in runs.values() for r in history})
    lines = ["| start | " + " | ".join(f"ep {e:g}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for name, history in runs.items():
        by_epoch = {r["epoch"]: r["top1"] for r in history}
        lines.append(
            f"| {name} | " + " | ".join(f"{by_epoch[e]:.2f}" if e in by_epoch else "-" for e in epochs) + " |"
        )
    return lines


def compress_table(metrics: dict) -> list[str]:
    lines = ["| variant | top-1 | agreement with fp32 | file (MB) |", "|---|---|---|---|"]
    for v in metrics["variants"]:
        agreement = f"{v['agreement']:.2f}%" if v["agreement"] is not None else "-"
        lines.append(f"| {v['name']} | {v['top1']:.2f} | {agreement} | {v['file_bytes'] / 1e6:.2f} |")
    return lines


def tables(runs: Path) -> str:
    probe = json.loads((runs / "probe" / "metrics.json").read_text())
    finetune = {
        "MoCo v3 backbone": _json_lines(runs / "finetune" / "metrics.jsonl"),
        "same ViT, random init": _json_lines(runs / "finetune_random_init" / "metrics.jsonl"),
    }
    tta = {
        "MoCo v3 ViT (LayerNorm)": json.loads((runs / "tta" / "results.json").read_text()),
        "resnet10t (BatchNorm)": json.loads((runs / "tta_cnn" / "results.json").read_text()),
    }
    compress = json.loads((runs / "compress" / "metrics.json").read_text())
    precisions = {
        "pretrain": _precision(runs / "pretrain"),
        "probe": probe.get("mixed_precision", "?"),
        "finetune": _precision(runs / "finetune"),
        "tta": _precision(runs / "tta"),
        "tta (CNN)": _precision(runs / "tta_cnn"),
        "compress": compress["config"]["mixed_precision"],
    }
    out = [
        f"Machine: {probe['machine']}; {probe['torch_threads']} torch threads.",
        "Precision resolved by each stage: " + ", ".join(f"{k} {v}" for k, v in precisions.items()) + ".",
        "",
        "Probes of the pretrained backbone (top-1 %, held-out digits):",
        "",
        *probe_table(probe),
        "",
        "Fine-tuning, validation top-1 (%) per evaluated epoch:",
        "",
        *finetune_table(finetune),
        "",
        f"Test-time adaptation, top-1 error (%), {tta['MoCo v3 ViT (LayerNorm)']['title'].split(': ', 1)[-1]}:",
        "",
        *error_table(tta),  # tta_tables.py's, one row per (classifier, method)
        "",
        "Deployment (compress):",
        "",
        *compress_table(compress),
    ]
    return "\n".join(out) + "\n"


SMOKE = {  # the demo's commands (Makefile), each cut to a step or two
    "pretrain": ["max_steps=2", "monitor_every=0", "progress_bar=false"],
    "finetune": ["max_steps=2", "progress_bar=false"],
}


def smoke() -> None:
    """The demo chain on digits, one or two steps per training stage, in this process (each command's
    ``main``, as its console script calls it), then its tables."""
    from selfsup.compress.cli import main as compress
    from selfsup.eval.cli import main as probe
    from selfsup.finetune.cli import main as finetune
    from selfsup.ssl.cli import main as pretrain
    from selfsup.tta.cli import main as tta
    from selfsup.tta.generate import main as generate

    with tempfile.TemporaryDirectory() as tmp:
        runs, configs = Path(tmp), REPO / "configs"
        backbone, classifier = f"{runs}/pretrain/backbone.safetensors", f"{runs}/finetune/best.safetensors"
        pretrain(
            ["--config", f"{configs}/pretrain/digits_cpu.yaml", f"out={runs}/pretrain", *SMOKE["pretrain"]]
        )
        probe(["--checkpoint", backbone, "--compare-random-init", "--dataset", "digits", "--method", "knn",
               "--out", f"{runs}/probe", "--no-cache", "--num-workers", "0"])  # fmt: skip
        for out, start in (("finetune", []), ("finetune_random_init", ["--random-init"])):
            finetune(["--config", f"{configs}/finetune/digits_cpu.yaml", *start, "--checkpoint", backbone,
                      "--out", f"{runs}/{out}", *SMOKE["finetune"]])  # fmt: skip
        generate(["--dataset", "digits", "--split", "val", "--corruptions", "contrast", "--severities", "3",
                  "--limit", "32", "--out", f"{runs}/digits-c"])  # fmt: skip
        tta(["--checkpoint", classifier, "--dataset", f"{runs}/digits-c", "--corruptions", "contrast",
             "--severity", "3", "--method", "source,tent", "--batch-size", "16", "--out", f"{runs}/tta"])  # fmt: skip
        finetune(["--config", f"{configs}/finetune/digits_resnet_cpu.yaml", "--out", f"{runs}/finetune_cnn",
                  *SMOKE["finetune"]])  # fmt: skip
        tta(["--checkpoint", f"{runs}/finetune_cnn/best.safetensors", "--dataset", f"{runs}/digits-c",
             "--corruptions", "contrast", "--severity", "3", "--method", "source,norm,tent", "--batch-size", "16",
             "--out", f"{runs}/tta_cnn"])  # fmt: skip
        compress(["--checkpoint", classifier, "--dataset", "digits", "--quantize", "int8-dynamic",
                  "--out", f"{runs}/compress", "latency_repeats=1", "latency_batches=[1]",
                  "measure_memory=false", "limit=32"])  # fmt: skip
        print(tables(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="?", default="runs/demo", help="the demo's folder (make demo: runs/demo)"
    )
    parser.add_argument("--write", action="store_true", help="also write RUNS/RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="a one-step demo in a temporary folder (CI)")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    text = tables(Path(args.runs))
    print(text)
    if args.write:
        (Path(args.runs) / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
