"""The run's tables (error per corruption; cost and forgetting per method), plot and results.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from selfsup import plots
from selfsup.files import atomic_write_bytes
from selfsup.report import Block, pct, write_documents
from selfsup.tta.runner import MethodResult

SHORT = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
    "speckle_noise": "speck",
    "gaussian_blur": "gblur",
    "spatter": "spat",
    "saturate": "satur",
}


def error_table(results: list[MethodResult], names: tuple[str, ...]) -> Block:
    """Top-1 error (%) per corruption and the mean; a source row (if run) is the reference."""
    return Block(
        "table",
        headers=["method", *(SHORT.get(n, n) for n in names), "mean"],
        rows=[[r.method, *(pct(r.errors[n]) for n in names), pct(r.mean_error)] for r in results],
    )


def cost_table(results: list[MethodResult]) -> Block:
    source = next((r for r in results if r.method == "source"), None)
    rows = []
    for r in results:
        delta = "" if source is None or r is source else f"{r.mean_error - source.mean_error:+.2f}"
        forgetting = (
            ""
            if source is None or r.clean_top1_after is None or source.clean_top1_after is None
            else f"{source.clean_top1_after - r.clean_top1_after:+.2f}"
        )
        rows.append(
            [
                r.method,
                pct(r.mean_error),
                delta,
                pct(r.clean_top1_after),
                forgetting,
                str(r.forwards),
                str(r.backwards),
                f"{r.seconds:.1f}",
                f"{1000 * r.seconds / max(r.images, 1):.2f}",
                "–" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}",
                ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.extra.items()),
            ]
        )
    return Block(
        "table",
        headers=[
            "method",
            "mean error",
            "vs source",
            "clean top-1 after",
            "forgetting",
            "forward passes",
            "backward passes",
            "time (s)",
            "ms / image",
            "peak memory (MiB)",
            "notes",
        ],
        rows=rows,
    )


def write(
    out: Path,
    title: str,
    facts: list[str],
    results: list[MethodResult],
    names: tuple[str, ...],
    source: dict | None = None,
) -> dict:
    """report.md/html and results.json; ``source``: the released file the classifier descends from
    (its sidecar's ``source``, {} for weights this project pretrained)."""
    figure = plots.plot_grouped_bars(
        {r.method: r.errors for r in results}, "top-1 error (%)", out / "figures" / "errors.png", names
    )
    memory_kind = results[0].memory_kind if results else ""
    blocks = [
        Block("h2", "Run"),
        *(Block("p", fact) for fact in facts),
        Block("h2", "Top-1 error (%) per corruption"),
        error_table(results, names),
        Block("img", str(figure.relative_to(out))),
        Block("h2", "Cost and forgetting"),
        Block(
            "p",
            "Forgetting: clean top-1 of the source model minus that of the adapted model at the end of the "
            f"stream (positive: accuracy lost). Passes count whole batches (MEMO: one image and its views). "
            f"Memory: {memory_kind}.",
        ),
        cost_table(results),
    ]
    paths = write_documents(out, "report", title, blocks)
    payload = {
        "title": title,
        "facts": facts,
        "source": source or {},
        "corruptions": list(names),
        "results": [dataclasses.asdict(r) for r in results],
    }
    atomic_write_bytes(out / "results.json", json.dumps(payload, indent=2).encode())
    return paths
