"""Linear probe by L2-regularised logistic regression on frozen features (the CLIP protocol).

Radford et al. (2021), "Learning Transferable Visual Models From Natural Language Supervision",
Appendix A.3: scikit-learn's L-BFGS logistic regression, the inverse regularisation strength C
chosen on a validation split carved from the training data by a log-space sweep, then the model
refit on train + validation with that C. Features are standardised so one C range suits every
backbone; nothing about the held-out part leaks into the choice of C:

* during the sweep the scaler is fitted on the fitting part only (the held-out part is transformed
  with the fitting part's statistics, as the real test set is later);
* the refit fits a new scaler on all training data, then the model with the chosen C;
* every fit, in the sweep and the refit, starts cold (sklearn's zero initialisation, no warm start
  along the C path), so the refit is exactly the procedure whose held-out accuracy chose C, run on
  more data. (A warm-started path reaches other solutions where L-BFGS stops before full
  convergence: on random-init ViT features of digits, held-out accuracy at C = 1000 was 83.3 warm
  vs 79.9 cold. Cold starts cost ~1.6x the sweep time there: 1.65 s vs 1.03 s for 7 values.)

Deterministic: a fixed split and a deterministic solver.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from selfsup.accel import threads_for
from selfsup.config import setting
from selfsup.metrics import check_finite, topk_accuracy

DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 3, 7))


@dataclass
class LogRegConfig:
    """CLIP's protocol with a coarser sweep (CLIP: a search over 1e-6..1e6).

    The sweep climbs C from small to large and stops after ``patience`` values without a better
    validation accuracy: weakly regularised fits are the slow ones, and rarely win on standardised
    features.
    """

    cs: tuple[float, ...] = setting(DEFAULT_CS, gt=0, nonempty=True)
    val_fraction: float = setting(0.2, gt=0, lt=1)
    max_iter: int = setting(1000, ge=1)
    patience: int = setting(2, ge=1)
    seed: int = setting(0, ge=0)


@dataclass
class LinearProbeResult:
    top1: float  # percent
    top5: float
    predictions: np.ndarray  # (n_test,)
    details: dict = field(default_factory=dict)  # protocol-specific: chosen C, sweep, losses


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels - labels.min())
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_val = max(round(fraction * len(labels)), len(np.unique(labels)) if stratify is not None else 1)
    if n_val >= len(labels):
        return idx, idx  # too few samples to hold any out: select C on the training data itself
    train, val = train_test_split(idx, test_size=n_val, stratify=stratify, random_state=seed)
    return np.sort(train), np.sort(val)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    """One L-BFGS fit from sklearn's cold start: the same starting point for the sweep and the refit."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings(), threadpool_limits(threads_for(x.size * len(np.unique(y)))):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def logreg_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    config: LogRegConfig | None = None,
) -> LinearProbeResult:
    """Fit the probe on (train_x, train_y) and score it on (test_x, test_y)."""
    from sklearn.preprocessing import StandardScaler

    config = config or LogRegConfig()
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    check_finite(train_x)
    check_finite(test_x)
    classes = np.unique(train_y)
    if len(classes) == 1:  # nothing to separate: every prediction is the one class
        preds = np.full(len(test_y), classes[0])
        top1 = 100.0 * float(np.mean(preds == test_y))
        return LinearProbeResult(top1, top1, preds, {"C": None, "note": "single class"})
    fit_idx, val_idx = _split(train_y, config.val_fraction, config.seed)
    sweep_scaler = StandardScaler().fit(train_x[fit_idx])  # the held-out part stays unseen
    x_fit, x_val = sweep_scaler.transform(train_x[fit_idx]), sweep_scaler.transform(train_x[val_idx])
    sweep, best, since_best = {}, -1.0, 0
    for c in sorted(config.cs):
        model = _fit(x_fit, train_y[fit_idx], c, config.max_iter)
        sweep[c] = 100.0 * float(np.mean(model.predict(x_val) == train_y[val_idx]))
        best, since_best = (sweep[c], 0) if sweep[c] > best else (best, since_best + 1)
        if since_best >= config.patience:
            break
    best_c = max(sweep, key=lambda c: (sweep[c], -abs(np.log10(c))))  # ties: the least extreme C
    scaler = StandardScaler().fit(train_x)  # the refit: all training data, its own statistics
    x, xt = scaler.transform(train_x), scaler.transform(test_x)
    final = _fit(x, train_y, best_c, config.max_iter)
    top1, top5 = topk_accuracy(final.predict_proba(xt), test_y, final.classes_)
    details = {
        "protocol": "sklearn",
        "C": best_c,
        "val_top1_by_C": sweep,
        "n_fit": len(fit_idx),
        "n_val": len(val_idx),
        "start": "cold",
        "max_iter": config.max_iter,
    }
    return LinearProbeResult(top1, top5, final.predict(xt), details)
