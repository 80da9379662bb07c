"""Linear probes on frozen features: the published protocols, each piece against a direct computation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.errors import UsageError
from selfsup.eval import linear_head as lh
from selfsup.eval import logreg
from selfsup.eval.linear_head import (
    LinearHeadConfig,
    linear_head,
    make_optimizer,
    resolve_protocol,
    train_linear_head,
)
from selfsup.eval.logreg import LogRegConfig, logreg_probe
from selfsup.metrics import topk_accuracy


def separable(n: int, seed: int, classes: int = 5, dim: int = 20):
    """Classes set apart along random directions, with an offset and scale a raw SGD probe dislikes."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    y = rng.integers(0, classes, n)
    x = directions[y] + 0.3 * rng.normal(size=(n, dim))
    return (50.0 + 10.0 * x).astype(np.float32), y


def standardised(x, xt):
    mean, std = x.mean(0), x.std(0)
    return (x - mean) / std, (xt - mean) / std


# --- sklearn (CLIP) -------------------------------------------------------------------------------


def test_logistic_regression_reaches_99_percent_and_records_its_sweep():
    (x, y), (xt, yt) = separable(600, 0), separable(300, 1)
    result = logreg_probe(x, y, xt, yt, LogRegConfig(cs=(1e-3, 1e-1, 10.0)))
    assert result.top1 >= 99.0 and result.top5 == 100.0
    assert set(result.details["val_top1_by_C"]) == {1e-3, 1e-1, 10.0}
    assert result.details["C"] in (1e-3, 1e-1, 10.0)
    assert result.details["n_fit"] + result.details["n_val"] == 600 and result.details["start"] == "cold"
    assert (result.predictions == yt).mean() * 100 == pytest.approx(result.top1)


def test_logistic_regression_picks_c_on_validation_then_refits_on_train_plus_val(monkeypatch):
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


def test_the_sweep_scaler_sees_only_the_fitting_part_and_the_refit_scaler_all_of_train(monkeypatch):
    (x, y), (xt, yt) = separable(300, 6), separable(50, 7)
    config = LogRegConfig(cs=(0.1, 1.0))
    fit_idx, val_idx = logreg._split(y, config.val_fraction, config.seed)
    x = x.astype(np.float64)
    x[val_idx] += 1000.0  # a leak of the held-out part into the scaler would shift every mean far from 0
    seen = []
    real_fit = logreg._fit
    monkeypatch.setattr(
        logreg, "_fit", lambda xs, ys, c, *a: seen.append(xs.copy()) or real_fit(xs, ys, c, *a)
    )
    logreg_probe(x, y, xt, yt, config)
    part = x[fit_idx]
    for sweep_x in seen[:-1]:
        np.testing.assert_allclose(sweep_x, (part - part.mean(0)) / part.std(0), atol=1e-9)
    np.testing.assert_allclose(seen[-1], (x - x.mean(0)) / x.std(0), atol=1e-9)


