"""``run_probe``: frozen features of each model (cached), then kNN and linear probes, then a report.

The protocols are pure functions over arrays (:mod:`selfsup.eval.knn`, :mod:`selfsup.eval.logreg`,
:mod:`selfsup.eval.linear_head`); this module wires sources, the dataset registry, the cache and
the report together. The CLI (``probe``) is a thin layer over :func:`run_probe`.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from selfsup.accel import make_accelerator
from selfsup.config import setting
from selfsup.data import DataOptions, DatasetInfo, build_dataset
from selfsup.errors import UsageError
from selfsup.eval.augment import probe_augmented_batches
from selfsup.eval.cache import FeatureCache, cache_key, default_cache_dir
from selfsup.eval.knn import DEFAULT_KS, knn_classify
from selfsup.eval.linear_head import LinearHeadConfig, resolve_protocol, train_linear_head
from selfsup.eval.logreg import LogRegConfig, logreg_probe
from selfsup.eval.sources import Source, from_checkpoint, from_model_name, random_init_twin, unique_names
from selfsup.features import check_feature_kind, extract_features
from selfsup.files import ensure_writable_dir
from selfsup.imagefolder import report_corrupt
from selfsup.metrics import check_finite
from selfsup.precision import Precision, announce, describe_cpu, resolve_precision
from selfsup.transforms import eval_transform

METHODS = ("knn", "linear")


@dataclass
class ProbeConfig:
    """One evaluation run. kNN: DINO (k in 10/20/100/200, T=0.07); linear: CLIP (sklearn), MoCo v3 or MAE."""

    dataset: str = "cifar100"
    checkpoints: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # timm names, evaluated at random init
    compare_random_init: bool = False
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    feature: str = "cls"
    ks: list[int] = setting(factory=lambda: list(DEFAULT_KS), ge=1, nonempty=True)
    temperature: float = setting(0.07, gt=0)
    knn_backend: Literal["auto", "faiss-gpu", "faiss-cpu", "torch"] = "auto"
    # auto: exact below 2 M training rows (knn.py)
    knn_index: Literal["auto", "flat", "ivf", "ivfpq"] = "auto"
    linear_protocol: Literal["sklearn", "mocov3", "mae"] = "sklearn"
    logreg: LogRegConfig = field(default_factory=LogRegConfig)
    linear_head: LinearHeadConfig = field(default_factory=LinearHeadConfig)
    img_size: int | None = setting(None, ge=1)
    patch_size: int | None = setting(None, ge=1)
    batch_size: int = setting(256, ge=1)
    num_workers: int = setting(2, ge=0)
    mixed_precision: Precision = "auto"  # of the frozen features
    seed: int = setting(0, ge=0)  # random-init baselines
    cache_dir: str | None = None  # None: $SELFSUP_CACHE/features or ~/.cache/selfsup/features
    no_cache: bool = False
    data: DataOptions = field(default_factory=DataOptions)
    out: str | None = "runs/probe"


@dataclass
class ModelRun:
    """One model's features, labels and protocol outputs (arrays for the report's figures)."""

    source: Source
    test_features: np.ndarray
    test_labels: np.ndarray
    metrics: dict[str, Any]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)


def _sources(config: ProbeConfig) -> list[Source]:
    sources: list[Source] = []
    for path in config.checkpoints:
        src = from_checkpoint(path, config.img_size, config.patch_size)
        sources.append(src)
        if config.compare_random_init:
            sources.append(random_init_twin(src, config.seed))
    sources += [
        from_model_name(name, config.img_size, config.patch_size, config.seed) for name in config.models
    ]
    if not sources:
        raise UsageError(
            "nothing to evaluate: give --checkpoint PATH (repeatable) or --model NAME --random-init"
        )
    seen, unique = set(), []
    for s in sources:  # e.g. two checkpoints of one architecture share a random-init twin
        key = str(s.identity()) + str(s.mean) + str(s.std)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique_names(unique)


def _check(config: ProbeConfig) -> None:
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise UsageError(
            f"unknown method(s) {', '.join(unknown) or '(none)'}; expected a subset of {','.join(METHODS)}"
        )
    if not config.ks or min(config.ks) < 1:
        raise UsageError(f"ks must be positive integers, got {config.ks}")
    check_feature_kind(config.feature)
    for name, value, low in (("batch_size", config.batch_size, 1), ("num_workers", config.num_workers, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if config.temperature <= 0:
        raise UsageError(f"the kNN temperature must be positive (DINO: 0.07), got {config.temperature}")
    if config.linear_protocol != "sklearn":
        resolve_protocol(config.linear_protocol, config.linear_head)  # 'torch', unknown names, bad overrides
    elif config.linear_head.augment:
        raise UsageError(
            "linear_head.augment=true trains a head on augmented views, which the sklearn protocol does "
            "not: use --linear-protocol mocov3 or mae"
        )


class _Features:
    """Features of one source on both splits, from the cache or extracted once."""

    def __init__(self, config: ProbeConfig, info: DatasetInfo, accelerator):
        self.config, self.info, self.accelerator = config, info, accelerator
        root = None if config.no_cache else (config.cache_dir or default_cache_dir())
        self.cache = FeatureCache(root)
        self.hits: list[str] = []

    def __call__(self, source: Source) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        cfg, info = self.config, self.info
        mean, std = source.mean or info.mean, source.std or info.std
        differs = source.kind == "checkpoint" and not (
            np.allclose(mean, info.mean, atol=1e-3) and np.allclose(std, info.std, atol=1e-3)
        )
        if differs:
            print(
                f"warning: {source.name} normalises with mean={list(mean)} std={list(std)} from its checkpoint, "
                f"which differ from {info.name}'s defaults mean={list(info.mean)} std={list(info.std)}",
                file=sys.stderr,
            )
        transform = eval_transform(source.spec.img_size, mean, std, info.image_size)
        model = None
        out = {}
        for split in ("train", "val"):
            # lists files, decodes nothing
            dataset, _ = build_dataset(cfg.dataset, split, transform, cfg.data)
            key = cache_key(
                {
                    "model": source.identity(),
                    "dataset": cfg.dataset,
                    "split": split,
                    "data": _data_identity(cfg.data),
                    "files": _file_list_digest(dataset),
                    "transform": repr(transform),
                    "feature": cfg.feature,
                    "precision": cfg.mixed_precision,  # resolved by run_probe
                }
            )
            hit = self.cache.get(key)
            if hit is not None:
                self.hits.append(f"{source.name}:{split}")
                out[split] = (hit.features, hit.labels, 0.0)
                continue
            if model is None:
                model = source.build()
                check_feature_kind(cfg.feature, model)
            start = time.perf_counter()
            feats, labels = extract_features(
                model,
                dataset,
                cfg.feature,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                mixed_precision=cfg.mixed_precision,
                accelerator=self.accelerator,
                desc=f"{source.name} {split}",
            )
            seconds = time.perf_counter() - start
            report_corrupt(dataset)
            check_finite(feats, f"{source.name}: {split} features")
            if self.accelerator.is_main_process:
                self.cache.put(
                    key, feats, labels, {"source": source.name, "split": split, "seconds": seconds}
                )
            self.accelerator.wait_for_everyone()
            out[split] = (feats, labels, seconds)
        return out


def _file_list_digest(dataset) -> str | None:
    """SHA-256 of an image folder's (path, label) list: added, removed or relabelled files change it.

    Files rewritten in place under the same name are not detected (use --no-cache after that).
    """
    indices = getattr(dataset, "indices", None)
    folder = getattr(dataset, "dataset", dataset)
    samples = getattr(folder, "samples", None)
    if samples is None:
        return None  # torchvision's fixed datasets and the built-in ones
    chosen = samples if indices is None else [samples[i] for i in indices]
    return hashlib.sha256("\n".join(f"{p}\t{y}" for p, y in chosen).encode()).hexdigest()


def _data_identity(options: DataOptions) -> dict[str, Any]:
    skip = {
        "root",
        "download",
        "strict",
        "shuffle",
        "need_labels",
        "hold_out",
    }  # they do not change what the data is
    return {k: v for k, v in vars(options).items() if k not in skip}


def _evaluate(config: ProbeConfig, source: Source, feats, info: DatasetInfo) -> ModelRun:
    """One model's protocols over its features: what it is, then kNN and the linear probe as asked."""
    train_x, train_y, train_s = feats["train"]
    test_x, test_y, test_s = feats["val"]
    if len(train_x) == 0 or len(test_x) == 0:
        raise UsageError(f"{config.dataset}: the train or val split is empty; nothing to evaluate")
    metrics = _model_metrics(source, train_x, test_x, train_s + test_s)
    run = ModelRun(source, test_x, test_y, metrics)
    n_classes = max(info.num_classes, int(train_y.max()) + 1, int(test_y.max()) + 1)
    if "knn" in config.methods:
        _knn(config, run, train_x, train_y, n_classes)
    if "linear" in config.methods:
        _linear(config, run, train_x, train_y, n_classes, info)
    return run


