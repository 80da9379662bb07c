"""The README's test-time adaptation tables, written from several ``tta`` runs' ``results.json`` (never by hand).

Each argument is ``LABEL=RUN`` (RUN: a ``tta --out`` folder); the rows of every run go into one error table
(top-1 error per corruption and the mean) and one table of what each method did (change against its run's
source row, clean top-1 after adapting, the share of samples adapted on, passes, time per image).

    .venv/bin/python benchmarks/tta_tables.py resnet10t=runs/tta_cnn "MoCo v3 ViT=runs/tta_vit"
    .venv/bin/python benchmarks/tta_tables.py --smoke     # two made-up runs, formatted (CI)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from selfsup.tta.summary import SHORT


def _runs(pairs: list[str]) -> dict[str, dict]:
    runs = {}
    for pair in pairs:
        label, sep, folder = pair.partition("=")
        if not sep:
            raise ValueError(f"'{pair}' is not LABEL=RUN (e.g. resnet10t=runs/tta_cnn)")
        runs[label] = json.loads((Path(folder) / "results.json").read_text())
    return runs


def error_table(runs: dict[str, dict]) -> list[str]:
    names = next(iter(runs.values()))["corruptions"]
    head = "| classifier | method | " + " | ".join(SHORT.get(n, n) for n in names) + " | mean |"
    lines = [head, "|---|---|" + "---|" * (len(names) + 1)]
    for label, run in runs.items():
        for r in run["results"]:
            errors = " | ".join(f"{r['errors'][n]:.2f}" for n in names)
            lines.append(f"| {label} | {r['method']} | {errors} | {r['mean_error']:.2f} |")
    return lines


def _adapted(r: dict) -> str:
    share = r["extra"].get("adapted share (%)")
    return "100%" if share is None and r["backwards"] else ("-" if share is None else f"{share:.1f}%")


def cost_table(runs: dict[str, dict]) -> list[str]:
    lines = [
        "| classifier | method | vs source | clean top-1 after | adapted on | forward / backward passes | ms per image |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        source = next((r for r in run["results"] if r["method"] == "source"), None)
        for r in run["results"]:
            delta = "" if source is None or r is source else f"{r['mean_error'] - source['mean_error']:+.2f}"
            clean = "-" if r["clean_top1_after"] is None else f"{r['clean_top1_after']:.2f}"
            ms = 1000 * r["seconds"] / max(r["images"], 1)
            lines.append(
                f"| {label} | {r['method']} | {delta} | {clean} | {_adapted(r)} "
                f"| {r['forwards']} / {r['backwards']} | {ms:.1f} |"
            )
    return lines


def tables(runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))
    out = [
        f"{first['title']}; top-1 error (%), lower is better:",
        "",
        *error_table(runs),
        "",
        *cost_table(runs),
    ]
    return "\n".join(out) + "\n"


def smoke() -> None:
    """Two made-up runs in a temporary folder, formatted."""
    result = {
        "errors": {"gaussian_noise": 50.0, "contrast": 30.0},
        "clean_top1_after": 70.0,
        "forwards": 4,
        "backwards": 4,
        "seconds": 1.0,
        "images": 100,
        "extra": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for label, adapted in (("cnn", 40.0), ("vit", 45.0)):
            run = {
                "title": "Test-time adaptation: smoke, severity 5, reset",
                "corruptions": ["gaussian_noise", "contrast"],
                "results": [
                    {**result, "method": "source", "mean_error": 40.0, "backwards": 0},
                    {**result, "method": "tent", "mean_error": adapted, "extra": {"adapted share (%)": 50.0}},
                ],
            }
            (Path(tmp) / label).mkdir()
            (Path(tmp) / label / "results.json").write_text(json.dumps(run))
            pairs.append(f"{label}={tmp}/{label}")
        text = tables(_runs(pairs))
    assert "| vit | tent | +5.00 | 70.00 | 50.0% | 4 / 4 | 10.0 |" in text, text
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="LABEL=RUN, a tta --out folder per classifier")
    parser.add_argument("--smoke", action="store_true", help="two made-up runs, formatted (CI)")
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not args.runs:
        parser.error("give at least one LABEL=RUN")
    try:
        runs = _runs(args.runs)
    except (ValueError, OSError) as err:  # one line and exit 2, as every command of the project
        parser.error(str(err))
    print(tables(runs), end="")


if __name__ == "__main__":
    main()