def noisy(n: int, seed: int, classes: int = 4, dim: int = 30):
    """Overlapping classes: held-out accuracy is sensitive to where an unconverged L-BFGS stopped."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = np.argmax(
        x @ np.random.default_rng(99).normal(size=(dim, classes)) + 3.0 * rng.normal(size=(n, classes)), 1
    )
    return (5.0 + 3.0 * x).astype(np.float32), y


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_sweep_and_refit_start_from_the_same_cold_point():
    """With too few iterations to converge, a warm-started sweep differs from a cold fit: it must not."""
    from sklearn.linear_model import LogisticRegression

    (x, y), (xt, yt) = noisy(300, 0), noisy(100, 1)
    config = LogRegConfig(cs=(1e-2, 1.0, 100.0), max_iter=3, patience=5)
    fit_idx, val_idx = logreg._split(y, config.val_fraction, config.seed)
    part = x[fit_idx].astype(np.float64)
    xf, xv = (part - part.mean(0)) / part.std(0), (x[val_idx] - part.mean(0)) / part.std(0)

    def val_acc(model):
        return 100.0 * np.mean(model.predict(xv) == y[val_idx])

    result = logreg_probe(x, y, xt, yt, config)
    sweep = result.details["val_top1_by_C"]
    for c, acc in sweep.items():
        assert acc == pytest.approx(val_acc(LogisticRegression(C=c, max_iter=3).fit(xf, y[fit_idx]))), c
    xa, xta = standardised(x.astype(np.float64), xt.astype(np.float64))
    cold_refit = LogisticRegression(C=result.details["C"], max_iter=3).fit(xa, y)
    assert np.array_equal(result.predictions, cold_refit.predict(xta))
    # the check can fail: continuing from the previous C's solution (a warm path) scores differently here
    path = LogisticRegression(C=1e-2, max_iter=3).fit(xf, y[fit_idx])
    for c in (1.0, 100.0):
        warm = LogisticRegression(C=c, max_iter=3, warm_start=True)
        warm.coef_, warm.intercept_, warm.classes_ = path.coef_.copy(), path.intercept_.copy(), path.classes_
        path = warm.fit(xf, y[fit_idx])
    assert val_acc(path) != pytest.approx(sweep[100.0])


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
    with pytest.raises(UsageError, match="NaN"):
        train_linear_head(x, np.array([0, 1] * 3), x, np.array([0, 1] * 3))


# --- mocov3 (main_lincls.py) ----------------------------------------------------------------------


def test_mocov3_recipe_is_the_official_one():
    p = resolve_protocol("mocov3")
    assert (p.optimizer, p.batchnorm, p.base_lr, p.batch_size, p.epochs) == ("sgd", False, 3.0, 1024, 90)
    assert (p.momentum, p.weight_decay, p.warmup_epochs, p.drop_last) == (0.9, 0.0, 0, False)
    torch.manual_seed(0)
    head = linear_head(64, 10, p.batchnorm, p.init)
    assert isinstance(head, nn.Linear)  # no BatchNorm
    assert head.bias.abs().sum() == 0 and 0.009 < head.weight.std().item() < 0.011
    opt = make_optimizer(p, head, lr=3.0 * 1024 / 256)
    assert type(opt) is torch.optim.SGD
    assert (
        opt.defaults["lr"] == 12.0 and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 0.0
    )


def test_mocov3_cosine_is_set_once_per_epoch():
    p = resolve_protocol("mocov3")
    peak, spe = 12.0, 7
    for step in (0, 6):  # the whole first epoch at the peak
        assert lh.learning_rate(p, peak, step, spe) == peak
    assert lh.learning_rate(p, peak, 45 * spe + 3, spe) == pytest.approx(peak * 0.5)
    assert lh.learning_rate(p, peak, 89 * spe, spe) == pytest.approx(
        peak * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    )


def test_mocov3_learns_standardised_features_with_the_lr_of_the_batch_used(monkeypatch):
    (x, y), (xt, yt) = separable(600, 0), separable(300, 1)
    x, xt = standardised(x, xt)  # no BatchNorm: the recipe expects roughly unit-scale features
    lrs = []
    real = lh.learning_rate
    monkeypatch.setattr(lh, "learning_rate", lambda *a: lrs.append(real(*a)) or lrs[-1])
    result = train_linear_head(x, y, xt, yt, LinearHeadConfig(epochs=10, batch_size=128), 5, "mocov3")
    assert result.top1 >= 99.0
    d = result.details
    assert (d["protocol"], d["optimizer"], d["batchnorm"], d["augment"]) == ("mocov3", "SGD", False, False)
    assert (
        d["lr"] == pytest.approx(3.0 * 128 / 256) and d["steps"] == 10 * 5
    )  # 600 / 128: 5 batches, last kept
    assert (
        lrs[0] == d["lr"]
        and len(lrs) == 50
        and lrs[5] == pytest.approx(d["lr"] * 0.5 * (1 + math.cos(math.pi / 10)))
    )
    clamped = train_linear_head(x, y, xt, yt, LinearHeadConfig(epochs=1), 5, "mocov3")
    assert clamped.details["batch_size"] == 600 and clamped.details["lr"] == pytest.approx(3.0 * 600 / 256)


# --- mae (main_linprobe.py) -----------------------------------------------------------------------


def test_mae_head_has_affine_free_batchnorm_and_truncated_normal_weights():
    p = resolve_protocol("mae")
    assert (p.optimizer, p.base_lr, p.batch_size, p.epochs, p.warmup_epochs, p.drop_last) == (
        "lars",
        0.1,
        16384,
        90,
        10,
        True,
    )
    torch.manual_seed(0)
    head = linear_head(256, 50, p.batchnorm, p.init)
    bn, fc = head[0], head[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.affine is False and bn.eps == 1e-6
    assert fc.bias.abs().sum() == 0 and 0.009 < fc.weight.std().item() < 0.011


def test_lars_steps_match_maes_formula():
    """Two steps by hand: trust ratio 0.001 ||w|| / ||g|| on the matrix, plain momentum on the bias."""
    p = resolve_protocol("mae")
    torch.manual_seed(0)
    head = linear_head(6, 3, p.batchnorm, p.init)
    fc = head[1]
    nn.init.normal_(fc.bias, std=0.1)  # a non-zero bias, so the bias update is visible
    lr = 0.7
    opt = make_optimizer(p, head, lr)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    w, b = fc.weight.detach().clone(), fc.bias.detach().clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        gw, gb = fc.weight.grad.clone(), fc.bias.grad.clone()
        trust = 0.001 * w.norm() / gw.norm()  # MAE util/lars.py with weight decay 0; no rate on 1-D params
        mu_w, mu_b = 0.9 * mu_w + trust * gw, 0.9 * mu_b + gb
        w, b = w - lr * mu_w, b - lr * mu_b
        opt.step()
        torch.testing.assert_close(fc.weight.detach(), w, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(fc.bias.detach(), b, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(trust * gw, gw)  # the trust ratio really scales the step


def test_mae_lr_warms_up_then_follows_a_cosine_per_iteration():
    p = resolve_protocol("mae")
    peak, spe = 0.4, 7
    expect = {
        0: 0.0,
        3: peak * (3 / 7) / 10,  # fractional epoch 3/7 of 10 warm-up epochs
        35: peak * 0.5,  # epoch 5
        70: peak,  # end of warm-up
        7 * 50: peak * 0.5 * (1 + math.cos(math.pi * 40 / 80)),
        7 * 50 + 3: peak * 0.5 * (1 + math.cos(math.pi * (40 + 3 / 7) / 80)),
        7 * 90 - 1: peak * 0.5 * (1 + math.cos(math.pi * (80 - 1 / 7) / 80)),
    }
    for step, lr in expect.items():
        assert lh.learning_rate(p, peak, step, spe) == pytest.approx(lr, abs=1e-12), step


def test_mae_trains_every_step_with_drop_last_and_learns_raw_features(monkeypatch):
    (x, y), (xt, yt) = separable(600, 0), separable(300, 1)  # raw scale: the affine-free BatchNorm copes
    steps = []
    real = lh.learning_rate
    monkeypatch.setattr(
        lh, "learning_rate", lambda p, lr, step, spe: steps.append((step, spe)) or real(p, lr, step, spe)
    )
    config = LinearHeadConfig(epochs=20, batch_size=128, base_lr=40.0, warmup_epochs=2)
    result = train_linear_head(x, y, xt, yt, config, 5, "mae")
    assert result.top1 >= 99.0
    d = result.details
    assert (d["optimizer"], d["batchnorm"], d["warmup_epochs"], d["lr"]) == (
        "LARS",
        True,
        2,
        40.0 * 128 / 256,
    )
    assert (
        steps == [(s, 4) for s in range(20 * 4)] and d["steps"] == 80
    )  # 600 // 128 = 4: the partial batch is dropped


# --- shared rules ----------------------------------------------------------------------------------


def test_augmented_batches_replace_the_cached_ones_each_epoch():
    (x, y), (xt, yt) = separable(60, 0), separable(30, 1)
    x, xt = standardised(x, xt)
    calls = []

    def augmented(epoch, batch, drop_last):
        calls.append((epoch, batch, drop_last))
        noisy = x + 0.05 * np.random.default_rng(epoch).normal(size=x.shape)
        return [
            (torch.as_tensor(noisy[i : i + batch]), torch.as_tensor(y[i : i + batch]))
            for i in range(0, 60, batch)
        ]

    config = LinearHeadConfig(epochs=3, batch_size=16, augment=True)
    result = train_linear_head(x, y, xt, yt, config, 5, "mocov3", augmented)
    assert calls == [(0, 16, False), (1, 16, False), (2, 16, False)] and result.details["augment"] is True
    with pytest.raises(UsageError, match="augment"):
        train_linear_head(x, y, xt, yt, config, 5, "mocov3")  # augment without the views


def test_augmented_views_are_random_crops_of_the_whole_scale_range_through_a_frozen_backbone():
    from torchvision import transforms

    from selfsup.builtin_data import ArrayImages, synthetic_arrays
    from selfsup.eval.augment import augmented_batches, train_view_transform
    from selfsup.models import BackboneSpec, create_backbone

    view = train_view_transform(16, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bicubic")
    crop, flip, _, norm = view.transforms
    assert (
        crop.size == (16, 16)
        and crop.scale == (0.08, 1.0)
        and crop.interpolation == transforms.InterpolationMode.BICUBIC
    )
    assert flip.p == 0.5 and norm.mean == [0.5, 0.4, 0.3] and norm.std == [0.2, 0.2, 0.2]
    images, targets = synthetic_arrays(10, 2, 16, seed=0)
    torch.manual_seed(0)
    model = create_backbone(
        BackboneSpec(
            "vit_small_patch16_224",
            img_size=16,
            patch_size=8,
            extra={"depth": 1, "embed_dim": 16, "num_heads": 2},
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = augmented_batches(model.train(), ArrayImages(images, targets, ["a", "b"], view), seed=3)
    first, second = list(batches(0, 4, True)), list(batches(1, 4, True))
    assert [len(yb) for _, yb in first] == [4, 4] and first[0][0].shape == (
        4,
        16,
    )  # drop_last: 10 -> 2 batches
    assert not torch.allclose(first[0][0], second[0][0])  # fresh views (and order) every epoch
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_old_torch_protocol_and_bad_overrides_are_refused():
    with pytest.raises(UsageError, match="mocov3.*mae"):
        resolve_protocol("torch")
    with pytest.raises(UsageError, match="expected sklearn, mocov3 or mae"):
        resolve_protocol("moco")
    with pytest.raises(UsageError, match="warm-up"):
        resolve_protocol("mocov3", LinearHeadConfig(warmup_epochs=5))
    with pytest.raises(UsageError, match="warmup_epochs"):
        resolve_protocol("mae", LinearHeadConfig(epochs=10))  # 10 warm-up epochs of 10
    with pytest.raises(UsageError, match="at least 2"):
        train_linear_head(np.ones((1, 3)), np.zeros(1), np.ones((1, 3)), np.zeros(1), protocol="mae")


def test_topk_accuracy_counts_by_hand():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top5 = topk_accuracy(scores, np.array([1, 1, 2]), np.array([0, 1, 2]))
    assert top1 == pytest.approx(200 / 3) and top5 == 100.0