def _model_metrics(source: Source, train_x: np.ndarray, test_x: np.ndarray, seconds: float) -> dict[str, Any]:
    return {
        "name": source.name,
        "kind": source.kind,
        "path": source.path,
        "weights_sha256": source.weights_sha256,
        "spec": source.spec.to_dict(),
        "seed": source.seed if source.kind == "random_init" else None,
        "feature_dim": int(train_x.shape[1]),
        "n_train": len(train_x),
        "n_test": len(test_x),
        "extract_seconds": round(seconds, 2),
    }


def _knn(config: ProbeConfig, run: ModelRun, train_x, train_y, n_classes: int) -> None:
    """DINO's weighted kNN for every k; the best k's predictions feed the report's figures."""
    start = time.perf_counter()
    results = knn_classify(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(run.test_features),
        torch.from_numpy(run.test_labels),
        config.ks,
        config.temperature,
        n_classes,
        config.knn_backend,
        config.knn_index,
    )
    run.metrics["knn"] = {
        str(k): {"k": k, "k_used": r.k, "top1": r.top1, "top5": r.top5} for k, r in results.items()
    }
    run.metrics["knn_seconds"] = round(time.perf_counter() - start, 2)
    run.metrics["knn_index"] = next(iter(results.values())).index  # "flat" (exact) or the approximate index
    best = max(results, key=lambda k: results[k].top1)
    run.predictions[f"knn (k={best})"] = results[best].predictions.numpy()


