"""The report's figures as PNG files (matplotlib, Agg backend: no display needed), each written
atomically: ``savefig`` writes in place, so a full disk would leave a torn image behind."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from selfsup.files import atomic_path

MAX_CONFUSION_CLASSES = 100
MAX_EMBEDDING_POINTS = 5000


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix; class names on the axes up to 30 classes."""
    n = matrix.shape[0]
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.25 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_curves(curves: dict[str, dict[float, float]], xlabel: str, ylabel: str, path: Path) -> Path:
    """One line per named curve of (x, y) points, e.g. validation accuracy against epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_k(curves: dict[str, dict[int, float]], path: Path) -> Path:
    """kNN top-1 against k, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]  # overlapping curves stay visible
    for i, (name, points) in enumerate(curves.items()):
        ks = sorted(points)
        marker, line = styles[i % len(styles)]
        ax.plot(ks, [points[k] for k in ks], marker=marker, linestyle=line, label=name, alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grouped_bars(
    values: dict[str, dict[str, float]], ylabel: str, path: Path, groups: Sequence[str] | None = None
) -> Path:
    """One bar per series within each group, e.g. top-1 error per corruption (groups) per method."""
    series = list(values)
    groups = list(groups or next(iter(values.values())))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(groups) * max(1, len(series) / 2)), 4))
    x = np.arange(len(groups))
    for i, name in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [values[name][g] for g in groups], width, label=name)
    ax.set_xticks(x, [g.replace("_", " ") for g in groups], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(series), 4))
    return _save(fig, path)


def plot_labelled_points(
    points: dict[str, tuple[float, float, float]], xlabel: str, ylabel: str, title: str, path: Path
) -> Path:
    """One labelled marker per name at (x, y) with area ``size``, e.g. accuracy against latency."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y, size) in points.items():
        ax.scatter(x, y, s=size)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates by UMAP when installed, else PCA; returns (coords, method)."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the geometry kNN sees
    if len(x) >= 20:
        try:
            import umap

            return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(x), "UMAP"
        except ImportError:
            pass
    from sklearn.decomposition import PCA

    if len(x) < 2 or x.shape[1] < 2:
        return np.zeros((len(x), 2), np.float32), "none"
    return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"


def plot_embedding(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str,
    path: Path,
    seed: int = 0,
) -> tuple[Path, str]:
    """Scatter of (a subsample of) test features in 2-D, coloured by class."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    if len(idx) > MAX_EMBEDDING_POINTS:
        idx = np.sort(rng.choice(idx, MAX_EMBEDDING_POINTS, replace=False))
    coords, method = embed_2d(np.asarray(features)[idx], seed)
    labels = np.asarray(labels)[idx]
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap(
        "tab10" if len(class_names) <= 10 else "tab20" if len(class_names) <= 20 else "nipy_spectral"
    )
    colours = labels / max(len(class_names) - 1, 1) if len(class_names) > 20 else labels
    ax.scatter(
        coords[:, 0],
        coords[:, 1],
        c=colours,
        cmap=cmap,
        s=6,
        alpha=0.8,
        vmin=0,
        vmax=1 if len(class_names) > 20 else cmap.N - 1,
    )
    if len(class_names) <= 20:
        for c, name in enumerate(class_names):
            ax.scatter([], [], color=cmap(c), label=name, s=12)
        ax.legend(fontsize=7, markerscale=1.5, loc="best", ncol=2 if len(class_names) > 10 else 1)
    ax.set_title(f"{title} ({method} of test features)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path), method


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """``fig.savefig`` to a temporary file renamed onto ``path`` (see :func:`selfsup.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)
