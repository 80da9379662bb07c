"""Weighted kNN (DINO protocol): every backend agrees with a loop-by-loop reference; edge cases."""

import math

import pytest
import torch

from selfsup.errors import UsageError
from selfsup.eval import knn
from selfsup.eval.knn import knn_classify, resolve_backend, vote

BACKENDS = ["torch", pytest.param("faiss-cpu", marks=pytest.mark.skipif(knn._faiss() is None, reason="faiss absent"))]


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
    results = knn_classify(train, torch.tensor([0, 0, 1]), torch.tensor([[0.0, 1.0]]), torch.tensor([1]), ks=(2, 200))
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
    sims, idx, _ = knn.search(train, test, 5, backend="torch", chunk_elems=10)  # 1 row per chunk
    full, full_idx, _ = knn.search(train, test, 5, backend="torch")
    assert idx.shape == (n_test, 5) and torch.equal(idx, full_idx) and torch.allclose(sims, full)
    result = knn_classify(train, train_y, test, ks=(5,), num_classes=4)
    assert torch.equal(result[5].predictions, reference_knn(train, train_y, test, 5, 0.07, 4))


def test_a_single_class_predicts_that_class_with_full_accuracy():
    train = torch.randn(20, 4)
    results = knn_classify(train, torch.zeros(20, dtype=torch.long), torch.randn(5, 4), torch.zeros(5, dtype=torch.long), ks=(3, 50))
    assert results[3].top1 == 100.0 and results[3].top5 == 100.0 and results[50].k == 20
    assert results[3].predictions.tolist() == [0] * 5


def test_nan_features_are_a_usage_error():
    train = torch.randn(10, 4)
    train[3, 1] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        knn_classify(train, torch.zeros(10, dtype=torch.long), torch.randn(2, 4))
