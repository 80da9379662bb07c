"""The probe's outputs: ``metrics.json``, ``report.md``, ``report.html`` and PNG figures.

Both documents are rendered from one list of blocks (headings, paragraphs, tables, images), so the
Markdown and the HTML always say the same thing. Figures are referenced by relative path.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.checkpoint import library_versions
from selfsup.config import save_config
from selfsup.eval import plots
from selfsup.files import atomic_write_bytes
from selfsup.metrics import confusion, per_class_accuracy


@dataclass
class Block:
    kind: str  # "h2" | "p" | "table" | "img"
    text: str = ""
    headers: list[str] | None = None
    rows: list[list[str]] | None = None


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.2f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "model"


def _versions() -> dict[str, str]:
    versions = library_versions()
    for module in ("numpy", "sklearn", "faiss", "accelerate", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # optional libraries (faiss) may be absent
            continue
    return versions


def _knn_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    return _pct(entry["top1"]) + (
        f" (k={entry['k_used']})" if str(entry["k_used"]) != str(entry.get("k", entry["k_used"])) else ""
    )


def _details(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return (
                "{" + ", ".join(f"{fmt(float(k)) if _number(k) else k}: {fmt(x)}" for k, x in v.items()) + "}"
            )
        return str(v)

    return "; ".join(f"{k} {fmt(v)}" for k, v in values.items() if k not in ("top1", "top5"))


def _number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def protocol_summary(linear: dict[str, Any]) -> str:
    """One sentence naming the linear protocol, its source and the hyper-parameters actually used."""
    if linear.get("protocol") == "sklearn":
        return (
            "Protocol **sklearn** (CLIP, Radford et al. 2021, App. A.3): L-BFGS logistic regression on standardised "
            f"features; C {linear.get('C')} chosen on {linear.get('n_val', '?')} held-out training samples (scaler "
            f"fitted on the other {linear.get('n_fit', '?')}), then refit on all of train (its own scaler) from the "
            f"same {linear.get('start', 'cold')} start; augment no."
        )
    warmup = f" ({linear['warmup_epochs']} warm-up)" if linear.get("warmup_epochs") else ""
    return (
        f"Protocol **{linear.get('protocol')}** ({linear.get('source')}): {linear.get('optimizer')}, "
        f"BatchNorm {'yes' if linear.get('batchnorm') else 'no'}, lr used {linear.get('lr', 0):.4g} "
        f"(base {linear.get('base_lr')} × batch {linear.get('batch_size')} / 256), batch {linear.get('batch_size')}, "
        f"{linear.get('epochs')} epochs{warmup}, schedule {linear.get('schedule')}, momentum {linear.get('momentum')}, "
        f"weight decay {linear.get('weight_decay')}, augment {'yes' if linear.get('augment') else 'no'}."
    )


def _summary(metrics: dict[str, Any], ks: list[int]) -> Block:
    headers = [
        "model",
        "kind",
        "dim",
        *[f"kNN k={k} top-1" for k in ks],
        "kNN best top-5",
        "linear top-1",
        "linear top-5",
    ]
    rows = []
    for m in metrics["models"]:
        knn = m.get("knn", {})
        best5 = max((v["top5"] for v in knn.values()), default=None)
        lin = m.get("linear", {})
        rows.append(
            [
                m["name"],
                m["kind"],
                str(m["feature_dim"]),
                *[_knn_cell(knn.get(str(k))) for k in ks],
                _pct(best5),
                _pct(lin.get("top1")),
                _pct(lin.get("top5")),
            ]
        )
    return Block("table", headers=headers, rows=rows)


def _blocks(out: Path, config, metrics: dict[str, Any], runs, info) -> list[Block]:
    fig = out / "figures"
    blocks = [
        Block(
            "p",
            f"Dataset **{metrics['dataset']}** ({len(info.classes)} classes), feature **{metrics['feature']}**, "
            f"methods {', '.join(metrics['methods'])}. Accuracies in percent on the `val` split "
            f"({runs[0].metrics['n_test']} images; train: {runs[0].metrics['n_train']}).",
        ),
        Block("h2", "Summary"),
        _summary(metrics, list(config.ks)),
    ]
    if "knn" in config.methods:
        blocks += [
            Block("h2", "kNN accuracy against k"),
            Block(
                "p", f"Weighted kNN (DINO protocol): cosine similarity, votes exp(sim/{config.temperature})."
            ),
            Block(
                "img",
                str(
                    plots.plot_accuracy_vs_k(
                        {
                            r.source.name: {int(k): v["top1"] for k, v in r.metrics["knn"].items()}
                            for r in runs
                        },
                        fig / "knn_vs_k.png",
                    ).relative_to(out)
                ),
            ),
        ]
    if "linear" in config.methods:
        lin_rows = [[r.source.name, _details(r.metrics["linear"])] for r in runs]
        blocks += [
            Block("h2", "Linear probe"),
            Block("p", protocol_summary(runs[0].metrics["linear"])),
            Block("table", headers=["model", "protocol details"], rows=lin_rows),
        ]
    n_classes = len(info.classes)
    names = list(info.classes)
    per_class_rows: dict[str, list[str]] = {c: [] for c in names}
    headers = ["class"]
    figures: list[Block] = []
    for run in runs:
        method, preds = next(reversed(run.predictions.items()))  # linear when run, else the best kNN
        acc = per_class_accuracy(run.test_labels, preds, n_classes)
        run.metrics["per_class"] = {
            "method": method,
            "top1": {c: (None if np.isnan(a) else round(float(a), 2)) for c, a in zip(names, acc)},
        }
        headers.append(f"{run.source.name}: {method}")
        for c, a in zip(names, acc):
            per_class_rows[c].append(_pct(float(a)))
        slug = _slug(run.source.name)
        if n_classes <= plots.MAX_CONFUSION_CLASSES:
            path = plots.plot_confusion(
                confusion(run.test_labels, preds, n_classes),
                names,
                f"{run.source.name}: {method}",
                fig / f"confusion_{slug}.png",
            )
            figures += [
                Block("p", f"Confusion matrix, {run.source.name} ({method}):"),
                Block("img", str(path.relative_to(out))),
            ]
        path, how = plots.plot_embedding(
            run.test_features,
            run.test_labels,
            names,
            run.source.name,
            fig / f"embedding_{slug}.png",
            seed=config.seed,
        )
        run.metrics["embedding"] = how
        figures += [
            Block("p", f"{how} of the test features, {run.source.name}:"),
            Block("img", str(path.relative_to(out))),
        ]
    blocks += [
        Block("h2", "Per-class top-1"),
        Block("table", headers=headers, rows=[[c, *v] for c, v in per_class_rows.items()]),
    ]
    blocks += [Block("h2", "Figures"), *figures]
    model_rows = [
        [
            r.source.name,
            r.source.kind,
            r.source.path or "–",
            (r.source.weights_sha256 or "")[:16] or f"seed {r.source.seed}",
            r.source.spec.arch,
            f"{r.source.spec.img_size}/{r.source.spec.patch_size}",
            f"{r.metrics['extract_seconds']}",
        ]
        for r in runs
    ]
    blocks += [
        Block("h2", "Run"),
        Block(
            "table",
            headers=["model", "kind", "checkpoint", "sha256 / seed", "arch", "img/patch", "extract s"],
            rows=model_rows,
        ),
        Block(
            "p",
            f"Wall time (features and probes) {metrics['wall_seconds']} s; cached feature sets reused: {len(metrics['cache_hits'])}; "
            f"created {metrics['created']}.",
        ),
        Block("p", "Versions: " + ", ".join(f"{k} {v}" for k, v in metrics["versions"].items())),
        Block(
            "p",
            f"Machine: {metrics.get('machine', 'not recorded')}; torch threads {metrics.get('torch_threads', '?')}.",
        ),
    ]
    return blocks


def _markdown(title: str, blocks: list[Block]) -> str:
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


def _inline(text: str) -> str:
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(title: str, blocks: list[Block]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b.kind == "h2":
            body.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
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


def write_report(out: Path, config, metrics: dict[str, Any], runs, info) -> dict[str, Path]:
    """Write figures, report.md, report.html, metrics.json and the resolved config.yaml into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    metrics["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    metrics["versions"] = _versions()
    title = f"Probe report: {metrics['dataset']}"
    blocks = _blocks(out, config, metrics, runs, info)
    paths = {
        "config": save_config(config, out / "config.yaml"),
        "metrics": out / "metrics.json",
        "md": out / "report.md",
        "html": out / "report.html",
    }
    atomic_write_bytes(paths["metrics"], json.dumps(metrics, indent=2, default=str).encode())
    atomic_write_bytes(paths["md"], _markdown(title, blocks).encode())
    atomic_write_bytes(paths["html"], _html(title, blocks).encode())
    return paths
