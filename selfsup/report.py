"""Report pieces every stage uses: one list of blocks rendered as Markdown and as HTML.

Both documents come from the same :class:`Block` list, so they always say the same thing; figures
(:mod:`selfsup.plots`) are referenced by relative path. Written atomically.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.checkpoint import library_versions
from selfsup.files import atomic_write_bytes


@dataclass
class Block:
    kind: str  # "h2" | "p" | "table" | "img"
    text: str = ""
    headers: list[str] | None = None
    rows: list[list[str]] | None = None


def pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.2f}"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "model"


def versions() -> dict[str, str]:
    versions = library_versions()
    for module in ("numpy", "sklearn", "faiss", "accelerate", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # optional libraries (faiss) may be absent
            continue
    return versions


def markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "img":
            lines += [f"![{Path(b.text).stem}]({b.text})", ""]
        else:
            lines += ["| " + " | ".join(b.headers) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in b.rows]
            lines.append("")
    return "\n".join(lines)


def inline(text: str) -> str:
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(title: str, blocks: list[Block]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b.kind == "h2":
            body.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            body.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "img":
            body.append(f'<img src="{html.escape(b.text)}" alt="{html.escape(Path(b.text).stem)}">')
        else:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_documents(out: Path, stem: str, title: str, blocks: list[Block]) -> dict[str, Path]:
    """``out/stem.md`` and ``out/stem.html`` from the same blocks."""
    paths = {"md": out / f"{stem}.md", "html": out / f"{stem}.html"}
    atomic_write_bytes(paths["md"], markdown(title, blocks).encode())
    atomic_write_bytes(paths["html"], to_html(title, blocks).encode())
    return paths
