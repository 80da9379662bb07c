"""The deployment table, the two checked claims (INT8 ~4x smaller, < 1 point of accuracy lost), and a
size/latency/accuracy plot."""

from __future__ import annotations

from pathlib import Path

from selfsup import plots
from selfsup.compress.measure import Variant
from selfsup.report import Block, markdown, pct, write_documents


def _millions(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}"


def table(variants: list[Variant]) -> Block:
    batches = sorted({b for v in variants for b in v.latency_ms})
    headers = ["variant", "top-1", "agreement", "params (M)", "MMACs", "file (MB)"]
    headers += [f"ms @ {b}" for b in batches] + [
        f"img/s @ {max(batches)}",
        f"peak MiB @ {max(batches)}",
        "notes",
    ]
    rows = [
        [
            v.name,
            pct(v.top1),
            pct(v.agreement),
            _millions(v.params),
            "–" if v.macs is None else f"{v.macs / 1e6:.1f}",
            f"{v.file_bytes / 1e6:.2f}",
            *(f"{v.latency_ms[b]:.2f}" for b in batches),
            f"{v.throughput(max(batches)):.0f}",
            "–" if v.peak_mib is None else f"{v.peak_mib:.0f}",
            v.note,
        ]
        for v in variants
    ]
    return Block("table", headers=headers, rows=rows)


def claims(variants: list[Variant]) -> Block | None:
    """The seed's claims as rows that pass or fail: INT8 about 4x smaller than fp32, < 1 point lost."""
    original = variants[0]
    int8 = next((v for v in variants if v.name == "INT8"), None)
    if int8 is None:
        return None
    ratio = int8.fp32_bytes / int8.file_bytes  # the same container, fp32 against INT8
    loss = original.top1 - int8.top1
    return Block(
        "table",
        headers=["claim", "measured", "holds"],
        rows=[
            [
                "INT8 is ~4x smaller than fp32 in the same container (>= 3.5x)",
                f"{ratio:.2f}x",
                "yes" if ratio >= 3.5 else "no",
            ],
            ["INT8 loses < 1 point of top-1", f"{loss:+.2f} points", "yes" if loss < 1 else "no"],
        ],
    )


def plot(variants: list[Variant], path: Path) -> Path:
    batch = max(variants[0].latency_ms)
    points = {
        v.name: (v.latency_ms[batch], v.top1, 30 + 40 * v.file_bytes / variants[0].file_bytes)
        for v in variants
    }
    title = "accuracy against latency (marker area: file size)"
    return plots.plot_labelled_points(points, f"latency at batch {batch} (ms)", "top-1 (%)", title, path)


def markdown_table(variants: list[Variant]) -> str:
    blocks = [table(variants)] + ([claims(variants)] if claims(variants) else [])
    return markdown("", blocks).lstrip("# \n")


def write(out: Path, title: str, facts: list[str], variants: list[Variant]) -> dict[str, Path]:
    figure = plot(variants, out / "figures" / "tradeoff.png")
    blocks = [
        Block("h2", "Run"),
        *(Block("p", f) for f in facts),
        Block("h2", "Variants"),
        Block(
            "p",
            "Agreement: share of validation images whose top-1 prediction equals the original model's. Peak "
            "memory: resident memory a fresh process adds, after its imports and a first torch op, to load the variant and run one "
            "batch (Linux).",
        ),
        table(variants),
        Block("img", str(figure.relative_to(out))),
    ]
    checked = claims(variants)
    if checked is not None:
        blocks += [Block("h2", "The seed's claims, checked"), checked]
    return write_documents(out, "report", title, blocks)
