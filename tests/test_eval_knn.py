"""Weighted kNN (DINO protocol): every backend agrees with a loop-by-loop reference; edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.errors import UsageError
from selfsup.eval import knn
from selfsup.eval.knn import knn_classify, resolve_backend, vote

BACKENDS = [
    "torch",
    pytest.param("faiss-cpu", marks=pytest.mark.skipif(knn._faiss() is None, reason="faiss absent")),
]


def reference_knn(train, train_y, test, k, temperature, num_classes):
    """The protocol written out: cosine similarity, k best, each adds exp(sim / T) to its class."""
    predictions = []
    for q in test.tolist():
        sims = []
        for i, x in enumerate(train.tolist()):
            dot = sum(a * b for a, b in zip(q, x))
            norm = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in x))
            sims.append((dot / norm, i))
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * num_classes
        for sim, i in sims[:k]:
            scores[int(train_y[i])] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=lambda c: scores[c]))
    return torch.tensor(predictions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_predicts_like_the_reference(backend):
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(120, 16, generator=gen), torch.randn(30, 16, generator=gen)
    train_y = torch.randint(0, 5, (120,), generator=gen)
    results = knn_classify(train, train_y, test, ks=(1, 7, 25), num_classes=5, backend=backend)
    for k in (1, 7, 25):
        expected = reference_knn(train, train_y, test, k, 0.07, 5)
        assert torch.equal(results[k].predictions, expected), f"k={k}"


def test_weighted_votes_on_a_hand_made_example():
    # Query along x. Neighbours: class 0 at similarity 1.0, class 1 at 0.8 and 0.6 (T = 0.1).
    # Class 0 scores e^10 = 22026; class 1 scores e^8 + e^6 = 2981 + 403 = 3384: class 0 wins with
    # 3 neighbours even though class 1 has the majority of votes.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[2.0, 0.0]])
    scores = vote(torch.tensor([[1.0, 0.8, 0.6]]), train_y[torch.tensor([[0, 1, 2]])], 2, temperature=0.1)
    assert scores[0, 0].item() == pytest.approx(math.exp(10), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(math.exp(8) + math.exp(6), rel=1e-5)
    result = knn_classify(train, train_y, test, torch.tensor([0]), ks=(3,), temperature=0.1, backend="torch")
    assert result[3].predictions.tolist() == [0] and result[3].top1 == 100.0
    # At T = 10 the weights are nearly equal, so the majority (class 1) wins.
    flat = knn_classify(train, train_y, test, torch.tensor([1]), ks=(3,), temperature=10.0, backend="torch")
    assert flat[3].predictions.tolist() == [1] and flat[3].top1 == 100.0


def test_k_larger_than_the_training_set_uses_every_sample():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    results = knn_classify(
        train, torch.tensor([0, 0, 1]), torch.tensor([[0.0, 1.0]]), torch.tensor([1]), ks=(2, 200)
    )
    assert results[200].k == 3 and results[2].k == 2
    assert results[200].top1 == 100.0  # the one class-1 sample is 25x heavier than the two others


def test_k_above_faiss_gpu_limit_falls_back_when_auto_and_is_refused_when_asked(monkeypatch):
    monkeypatch.setattr(knn, "faiss_gpus", lambda: 1)
    monkeypatch.setattr(knn, "_faiss", lambda: object())
    assert resolve_backend("auto", 2048) == "faiss-gpu"
    assert resolve_backend("auto", 2049) != "faiss-gpu"
    with pytest.raises(UsageError, match="k <= 2048"):
        resolve_backend("faiss-gpu", 4096)


def test_k_above_2048_gives_reference_predictions_on_cpu():
    gen = torch.Generator().manual_seed(1)
    train, train_y = torch.randn(2100, 8, generator=gen), torch.randint(0, 3, (2100,), generator=gen)
    test = torch.randn(3, 8, generator=gen)
    result = knn_classify(train, train_y, test, ks=(2100,), num_classes=3, temperature=0.5)
    assert torch.equal(result[2100].predictions, reference_knn(train, train_y, test, 2100, 0.5, 3))


@pytest.mark.parametrize("n_test", [1, 7, 99])
def test_fewer_than_100_test_samples_with_small_chunks(n_test, monkeypatch):
    # DINO's chunking gave 0-sized chunks below 100 test images; force tiny chunks here.
    gen = torch.Generator().manual_seed(2)
    train, train_y = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    test = torch.randn(n_test, 8, generator=gen)
    chunked = knn.neighbours(train, test, 5, backend="torch", chunk_elems=10)  # 1 row per chunk
    whole = knn.neighbours(train, test, 5, backend="torch")
    sims, idx, full, full_idx = chunked.sims, chunked.idx, whole.sims, whole.idx
    assert idx.shape == (n_test, 5) and torch.equal(idx, full_idx) and torch.allclose(sims, full)
    result = knn_classify(train, train_y, test, ks=(5,), num_classes=4)
    assert torch.equal(result[5].predictions, reference_knn(train, train_y, test, 5, 0.07, 4))


def test_a_single_class_predicts_that_class_with_full_accuracy():
    train = torch.randn(20, 4)
    results = knn_classify(
        train,
        torch.zeros(20, dtype=torch.long),
        torch.randn(5, 4),
        torch.zeros(5, dtype=torch.long),
        ks=(3, 50),
    )
    assert results[3].top1 == 100.0 and results[3].top5 == 100.0 and results[50].k == 20
    assert results[3].predictions.tolist() == [0] * 5


def test_nan_features_are_a_usage_error():
    train = torch.randn(10, 4)
    train[3, 1] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        knn_classify(train, torch.zeros(10, dtype=torch.long), torch.randn(2, 4))


# --- approximate indexes (IVF, IVF-PQ) -------------------------------------------------------------

needs_faiss = pytest.mark.skipif(knn._faiss() is None, reason="faiss absent")


def clustered(n, dim, classes, seed, latent=8):
    """Labelled features of low intrinsic dimension (a Gaussian mixture in `latent` dims, mapped to `dim`)."""
    base = torch.Generator().manual_seed(0)  # class centres and the map are shared by every split
    centres = 1.5 * torch.randn(classes, latent, generator=base)
    lift = torch.randn(latent, dim, generator=base) / latent**0.5
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    z = centres[labels] + torch.randn(n, latent, generator=gen)
    return z @ lift + 0.1 * torch.randn(n, dim, generator=gen), labels


@needs_faiss
def test_ivf_scanning_every_list_is_exact_and_reproducible():
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(2000, 16, generator=gen), torch.randn(40, 16, generator=gen)
    exact = knn.neighbours(train, test, 10, backend="torch", index="flat")
    every = knn.neighbours(train, test, 10, "faiss-cpu", "ivf", knn.IndexOptions(nlist=16, nprobe=16))
    assert every.index == "ivf nlist=16 nprobe=16"
    assert torch.equal(every.idx, exact.idx) and torch.allclose(every.sims, exact.sims, atol=1e-5)
    # Fewer lists probed: approximate, but the seeded sample and k-means give the same index twice.
    few = [
        knn.neighbours(train, test, 10, "faiss-cpu", "ivf", knn.IndexOptions(nlist=16, nprobe=2))
        for _ in range(2)
    ]
    assert torch.equal(few[0].idx, few[1].idx) and not torch.equal(few[0].idx, exact.idx)


@needs_faiss
@pytest.mark.parametrize(("kind", "min_recall"), [("ivf", 0.9), ("ivfpq", 0.8)])  # ivfpq: 4-byte codes here
def test_approximate_index_recall_and_accuracy_on_clustered_data(kind, min_recall):
    train, train_y = clustered(20_000, 32, 10, seed=1)
    test, test_y = clustered(500, 32, 10, seed=2)
    exact = knn.neighbours(train, test, 20, backend="torch", index="flat")
    approx = knn.neighbours(train, test, 20, "faiss-cpu", kind)  # default nlist 512, nprobe 32
    assert approx.index.startswith(f"{kind} nlist=512 nprobe=32")
    assert knn.recall_at_k(approx.idx, exact.idx) >= min_recall
    exact_top1 = knn.classify_neighbours(exact, train_y, test_y, ks=(20,))[20].top1
    approx_top1 = knn.classify_neighbours(approx, train_y, test_y, ks=(20,))[20].top1
    assert 40.0 < exact_top1 < 100.0  # neither trivial nor hopeless, so the comparison means something
    assert abs(approx_top1 - exact_top1) <= 1.0


def test_recall_at_k_counts_shared_neighbours():
    exact = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = torch.tensor([[3, 1, 9, -1], [7, 6, 5, 4]])  # 2 of 4, then 4 of 4
    assert knn.recall_at_k(approx, exact) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_auto_index_switches_at_the_thresholds(monkeypatch):
    small = knn.IndexOptions(auto_min_train=1000, memory_bytes=10**9)
    assert knn.resolve_index("auto", 999, 64, "faiss-cpu", small) == "flat"
    assert knn.resolve_index("auto", 1000, 64, "faiss-cpu", small) == "ivf"
    # The IVF-Flat index of 1000 x 64 takes 1000 * (4 * 64 + 8) = 264,000 bytes: ivfpq above half the budget.
    assert (
        knn.resolve_index(
            "auto", 1000, 64, "faiss-cpu", knn.IndexOptions(memory_bytes=528_000, auto_min_train=1000)
        )
        == "ivf"
    )
    assert (
        knn.resolve_index(
            "auto", 1000, 64, "faiss-cpu", knn.IndexOptions(memory_bytes=527_999, auto_min_train=1000)
        )
        == "ivfpq"
    )
    assert knn.resolve_index("auto", 10**8, 64, "torch", small) == "flat"  # torch cannot do IVF
    assert knn.resolve_index("flat", 10**8, 64, "faiss-cpu") == "flat"
    assert knn.AUTO_APPROX_MIN_TRAIN > 1_281_167  # ImageNet-1K stays exact
    with pytest.raises(UsageError, match="unknown kNN index 'hnsw'"):
        knn.resolve_index("hnsw", 10, 4, "faiss-cpu")


@needs_faiss
def test_auto_index_end_to_end_records_the_index_used():
    train, train_y = clustered(1200, 16, 4, seed=4)
    test, test_y = clustered(30, 16, 4, seed=5)
    below = knn_classify(
        train, train_y, test, test_y, ks=(5,), index_options=knn.IndexOptions(auto_min_train=1201)
    )
    above = knn_classify(
        train, train_y, test, test_y, ks=(5,), index_options=knn.IndexOptions(auto_min_train=1200)
    )
    assert below[5].index == "flat" and above[5].index.startswith("ivf nlist=30 ")


def test_missing_neighbours_vote_with_weight_zero():
    # Query 0 found 2 of 3 neighbours, query 1 only 1: the -1 slots (similarity -inf) must add nothing.
    found = knn.Neighbours(
        sims=torch.tensor([[0.9, 0.5, -math.inf], [0.2, -math.inf, -math.inf]]),
        idx=torch.tensor([[2, 0, -1], [1, -1, -1]]),
        backend="faiss-cpu",
        index="ivf",
    )
    train_y = torch.tensor([1, 0, 2])  # label of row 0 is 1: a -1 read as row 0 would vote for class 1
    result = knn.classify_neighbours(found, train_y, torch.tensor([2, 0]), ks=(3,), temperature=0.1)[3]
    assert result.predictions.tolist() == [2, 0] and result.top1 == 100.0 and result.short_queries == 2
    scores = knn.vote(found.sims, train_y[found.idx.clamp(min=0)], 3, temperature=0.1)
    assert scores[1].tolist() == pytest.approx([math.exp(2.0), 0.0, 0.0])  # only row 1 (class 0) counted


@needs_faiss
def test_approximate_search_with_too_few_probed_neighbours_returns_minus_one():
    # 8 tight, far-apart clusters of 25 rows; one list probed, k = 50: at most ~25 neighbours exist.
    gen = torch.Generator().manual_seed(6)
    centres = torch.eye(8) * 10
    train_y = torch.arange(8).repeat_interleave(25)
    train = centres[train_y] + 0.1 * torch.randn(200, 8, generator=gen)
    test_y = torch.arange(8)
    test = centres + 0.1 * torch.randn(8, 8, generator=gen)
    opts = knn.IndexOptions(nlist=8, nprobe=1)
    found = knn.neighbours(train, test, 50, "faiss-cpu", "ivf", opts)
    missing = found.idx < 0
    assert missing.any(1).all() and torch.equal(torch.isinf(found.sims), missing)
    result = knn_classify(
        train, train_y, test, test_y, ks=(50,), backend="faiss-cpu", index="ivf", index_options=opts
    )[50]
    assert result.top1 == 100.0 and result.short_queries == 8
    # Direct computation over the neighbours found: exp(cos / T) summed per class.
    expected = []
    for q in range(8):
        scores = [0.0] * 8
        for i in found.idx[q][found.idx[q] >= 0].tolist():
            scores[int(train_y[i])] += math.exp(F.cosine_similarity(test[q], train[i], dim=0).item() / 0.07)
        expected.append(max(range(8), key=lambda c: scores[c]))
    assert result.predictions.tolist() == expected


def test_ivf_without_faiss_or_with_the_torch_backend_is_a_usage_error(monkeypatch):
    train, test = torch.randn(50, 4), torch.randn(3, 4)
    if knn._faiss() is not None:
        with pytest.raises(UsageError, match="needs a faiss backend, not torch"):
            knn_classify(train, torch.zeros(50, dtype=torch.long), test, backend="torch", index="ivf")
    monkeypatch.setattr(knn, "_faiss", lambda: None)
    for index in ("ivf", "ivfpq"):
        with pytest.raises(UsageError, match="needs faiss"):
            knn_classify(train, torch.zeros(50, dtype=torch.long), test, index=index)
    # auto never asks for what is not installed: exact search on torch.
    result = knn_classify(
        train,
        torch.zeros(50, dtype=torch.long),
        test,
        ks=(3,),
        index_options=knn.IndexOptions(auto_min_train=10),
    )
    assert result[3].index == "flat"


def test_bad_index_options_are_usage_errors():
    with pytest.raises(UsageError, match="pq_m=5 must divide the feature width 16"):
        knn.IndexOptions(pq_m=5).resolved(1000, 16, pq=True)
    with pytest.raises(UsageError, match="nprobe must be >= 1"):
        knn.IndexOptions(nprobe=0).resolved(1000, 16)
    with pytest.raises(UsageError, match="needs at least 256 training rows"):
        knn.IndexOptions().resolved(100, 16, pq=True)


def test_defaults_follow_the_stated_rules():
    # nlist = round(4 sqrt(N)) capped at N / 39; pq_m = largest GPU code size with >= 8 dims per sub-vector.
    assert knn.IndexOptions().resolved(1_000_000, 384, pq=True) == (4000, 125, 48, 156_000)
    assert knn.IndexOptions().resolved(14_000_000, 768, pq=True)[:3] == (14967, 467, 96)
    assert knn.IndexOptions().resolved(1000, 16)[:2] == (25, 25)  # 4 sqrt(1000) = 126 > 1000 / 39


class FakeGpuFaiss:
    """Records how an index is sent to GPUs (faiss-gpu cannot run here)."""

    class GpuClonerOptions:
        def __init__(self):
            self.useFloat16 = False

    class GpuMultipleClonerOptions(GpuClonerOptions):
        def __init__(self):
            super().__init__()
            self.shard = False

    def __init__(self):
        self.calls = []

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        self.calls.append(("all", index, co, ngpu))
        return index

    def index_cpu_to_gpu(self, resources, device, index, co=None):
        self.calls.append(("one", index, co, device))
        return index

    def StandardGpuResources(self):
        return "resources"


@pytest.mark.parametrize(
    ("gpus", "pq_m", "how", "shard", "fp16"),
    [(4, None, "all", True, False), (2, 64, "all", True, True), (1, 48, "one", None, False)],
)
def test_several_gpus_shard_the_index_and_one_gpu_holds_it(gpus, pq_m, how, shard, fp16):
    fake = FakeGpuFaiss()
    assert knn._to_gpus(fake, "cpu-index", gpus, pq_m) == "cpu-index"
    ((called, index, options, where),) = fake.calls
    assert (called, index) == (how, "cpu-index") and getattr(options, "shard", None) is shard
    assert where == (gpus if how == "all" else 0) and options.useFloat16 is fp16


@needs_faiss
def test_auto_backend_with_several_gpus_builds_a_sharded_ivf(monkeypatch):
    moved = []
    monkeypatch.setattr(knn, "faiss_gpus", lambda: 2)
    monkeypatch.setattr(knn, "_gpu_clustering_index", lambda faiss, dim, gpus: faiss.IndexFlatIP(dim))
    monkeypatch.setattr(knn, "_to_gpus", lambda faiss, index, gpus, pq_m: moved.append(gpus) or index)
    monkeypatch.setattr(
        knn, "_set_nprobe", lambda faiss, index, nprobe, gpus: setattr(index, "nprobe", nprobe)
    )
    train, train_y = clustered(1200, 16, 4, seed=7)
    test = clustered(20, 16, 4, seed=8)[0]
    gpu = knn_classify(train, train_y, test, ks=(5,), index="ivf")[5]
    assert moved == [2] and gpu.index.endswith("on 2 GPUs (sharded)")
    monkeypatch.setattr(knn, "faiss_gpus", lambda: 0)
    cpu = knn_classify(train, train_y, test, ks=(5,), index="ivf")[5]
    assert torch.equal(gpu.predictions, cpu.predictions) and moved == [2]
