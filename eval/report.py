"""The probe's outputs: ``metrics.json``, ``report.md``, ``report.html`` and PNG figures.

The documents are rendered by the core's report pieces (:mod:`selfsup.report`, :mod:`selfsup.plots`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from selfsup import plots
from selfsup.config import save_config
from selfsup.files import atomic_write_bytes
from selfsup.metrics import confusion, per_class_accuracy
from selfsup.report import Block, pct, slug, versions, write_documents


def _knn_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    return pct(entry["top1"]) + (
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
                pct(best5),
                pct(lin.get("top1")),
                pct(lin.get("top5")),
            ]
        )
    return Block("table", headers=headers, rows=rows)


def _blocks(out: Path, config, metrics: dict[str, Any], runs, info) -> list[Block]:
    """The report in reading order: what was measured, the summary, each protocol, per class, figures, the run."""
    blocks = [_intro(metrics, runs, info), Block("h2", "Summary"), _summary(metrics, list(config.ks))]
    if "knn" in config.methods:
        blocks += _knn_section(out, config, runs)
    if "linear" in config.methods:
        blocks += _linear_section(runs)
    per_class, figures = _per_model(out, config, runs, info)
    blocks += [Block("h2", "Per-class top-1"), per_class, Block("h2", "Figures"), *figures]
    return blocks + _run_section(metrics, runs)


def _intro(metrics: dict[str, Any], runs, info) -> Block:
    return Block(
        "p",
        f"Dataset **{metrics['dataset']}** ({len(info.classes)} classes), feature **{metrics['feature']}**, "
        f"methods {', '.join(metrics['methods'])}. Accuracies in percent on the `val` split "
        f"({runs[0].metrics['n_test']} images; train: {runs[0].metrics['n_train']}).",
    )


def _knn_section(out: Path, config, runs) -> list[Block]:
    curves = {r.source.name: {int(k): v["top1"] for k, v in r.metrics["knn"].items()} for r in runs}
    figure = plots.plot_accuracy_vs_k(curves, out / "figures" / "knn_vs_k.png")
    return [
        Block("h2", "kNN accuracy against k"),
        Block("p", f"Weighted kNN (DINO protocol): cosine similarity, votes exp(sim/{config.temperature})."),
        Block("img", str(figure.relative_to(out))),
    ]


def _linear_section(runs) -> list[Block]:
    lin_rows = [[r.source.name, _details(r.metrics["linear"])] for r in runs]
    return [
        Block("h2", "Linear probe"),
        Block("p", protocol_summary(runs[0].metrics["linear"])),
        Block("table", headers=["model", "protocol details"], rows=lin_rows),
    ]


def _per_model(out: Path, config, runs, info) -> tuple[Block, list[Block]]:
    """The per-class table (a column per model) and each model's figures, from its last method's predictions."""
    names = list(info.classes)
    per_class_rows: dict[str, list[str]] = {c: [] for c in names}
    headers = ["class"]
    figures: list[Block] = []
    for run in runs:
        method, preds = next(reversed(run.predictions.items()))  # linear when run, else the best kNN
        acc = _record_per_class(run, method, preds, names)
        headers.append(f"{run.source.name}: {method}")
        for c, a in zip(names, acc):
            per_class_rows[c].append(pct(float(a)))
        figures += _model_figures(out, run, method, preds, names, config.seed)
    table = Block("table", headers=headers, rows=[[c, *v] for c, v in per_class_rows.items()])
    return table, figures


def _record_per_class(run, method: str, preds: np.ndarray, names: list[str]) -> np.ndarray:
    """Per-class top-1 of ``preds``, also kept in the model's metrics (metrics.json)."""
    acc = per_class_accuracy(run.test_labels, preds, len(names))
    run.metrics["per_class"] = {
        "method": method,
        "top1": {c: (None if np.isnan(a) else round(float(a), 2)) for c, a in zip(names, acc)},
    }
    return acc


def _model_figures(
    out: Path, run, method: str, preds: np.ndarray, names: list[str], seed: int
) -> list[Block]:
    """A confusion matrix (up to plots.MAX_CONFUSION_CLASSES classes) and an embedding of the test features."""
    fig, name, blocks = out / "figures", slug(run.source.name), []
    if len(names) <= plots.MAX_CONFUSION_CLASSES:
        path = plots.plot_confusion(
            confusion(run.test_labels, preds, len(names)),
            names,
            f"{run.source.name}: {method}",
            fig / f"confusion_{name}.png",
        )
        blocks += [
            Block("p", f"Confusion matrix, {run.source.name} ({method}):"),
            Block("img", str(path.relative_to(out))),
        ]
    path, how = plots.plot_embedding(
        run.test_features, run.test_labels, names, run.source.name, fig / f"embedding_{name}.png", seed=seed
    )
    run.metrics["embedding"] = how
    return [
        *blocks,
        Block("p", f"{how} of the test features, {run.source.name}:"),
        Block("img", str(path.relative_to(out))),
    ]


def _run_section(metrics: dict[str, Any], runs) -> list[Block]:
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
    return [
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


def write_report(out: Path, config, metrics: dict[str, Any], runs, info) -> dict[str, Path]:
    """Write figures, report.md, report.html, metrics.json and the resolved config.yaml into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    metrics["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    metrics["versions"] = versions()
    title = f"Probe report: {metrics['dataset']}"
    blocks = _blocks(out, config, metrics, runs, info)
    paths = {
        "config": save_config(config, out / "config.yaml"),
        "metrics": out / "metrics.json",
    }
    atomic_write_bytes(paths["metrics"], json.dumps(metrics, indent=2, default=str).encode())
    paths.update(write_documents(out, "report", title, blocks))
    return paths
