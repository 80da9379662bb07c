"""Validation of a classifier during fine-tuning, and the report at the end.

Every evaluation runs the network in eval mode (BatchNorm statistics frozen, dropout and drop path
off), each process on its shard of the validation set, gathered in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from selfsup import plots
from selfsup.files import dumps_strict
from selfsup.metrics import confusion, per_class_accuracy, topk_accuracy
from selfsup.report import Block, pct, versions, write_documents


@dataclass
class Evaluation:
    top1: float
    top5: float
    loss: float
    labels: np.ndarray
    predictions: np.ndarray

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss}


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> Evaluation:
    """Top-1/top-5 (%) and cross-entropy of ``model`` on ``loader`` (a prepared, sharded loader)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for images, targets in loader:
            with accelerator.autocast():
                out = model(images)
            out, targets = accelerator.gather_for_metrics((out.float(), targets))
            logits.append(out.cpu())
            labels.append(targets.cpu())
    finally:
        model.train(was_training)
    scores, y = torch.cat(logits), torch.cat(labels)
    loss = float(F.cross_entropy(scores, y))
    top1, top5 = topk_accuracy(scores.numpy(), y.numpy(), np.arange(scores.shape[1]))
    return Evaluation(top1, top5, loss, y.numpy(), scores.argmax(1).numpy())


def write_report(
    out: Path,
    title: str,
    facts: list[str],
    history: list[dict[str, Any]],
    shown: Evaluation,
    which: str,
    classes: list[str],
) -> dict[str, Path]:
    """report.md/html: the run's facts, the validation curves, and per-class accuracy and confusion
    matrix of the ``which`` ("best" or "last") evaluation ``shown``."""
    fig = out / "figures"
    n = len(classes)
    curves = {"val top-1": {r["epoch"]: r["top1"] for r in history}}
    if any("ema_top1" in r for r in history):
        curves["EMA val top-1"] = {r["epoch"]: r["ema_top1"] for r in history if "ema_top1" in r}
    blocks = [
        Block("h2", "Run"),
        *(Block("p", fact) for fact in facts),
        Block("h2", "Validation"),
        Block(
            "table",
            headers=["epoch", "top-1", "top-5", "loss", *(["EMA top-1"] if len(curves) > 1 else [])],
            rows=[
                [
                    f"{r['epoch']:g}",
                    pct(r["top1"]),
                    pct(r["top5"]),
                    "–" if r["loss"] is None else f"{r['loss']:.4f}",
                    *([pct(r.get("ema_top1"))] if len(curves) > 1 else []),
                ]
                for r in history
            ],
        ),
        Block(
            "img", str(plots.plot_curves(curves, "epoch", "top-1 (%)", fig / "accuracy.png").relative_to(out))
        ),
    ]
    accuracy = per_class_accuracy(shown.labels, shown.predictions, n)
    blocks += [
        Block("h2", f"Per-class top-1 ({which} evaluation)"),
        Block(
            "table", headers=["class", "top-1"], rows=[[c, pct(float(a))] for c, a in zip(classes, accuracy)]
        ),
    ]
    if n <= plots.MAX_CONFUSION_CLASSES:
        path = plots.plot_confusion(
            confusion(shown.labels, shown.predictions, n),
            classes,
            f"{which} evaluation",
            fig / "confusion.png",
        )
        blocks += [Block("h2", "Confusion matrix"), Block("img", str(path.relative_to(out)))]
    blocks.append(Block("p", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())))
    return write_documents(out, "report", title, blocks)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One evaluation per line of ``metrics.jsonl`` (strict JSON: NaN is written as null)."""
    with open(path, "a") as f:
        f.write(dumps_strict(record) + "\n")
