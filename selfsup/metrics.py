"""Scores every stage reports the same way: top-k and per-class accuracy, and the finite check.

Top-k follows the ImageNet convention (a hit when the true class is among the k highest scores;
``accuracy`` in the official MoCo v3 ``main_lincls.py`` and MAE ``util/misc.py``), in percent.
"""

from __future__ import annotations

import numpy as np
import torch

from selfsup.errors import UsageError


def check_finite(values: np.ndarray | torch.Tensor, what: str = "features") -> None:
    """Raise a :class:`UsageError` when ``values`` hold NaN or inf.

    Non-finite features come from a backbone that diverged or a broken checkpoint; every protocol
    would turn them into silent nonsense (NaN similarities, a logistic regression that fails).
    """
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not finite:
        raise UsageError(f"{what} contain NaN or inf: the backbone diverged or the checkpoint is broken")


def ranked_accuracy(
    ranked: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of predictions ranked best first, shape (n, <= 5)."""
    ranked, labels = np.asarray(ranked), np.asarray(labels)
    top1 = 100.0 * float(np.mean(ranked[:, 0] == labels))
    top5 = 100.0 * float(np.mean((ranked[:, :5] == labels[:, None]).any(axis=1)))
    return top1, top5


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of class ``scores`` (n, len(classes)) against ``labels``."""
    return ranked_accuracy(classes[np.argsort(-scores, axis=1)[:, :5]], labels)


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class), every class a row and a column even when absent."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predictions, labels=np.arange(num_classes)).astype(np.int64)


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Percent correct per class; NaN for classes absent from ``labels``."""
    matrix = confusion(labels, predictions, num_classes)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * np.diag(matrix) / np.maximum(totals, 1), np.nan)
