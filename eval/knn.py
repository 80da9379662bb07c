"""Weighted k-nearest-neighbour classification on frozen features, the DINO protocol.

Wu et al. (2018) and DINO (Caron et al., 2021, ``eval_knn.py``): features are L2-normalised,
similarity is cosine, the k nearest training samples vote for their class with weight
exp(similarity / T), T = 0.07. The neighbour search runs once for the largest k; every smaller k
reuses its first neighbours (search results are sorted), so evaluating k in {10, 20, 100, 200}
costs one search.

Backends (same neighbours, same predictions):

* ``faiss-gpu``: ``faiss.knn_gpu`` on a GPU faiss sees (k up to 2048, faiss' GPU limit);
* ``faiss-cpu``: an exact inner-product index (``IndexFlatIP``);
* ``torch``: chunked matrix products on the features' device, bounded memory, no faiss needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from selfsup.errors import UsageError

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch"]
FAISS_GPU_MAX_K = 2048
DEFAULT_KS = (10, 20, 100, 200)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpus() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "StandardGpuResources") else 0


def resolve_backend(backend: Backend, k: int) -> str:
    if backend == "auto":
        if faiss_gpus() > 0 and k <= FAISS_GPU_MAX_K:
            return "faiss-gpu"
        return "faiss-cpu" if _faiss() is not None else "torch"
    if backend.startswith("faiss") and _faiss() is None:
        raise UsageError(f"kNN backend '{backend}' needs faiss: pip install faiss-cpu (or faiss-gpu-cu12)")
    if backend == "faiss-gpu" and faiss_gpus() == 0:
        raise UsageError("kNN backend 'faiss-gpu' found no GPU through faiss; use backend=auto or faiss-cpu")
    if backend == "faiss-gpu" and k > FAISS_GPU_MAX_K:
        raise UsageError(f"faiss-gpu supports k <= {FAISS_GPU_MAX_K}, got k={k}; use backend=torch for larger k")
    return backend


def _torch_search(train: torch.Tensor, test: torch.Tensor, k: int, chunk_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Bounded memory: each chunk's similarity matrix holds at most ~chunk_elems floats.
    rows = max(1, chunk_elems // max(1, train.shape[0]))
    sims, idx = [], []
    for start in range(0, test.shape[0], rows):
        s, i = (test[start : start + rows] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def search(
    train: torch.Tensor, test: torch.Tensor, k: int, backend: Backend = "auto", chunk_elems: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The ``k`` most cosine-similar training rows for each test row: (similarities, indices, backend)."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    name = resolve_backend(backend, k)
    if name == "torch":
        sims, idx = _torch_search(train, test, k, chunk_elems)
        return sims, idx, name
    faiss = _faiss()
    xb = train.cpu().numpy()
    xq = test.cpu().numpy()
    if name == "faiss-gpu":
        resources = faiss.StandardGpuResources()
        dist, ind = faiss.knn_gpu(resources, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        dist, ind = index.search(xq, k)
    return torch.from_numpy(dist), torch.from_numpy(ind).long(), name


def vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """Class scores (n, C): each neighbour adds exp(sim / T) to its class."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


@dataclass
class KnnResult:
    k: int  # the k actually used (at most the number of training samples)
    top1: float  # percent
    top5: float
    predictions: torch.Tensor  # (n_test,) top-1 class


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: Backend = "auto",
) -> dict[int, KnnResult]:
    """kNN predictions (and accuracies when ``test_labels`` is given) for every k in ``ks``.

    A k larger than the training set is clamped to its size (the result says which k was used).
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise UsageError("kNN needs at least one training and one test sample")
    if train_features.shape[1] != test_features.shape[1]:
        raise UsageError(f"train and test features differ in width: {train_features.shape[1]} vs {test_features.shape[1]}")
    for name, feats in (("train", train_features), ("test", test_features)):
        if not torch.isfinite(feats).all():
            raise UsageError(f"{name} features contain NaN or inf: the backbone diverged or the checkpoint is broken")
    train_labels = train_labels.long().cpu()
    num_classes = num_classes or int(train_labels.max()) + 1
    n_train = train_features.shape[0]
    k_max = min(max(ks), n_train)
    sims, idx, _ = search(train_features, test_features, k_max, backend)
    sims, idx = sims.cpu(), idx.cpu()
    neighbour_labels = train_labels[idx]
    results = {}
    for k in ks:
        used = min(k, n_train)
        scores = vote(sims[:, :used], neighbour_labels[:, :used], num_classes, temperature)
        top = scores.topk(min(5, num_classes), dim=1).indices
        top1 = top5 = float("nan")
        if test_labels is not None:
            truth = test_labels.long().cpu()[:, None]
            top1 = 100.0 * (top[:, :1] == truth).any(1).float().mean().item()
            top5 = 100.0 * (top == truth).any(1).float().mean().item()
        results[k] = KnnResult(used, top1, top5, top[:, 0])
    return results
