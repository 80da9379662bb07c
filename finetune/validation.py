"""Validation of a classifier during fine-tuning, and the report at the end.

Every evaluation runs the network in eval mode (BatchNorm statistics frozen, dropout and drop path
off), each process on its shard of the validation set, gathered in order. Unreadable images are
skipped: their placeholders (:class:`~selfsup.imagefolder.MarkSkipped`) are removed after the gather,
so the counts, accuracies and figures are of the images evaluated, each once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader

from selfsup import plots
from selfsup.files import dumps_strict
from selfsup.imagefolder import (
    SHOWN,
    find_corrupt_log,
    listing,
    merge_corrupt,
    readable,
    skipped_files,
    warn_once,
)
from selfsup.metrics import confusion, per_class_accuracy, topk_accuracy
from selfsup.report import Block, pct, versions, write_documents


@dataclass
class Evaluation:
    top1: float
    top5: float
    loss: float
    labels: np.ndarray
    predictions: np.ndarray
    skipped: list[str] = field(default_factory=list)  # unreadable files, not counted

    def summary(self, prefix: str = "") -> dict[str, Any]:
        """The metrics line's fields; ``images``: how many were evaluated (unreadable ones left out)."""
        record = {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss}
        record[f"{prefix}images"] = len(self.labels)
        if self.skipped:
            record[f"{prefix}skipped"] = self.skipped
        return record


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
            keep = readable(targets)
            logits.append(out[keep].cpu())
            labels.append(targets[keep].cpu())
    finally:
        model.train(was_training)
    scores, y = torch.cat(logits), torch.cat(labels)
    loss = float(F.cross_entropy(scores, y))
    top1, top5 = topk_accuracy(scores.numpy(), y.numpy(), np.arange(scores.shape[1]))
    skipped = _skipped_everywhere(accelerator, loader.dataset)
    return Evaluation(top1, top5, loss, y.numpy(), scores.argmax(1).numpy(), skipped)


def _skipped_everywhere(accelerator: Accelerator, dataset: Any) -> list[str]:
    """The unreadable validation files of every process, merged into this process's corrupt log
    (so the count and the final report are whole), warned of once."""
    log = find_corrupt_log(dataset)
    if log is not None and accelerator.num_processes > 1:
        merge_corrupt(dataset, gather_object(log.entries()))
    skipped = skipped_files(dataset)
    if skipped and accelerator.is_main_process:
        warn_once(
            f"validation, not counted: {len(skipped)} unreadable image file(s) skipped: {listing(skipped, SHOWN)}"
        )
    return skipped


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
    blocks += _skipped_blocks(shown)
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


def _skipped_blocks(shown: Evaluation) -> list[Block]:
    """The unreadable validation files by path (none: no block)."""
    if not shown.skipped:
        return []
    files = ", ".join(f"`{path}`" for path in shown.skipped)
    return [
        Block(
            "p",
            f"{len(shown.labels)} validation images evaluated; {len(shown.skipped)} unreadable file(s) "
            f"skipped and not counted: {files}.",
        )
    ]


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One evaluation per line of ``metrics.jsonl`` (strict JSON: NaN is written as null)."""
    with open(path, "a") as f:
        f.write(dumps_strict(record) + "\n")