def _linear(config: ProbeConfig, run: ModelRun, train_x, train_y, n_classes: int, info: DatasetInfo) -> None:
    """The linear probe of ``config.linear_protocol``: CLIP's logistic regression or a trained head."""
    start = time.perf_counter()
    test_x, test_y = run.test_features, run.test_labels
    if config.linear_protocol == "sklearn":
        result = logreg_probe(train_x, train_y, test_x, test_y, config.logreg)
    else:
        augment = config.linear_head.augment
        augmented = probe_augmented_batches(config, run.source, info) if augment else None
        result = train_linear_head(
            train_x, train_y, test_x, test_y, config.linear_head, n_classes, config.linear_protocol, augmented
        )
    run.metrics["linear"] = {
        "protocol": config.linear_protocol,
        "top1": result.top1,
        "top5": result.top5,
        **{k: v for k, v in result.details.items() if k != "protocol"},
    }
    run.metrics["linear_seconds"] = round(time.perf_counter() - start, 2)
    run.predictions[f"linear ({config.linear_protocol})"] = np.asarray(result.predictions)


def run_probe(config: ProbeConfig, accelerator=None) -> dict[str, Any]:
    """Evaluate every source in ``config``; write the report under ``config.out`` (when set)."""
    started = time.perf_counter()
    _check(config)
    _, info = build_dataset(config.dataset, "train", None, config.data)  # an unknown dataset fails here
    sources = _sources(config)
    if config.out:
        ensure_writable_dir(config.out, "--out")  # fail now, not after extracting every feature
    accelerator = accelerator or make_accelerator(None)  # features autocast themselves (selfsup.features)
    asked = config.mixed_precision
    config.mixed_precision = resolve_precision(asked, accelerator.device)  # recorded in the report
    if accelerator.is_main_process:
        announce(asked, config.mixed_precision, accelerator.device)
    features = _Features(config, info, accelerator)
    runs = [_evaluate(config, s, features(s), info) for s in sources]
    metrics = {
        "dataset": config.dataset,
        "classes": list(info.classes),
        "feature": config.feature,
        "methods": list(config.methods),
        "models": [r.metrics for r in runs],
        "cache_hits": features.hits,
        "wall_seconds": None,
        # what the numbers depend on besides seeds: the same machine and threads give the same numbers
        "machine": describe_cpu(),
        "torch_threads": torch.get_num_threads(),
        "mixed_precision": config.mixed_precision,
    }
    if config.out and accelerator.is_main_process:
        from selfsup.eval.report import write_report

        metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
        write_report(Path(config.out), config, metrics, runs, info)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    return metrics
