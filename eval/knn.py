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

Indexes. ``flat`` is the exact search above, the published protocol. ``ivf`` (``IndexIVFFlat``)
and ``ivfpq`` (``IndexIVFPQ``) are faiss' approximate inverted-file indexes, for training sets
that exact search cannot serve (ImageNet-22K: ~14 M images, 43 GB of ViT-B features in fp32).
Both use the inner product on L2-normalised features (= cosine), are trained on a seeded sample
of training rows with faiss' k-means seeded, and are filled in chunks, so the training features
can stay memory-mapped. ``ivfpq`` stores 1 byte per sub-quantizer instead of 4 per dimension; it
fetches 4k candidates and keeps the k of highest exact cosine similarity, so the votes use the
protocol's weights. An approximate search can find fewer than k neighbours (index -1) when the
probed lists hold fewer than k vectors: those slots vote with weight 0. ``auto`` is ``flat`` below
:data:`AUTO_APPROX_MIN_TRAIN` training rows, then ``ivf``, or ``ivfpq`` when the IVF index would
not fit the memory budget. With several GPUs, faiss-gpu shards the IVF index across them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.errors import UsageError
from selfsup.metrics import check_finite, ranked_accuracy

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch"]
Index = Literal["auto", "flat", "ivf", "ivfpq"]
INDEXES = ("auto", "flat", "ivf", "ivfpq")
FAISS_GPU_MAX_K = 2048
DEFAULT_KS = (10, 20, 100, 200)

# ``auto`` stays exact up to 2 M training rows: ImageNet-1K (1,281,167 training images, the
# largest set DINO's exact kNN numbers are published on) must stay comparable with the papers,
# and its flat index (3.9 GB for ViT-B's 768-d fp32 features) fits any evaluation machine.
# ImageNet-22K (~14.2 M images) is above it and goes approximate.
AUTO_APPROX_MIN_TRAIN = 2_000_000
# ``auto`` picks ``ivfpq`` over ``ivf`` when the IVF-Flat index (4 bytes per dimension + an 8-byte
# id per row) exceeds this share of the memory budget (available RAM; on GPU also the GPUs' free
# memory summed over the shards): the rest stays for the features, queries and search buffers.
AUTO_MEMORY_SHARE = 0.5
# faiss' k-means warns below 39 training points per centroid (faiss/Clustering.cpp).
MIN_POINTS_PER_CENTROID = 39
# Code sizes (bytes per vector) GpuIndexIVFPQ supports (faiss/gpu/impl/IVFPQ.cu,
# isSupportedPQCodeLength); the default ``pq_m`` is one of them so the index can move to a GPU.
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
# Same file: codes of 56, 64 and 96 bytes are "only supported with float16" lookup tables.
GPU_PQ_FLOAT16_FROM = 56
# Rows normalised and added to an IVF index at once: bounds the normalised copy to 256 MiB at 1024-d.
ADD_CHUNK_ROWS = 1 << 16


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
        raise UsageError(
            f"faiss-gpu supports k <= {FAISS_GPU_MAX_K}, got k={k}; use backend=torch for larger k"
        )
    return backend


