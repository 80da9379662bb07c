"""Linear probes on frozen features: both protocols learn a linearly separable problem."""

import numpy as np
import pytest

from selfsup.errors import UsageError
from selfsup.eval.linear_head import LinearHeadConfig, linear_head, train_linear_head
from selfsup.eval.logreg import LogRegConfig, logreg_probe, topk_accuracy


def separable(n: int, seed: int, classes: int = 5, dim: int = 20):
    """Classes set apart along random directions, with an offset and scale a raw SGD probe dislikes."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    y = rng.integers(0, classes, n)
    x = directions[y] + 0.3 * rng.normal(size=(n, dim))
    return (50.0 + 10.0 * x).astype(np.float32), y


def test_logistic_regression_reaches_99_percent_and_records_its_sweep():
    (x, y), (xt, yt) = separable(600, 0), separable(300, 1)
    result = logreg_probe(x, y, xt, yt, LogRegConfig(cs=(1e-3, 1e-1, 10.0)))
    assert result.top1 >= 99.0 and result.top5 == 100.0
    assert set(result.details["val_top1_by_C"]) == {1e-3, 1e-1, 10.0}
    assert result.details["C"] in (1e-3, 1e-1, 10.0)
    assert (result.predictions == yt).mean() * 100 == pytest.approx(result.top1)


def test_logistic_regression_picks_c_on_validation_then_refits_on_train_plus_val(monkeypatch):
    from selfsup.eval import logreg

    calls = []
    real_fit = logreg._fit

    def recording_fit(x, y, c, *args):
        calls.append((len(y), c))
        return real_fit(x, y, c, *args)

    monkeypatch.setattr(logreg, "_fit", recording_fit)
    (x, y), (xt, yt) = separable(400, 4), separable(100, 5)
    result = logreg_probe(x, y, xt, yt, LogRegConfig(cs=(1e-4, 1e-2, 1.0), patience=5))
    sweep = result.details["val_top1_by_C"]
    assert [c for _, c in calls[:-1]] == [1e-4, 1e-2, 1.0] and all(n < 400 for n, _ in calls[:-1])
    assert calls[-1] == (400, result.details["C"])  # the refit sees every training sample
    assert sweep[result.details["C"]] == max(sweep.values())


def test_logistic_regression_is_deterministic():
    (x, y), (xt, yt) = separable(300, 2), separable(100, 3)
    a = logreg_probe(x, y, xt, yt, LogRegConfig(cs=(0.01, 1.0)))
    b = logreg_probe(x, y, xt, yt, LogRegConfig(cs=(0.01, 1.0)))
    assert a.top1 == b.top1 and np.array_equal(a.predictions, b.predictions) and a.details == b.details


def test_logistic_regression_with_one_class_predicts_it():
    x, xt = np.random.default_rng(0).normal(size=(10, 3)), np.random.default_rng(1).normal(size=(4, 3))
    result = logreg_probe(x, np.zeros(10, int), xt, np.zeros(4, int))
    assert result.top1 == 100.0 and result.predictions.tolist() == [0] * 4


def test_nan_features_are_refused():
    x = np.ones((6, 2))
    x[0, 0] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        logreg_probe(x, np.array([0, 1] * 3), x, np.array([0, 1] * 3))


@pytest.mark.parametrize("batchnorm", [True, False])
def test_torch_linear_head_learns_the_same_problem(batchnorm):
    (x, y), (xt, yt) = separable(600, 0), separable(300, 1)
    if not batchnorm:  # without BatchNorm the MoCo v3 recipe expects roughly unit-scale features
        mean, std = x.mean(0), x.std(0)
        x, xt = (x - mean) / std, (xt - mean) / std
    config = LinearHeadConfig(epochs=30, batch_size=128, base_lr=1.0, batchnorm=batchnorm)
    result = train_linear_head(x, y, xt, yt, config, num_classes=5)
    assert result.top1 >= 99.0
    assert result.details["lr"] == pytest.approx(1.0 * 128 / 256)


def test_torch_head_starts_as_the_papers_say():
    head = linear_head(8, 3, batchnorm=True)
    bn, fc = head[0], head[1]
    assert bn.affine is False and bn.eps == 1e-6
    assert fc.bias.abs().sum() == 0 and 0.005 < fc.weight.std().item() < 0.02


def test_topk_accuracy_counts_by_hand():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top5 = topk_accuracy(scores, np.array([1, 1, 2]), np.array([0, 1, 2]))
    assert top1 == pytest.approx(200 / 3) and top5 == 100.0