@dataclass
class IndexOptions:
    """Settings of the approximate indexes (``None``: the default, computed from the data).

    * ``nlist`` (inverted lists): round(4 sqrt(N)), the low end of faiss' guideline "between
      4 sqrt(N) and 16 sqrt(N)" (faiss wiki, "Guidelines to choose an index"), at most
      N / 39 so k-means has the 39 points per centroid faiss asks for;
    * ``nprobe`` (lists scanned per query): max(32, nlist / 32), at most nlist. On 200,000
      clustered 384-d features (benchmarks/bench_knn.py, nlist 1789) nlist / 32 gave recall@20
      0.81 and kNN top-1 within 0.5 point of exact, nlist / 64 recall 0.69 and -0.75 point;
    * ``pq_m`` (sub-quantizers, bytes per vector at 8 bits): the largest GPU-supported code size
      that divides the width with at least 8 dimensions per sub-quantizer (48 for 384-d, 96 for
      768-d: 32x smaller than fp32); the exact re-scoring of 4k candidates recovers most of the
      ranking PQ loses (recall in docs/eval.md);
    * ``train_rows``: k-means sample, 39 per list (faiss' minimum; the k-means is the build's
      largest cost on CPU), for ivfpq at least 39 x 2^pq_bits (the PQ k-means' own minimum);
    * ``seed``: the sample and faiss' k-means (coarse and PQ) seed, so results are reproducible;
    * ``auto_min_train`` / ``memory_bytes``: ``auto``'s thresholds (tests set them small).
    """

    nlist: int | None = None
    nprobe: int | None = None
    pq_m: int | None = None
    pq_bits: int = 8
    train_rows: int | None = None
    seed: int = 0
    # ivfpq: fetch rescore_factor x k candidates, keep the k of highest exact cosine (0: keep the PQ
    # estimates). Like faiss' IndexRefine k_factor, but on the caller's features: no second copy.
    rescore_factor: int = 4
    auto_min_train: int = AUTO_APPROX_MIN_TRAIN
    memory_bytes: int | None = None  # None: measured (available RAM, GPU free memory)

    def resolved(self, n: int, dim: int, pq: bool = False) -> tuple[int, int, int, int]:
        """(nlist, nprobe, pq_m, train_rows) for ``n`` training rows of width ``dim`` (``pq``: ivfpq)."""
        self._check()
        nlist = self._nlist(n)
        nprobe = min(self.nprobe or max(32, nlist // 32), nlist)
        return nlist, nprobe, self._pq_m(dim), self._train_rows(n, nlist, pq)

    def _check(self) -> None:
        """Refuse set options outside their range (an unset one takes the default)."""
        for name in ("nlist", "nprobe", "pq_m", "train_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(
                    f"kNN index option {name} must be >= 1, got {value}; leave it unset for the default"
                )
        if self.rescore_factor < 0:
            raise UsageError(
                f"kNN index option rescore_factor must be >= 0 (0: no rescoring), got {self.rescore_factor}"
            )
        if not 1 <= self.pq_bits <= 16:
            raise UsageError(f"kNN index option pq_bits must be in 1..16 (8 is usual), got {self.pq_bits}")

    def _nlist(self, n: int) -> int:
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
        return min(nlist, n)

    def _pq_m(self, dim: int) -> int:
        pq_m = self.pq_m or max([m for m in GPU_PQ_CODE_BYTES if dim % m == 0 and dim // m >= 8] or [1])
        if dim % pq_m:
            raise UsageError(
                f"kNN index option pq_m={pq_m} must divide the feature width {dim}; pick a divisor of {dim}"
            )
        return pq_m

    def _train_rows(self, n: int, nlist: int, pq: bool) -> int:
        train_rows = self.train_rows or MIN_POINTS_PER_CENTROID * nlist
        if pq:
            codes = 2**self.pq_bits
            if n < codes:
                raise UsageError(
                    f"ivfpq with pq_bits={self.pq_bits} needs at least {codes} training rows, got {n}; "
                    "use index=flat or ivf, or a smaller pq_bits"
                )
            # The PQ k-means has 2^bits centroids per sub-quantizer: the same 39 points each.
            train_rows = max(train_rows, MIN_POINTS_PER_CENTROID * codes)
        return min(n, train_rows)


def _memory_budget(gpus: int) -> int:
    """Bytes an index may use: available RAM, and on GPU at most the GPUs' free memory together."""
    budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable page cache, AVPHYS does not
            budget = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    if gpus and torch.cuda.is_available():
        devices = range(min(gpus, torch.cuda.device_count()))
        budget = min(budget, sum(torch.cuda.mem_get_info(i)[0] for i in devices))
    return budget


def resolve_index(
    index: Index, n_train: int, dim: int, backend: str, options: IndexOptions | None = None
) -> str:
    """The index to build: ``flat``, ``ivf`` or ``ivfpq``. ``backend`` is a resolved backend."""
    options = options or IndexOptions()
    if index not in INDEXES:
        raise UsageError(f"unknown kNN index '{index}': expected one of {', '.join(INDEXES)}")
    if index == "auto":
        if backend == "torch" or n_train < options.auto_min_train:
            return "flat"
        gpus = faiss_gpus() if backend == "faiss-gpu" else 0
        budget = options.memory_bytes if options.memory_bytes is not None else _memory_budget(gpus)
        ivf_bytes = n_train * (4 * dim + 8)
        return "ivf" if ivf_bytes <= AUTO_MEMORY_SHARE * budget else "ivfpq"
    if index != "flat" and backend == "torch":
        if _faiss() is None:
            raise UsageError(
                f"kNN index '{index}' needs faiss (the torch backend searches exactly): "
                "pip install faiss-cpu (or faiss-gpu-cu12), or use index=flat"
            )
        raise UsageError(
            f"kNN index '{index}' needs a faiss backend, not torch: use backend=auto, faiss-cpu or faiss-gpu"
        )
    return index


def _torch_search(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_elems: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Bounded memory: each chunk's similarity matrix holds at most ~chunk_elems floats.
    rows = max(1, chunk_elems // max(1, train.shape[0]))
    sims, idx = [], []
    for start in range(0, test.shape[0], rows):
        s, i = (test[start : start + rows] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _flat_search(train: torch.Tensor, test: torch.Tensor, k: int, name: str, chunk_elems: int):
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    if name == "torch":
        return _torch_search(train, test, k, chunk_elems)
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
    return torch.from_numpy(dist), torch.from_numpy(ind).long()


def _normalised(rows: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(rows.float(), dim=1).cpu().numpy())


def _gpu_clustering_index(faiss, dim: int, gpus: int):
    """An index for the coarse k-means' assignments on all GPUs (set as ``IndexIVF.clustering_index``,
    faiss' hook for training the quantizer with another index); the CPU quantizer gets the centroids."""
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim), ngpu=gpus)


def _to_gpus(faiss, cpu_index, gpus: int, pq_m: int | None):
    """Move a trained, filled IVF index to the GPUs: sharded over several (each holds 1/gpus of
    the lists' contents, results merged by faiss), copied to the only one otherwise."""
    if gpus > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
    else:
        options = faiss.GpuClonerOptions()
    # IVFPQ: lookup tables in float16 from 56-byte codes on (required there). Left off for
    # IVF-Flat, where the same flag would store the vectors themselves in float16.
    options.useFloat16 = pq_m is not None and pq_m >= GPU_PQ_FLOAT16_FROM
    options.usePrecomputed = False  # precomputed IVFPQ tables serve only the L2 metric
    if gpus > 1:
        return faiss.index_cpu_to_all_gpus(cpu_index, co=options, ngpu=gpus)
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index, options)


def _set_nprobe(faiss, index, nprobe: int, gpus: int) -> None:
    if gpus:  # GPU and sharded indexes take it through GpuParameterSpace (faiss/gpu/GpuAutoTune.h)
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        index.nprobe = nprobe


def _rescore(train: torch.Tensor, test: torch.Tensor, idx: torch.Tensor, chunk_elems: int):
    """Exact cosine similarities of the found neighbours (test normalised), re-sorted."""
    n, k = idx.shape
    rows = max(1, chunk_elems // max(1, k * train.shape[1]))
    sims, order = [], []
    for start in range(0, n, rows):
        ind = idx[start : start + rows]
        found = ind >= 0
        neighbours = F.normalize(train[ind.clamp(min=0).to(train.device)].float(), dim=2)
        s = torch.einsum("qd,qkd->qk", test[start : start + rows].to(neighbours.device), neighbours).cpu()
        s = s.masked_fill(~found, -math.inf)
        s, o = s.sort(dim=1, descending=True)
        sims.append(s)
        order.append(ind.gather(1, o))
    return torch.cat(sims), torch.cat(order)


@dataclass
class ApproximateIndex:
    """A trained, filled IVF or IVF-PQ index over L2-normalised training features (:func:`build_index`)."""

    faiss_index: object
    train: torch.Tensor  # the caller's features, for ivfpq's exact re-scoring
    kind: str  # "ivf" or "ivfpq"
    nlist: int
    nprobe: int
    pq_m: int | None
    gpus: int
    options: IndexOptions

    def describe(self, nprobe: int | None = None) -> str:
        text = f"{self.kind} nlist={self.nlist} nprobe={nprobe or self.nprobe}"
        if self.kind == "ivfpq":
            text += f" m={self.pq_m}x{self.options.pq_bits}bit"
            if self.options.rescore_factor:
                text += f" rescored {self.options.rescore_factor}x"
        if self.gpus:
            text += f" on {self.gpus} GPU" + ("s (sharded)" if self.gpus > 1 else "")
        return text

    def search(
        self, test: torch.Tensor, k: int, nprobe: int | None = None, chunk_elems: int = 1 << 26
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, indices) of the k best of each test row; -inf / -1 where fewer were found."""
        faiss = _faiss()
        n = self.train.shape[0]
        _set_nprobe(faiss, self.faiss_index, min(nprobe or self.nprobe, self.nlist), self.gpus)
        query = F.normalize(test.float(), dim=1)
        rescore = self.kind == "ivfpq" and self.options.rescore_factor > 0
        fetch = min(self.options.rescore_factor * k, n, FAISS_GPU_MAX_K if self.gpus else n) if rescore else k
        dist, ind = self.faiss_index.search(np.ascontiguousarray(query.cpu().numpy()), max(k, fetch))
        sims, idx = torch.from_numpy(dist), torch.from_numpy(ind).long()
        if rescore:
            sims, idx = _rescore(self.train, query, idx, chunk_elems)
        sims = sims.masked_fill(idx < 0, -math.inf)  # faiss pads missing neighbours with -FLT_MAX
        return sims[:, :k], idx[:, :k]


def build_index(
    train: torch.Tensor, kind: str, gpus: int = 0, options: IndexOptions | None = None
) -> ApproximateIndex:
    """Train an ``ivf`` or ``ivfpq`` index on a seeded sample of ``train`` and add every row.

    ``gpus`` > 0 trains the coarse k-means on the GPUs and moves the index there (sharded if > 1).
    """
    faiss = _faiss()
    if faiss is None:
        raise UsageError(
            f"kNN index '{kind}' needs faiss: pip install faiss-cpu (or faiss-gpu-cu12), or use index=flat"
        )
    options = options or IndexOptions()
    n, dim = train.shape
    nlist, nprobe, pq_m, train_rows = options.resolved(n, dim, kind == "ivfpq")
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, options.pq_bits, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = options.seed
    index.cp.seed = options.seed  # IndexIVF sets cp.spherical for the inner product
    if gpus:
        index.clustering_index = _gpu_clustering_index(faiss, dim, gpus)
    # A sorted seeded sample: reproducible, and sequential reads when the features are memory-mapped.
    sample = np.sort(np.random.default_rng(options.seed).choice(n, size=train_rows, replace=False))
    index.train(_normalised(train[torch.from_numpy(sample).to(train.device)]))
    for start in range(0, n, ADD_CHUNK_ROWS):
        index.add(_normalised(train[start : start + ADD_CHUNK_ROWS]))
    if gpus:
        index = _to_gpus(faiss, index, gpus, pq_m if kind == "ivfpq" else None)
    return ApproximateIndex(
        index, train, kind, nlist, nprobe, pq_m if kind == "ivfpq" else None, gpus, options
    )


@dataclass
class Neighbours:
    sims: torch.Tensor  # (n_test, k) cosine similarity, -inf where no neighbour was found
    idx: torch.Tensor  # (n_test, k) training row, -1 where no neighbour was found
    backend: str  # resolved backend
    index: str  # "flat", or the approximate index and its parameters


def neighbours(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    backend: Backend = "auto",
    index: Index = "auto",
    options: IndexOptions | None = None,
    chunk_elems: int = 1 << 26,
) -> Neighbours:
    """The ``k`` most cosine-similar training rows for each test row, and which search found them."""
    options = options or IndexOptions()
    name = resolve_backend(backend, k)
    kind = resolve_index(index, train.shape[0], train.shape[1], name, options)
    if kind == "flat":
        sims, idx = _flat_search(train, test, k, name, chunk_elems)
        return Neighbours(sims, idx, name, "flat")
    built = build_index(train, kind, faiss_gpus() if name == "faiss-gpu" else 0, options)
    sims, idx = built.search(test, k, chunk_elems=chunk_elems)
    return Neighbours(sims, idx, name, built.describe())


def recall_at_k(approx_idx: torch.Tensor, exact_idx: torch.Tensor) -> float:
    """Mean share of each query's exact k neighbours that the approximate search also returned."""
    k = exact_idx.shape[1]
    hits = (approx_idx[:, :k, None] == exact_idx[:, None, :]).any(dim=2) & (approx_idx[:, :k] >= 0)
    return hits.float().sum(dim=1).div(k).mean().item()


def vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """Class scores (n, C): each neighbour adds exp(sim / T) to its class (a -inf sim adds 0)."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


@dataclass
class KnnResult:
    k: int  # the k actually used (at most the number of training samples)
    top1: float  # percent
    top5: float
    predictions: torch.Tensor  # (n_test,) top-1 class
    index: str = "flat"  # the search that found the neighbours (flat: exact)
    short_queries: int = 0  # test samples with fewer than k neighbours found (approximate indexes only)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: Backend = "auto",
    index: Index = "auto",
    index_options: IndexOptions | None = None,
) -> dict[int, KnnResult]:
    """kNN predictions (and accuracies when ``test_labels`` is given) for every k in ``ks``.

    A k larger than the training set is clamped to its size (the result says which k was used).
    ``index``: ``flat`` (exact), ``ivf``/``ivfpq`` (approximate, faiss) or ``auto`` (module docstring).
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise UsageError("kNN needs at least one training and one test sample")
    if train_features.shape[1] != test_features.shape[1]:
        raise UsageError(
            f"train and test features differ in width: {train_features.shape[1]} vs {test_features.shape[1]}"
        )
    for name, feats in (("train", train_features), ("test", test_features)):
        check_finite(feats, f"{name} features")
    found = neighbours(
        train_features, test_features, min(max(ks), train_features.shape[0]), backend, index, index_options
    )
    return classify_neighbours(found, train_labels, test_labels, ks, temperature, num_classes)


def classify_neighbours(
    found: Neighbours,
    train_labels: torch.Tensor,
    test_labels: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, KnnResult]:
    """The votes of :func:`knn_classify` over neighbours already found (one search, several uses)."""
    train_labels = train_labels.long().cpu()
    num_classes = num_classes or int(train_labels.max()) + 1
    n_train = train_labels.shape[0]
    sims, idx = found.sims.cpu(), found.idx.cpu()
    # Missing neighbours (-1) take any valid label: their -inf similarity gives them weight 0.
    neighbour_labels = train_labels[idx.clamp(min=0)]
    results = {}
    for k in ks:
        used = min(k, n_train)
        scores = vote(sims[:, :used], neighbour_labels[:, :used], num_classes, temperature)
        top = scores.topk(min(5, num_classes), dim=1).indices
        top1 = top5 = float("nan")
        if test_labels is not None:
            top1, top5 = ranked_accuracy(top.numpy(), test_labels.long().cpu().numpy())
        short = int((idx[:, :used] < 0).any(1).sum())
        results[k] = KnnResult(used, top1, top5, top[:, 0], found.index, short)
    return results
