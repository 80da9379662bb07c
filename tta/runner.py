"""Run each method over a corruption set under one protocol and measure what a reader compares:
top-1 error per corruption, clean accuracy at the end of the stream (forgetting), forward and
backward passes, wall time and peak memory."""

from __future__ import annotations

import copy
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsup.checkpoint import CheckpointMeta, load_classifier
from selfsup.errors import UsageError
from selfsup.precision import autocast
from selfsup.tta.adapter import Adapter, NormStats, Source
from selfsup.tta.benchmark import CorruptionSet, stream, to_model_input
from selfsup.tta.eata import EATA
from selfsup.tta.folder_set import FolderSet
from selfsup.tta.memo import MEMO, default_settings
from selfsup.tta.sar import SAR, sar_lr
from selfsup.tta.settings import TTAConfig
from selfsup.tta.tent import Tent


class Inputs:
    """uint8 images -> the classifier's normalized input (:func:`to_model_input`)."""

    def __init__(self, meta: CheckpointMeta, device: torch.device):
        self.meta, self.device = meta, device

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return to_model_input(images, self.meta.mean, self.meta.std, self.meta.img_size, self.device)


def build_adapter(
    method: str,
    model: nn.Module,
    config: TTAConfig,
    meta: CheckpointMeta,
    clean: Callable | None,
    native_size: int,
) -> Adapter:
    """``native_size``: the test images' own side (MEMO's crops and defaults depend on it)."""
    lr = config.entropy_lr
    if method == "source":
        return Source(model)
    if method == "norm":
        try:
            return NormStats(model)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if method == "tent":
        return Tent(model, lr=lr, steps=config.steps, optimizer=config.tent_optimizer)
    if method in ("eta", "eata"):
        return _eata(model, config, meta, clean if method == "eata" else None)
    if method == "sar":
        s = config.sar
        return SAR(
            model,
            sar_lr(config.lr, config.batch_size),
            rho=s.rho,
            e_margin_coeff=s.e_margin_coeff,
            reset_below=s.reset_below,
        )
    if method == "memo":
        return _memo(model, config, meta, native_size)
    raise UsageError(f"unknown method {method}")


def _eata(model: nn.Module, config: TTAConfig, meta: CheckpointMeta, clean: Callable | None) -> EATA:
    """EATA with the Fisher from ``clean(n)``'s batches, ETA without (``clean=None``); the reference's
    d_margin unless set: 0.05 for ImageNet-sized label sets, 0.4 for CIFAR-10's."""
    s = config.eata
    d_margin = s.d_margin if s.d_margin is not None else (0.05 if meta.num_classes >= 1000 else 0.4)
    return EATA(
        model,
        config.entropy_lr,
        e_margin_coeff=s.e_margin_coeff,
        d_margin=d_margin,
        fisher_alpha=s.fisher_alpha,
        clean_batches=clean(s.fisher_size) if clean is not None else None,
    )


def _memo(model: nn.Module, config: TTAConfig, meta: CheckpointMeta, native_size: int) -> MEMO:
    """MEMO with the reference's settings for images of ``native_size``, each overridable in the config."""
    optimizer, lr, weight_decay, views = default_settings(native_size)
    s = config.memo
    return MEMO(
        model,
        meta.mean,
        meta.std,
        optimizer=s.optimizer or optimizer,
        lr=s.lr if s.lr is not None else lr,
        weight_decay=s.weight_decay if s.weight_decay is not None else weight_decay,
        views=s.views or views,
        seed=config.seed,
    )


@dataclass
class MethodResult:
    method: str
    errors: dict[str, float]  # top-1 error (%) per corruption
    mean_error: float
    clean_top1_after: float | None  # clean top-1 (%) of the adapted model at the end of the stream
    forwards: int
    backwards: int
    seconds: float
    images: int
    peak_memory_mb: float | None
    memory_kind: str
    extra: dict[str, float] = field(default_factory=dict)


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    # per-method CPU peaks are not measurable in one process; the process's peak RSS is what it is
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


class Benchmark:
    """One corruption set, one protocol, one classifier: ``run(method) -> MethodResult``."""

    def __init__(
        self, config: TTAConfig, corruption_set: CorruptionSet | FolderSet, names: tuple[str, ...], device
    ):
        self.config, self.set, self.names, self.device = config, corruption_set, names, device
        self.original, self.meta = load_classifier(config.checkpoint, "test-time adaptation")
        self.original.to(device)
        self.inputs = Inputs(self.meta, device)
        if isinstance(corruption_set, FolderSet):  # wnid folders -> the classifier's class indices
            corruption_set.use_classes(self.meta.class_names, config.checkpoint)
        self.labels = corruption_set.labels
        n_classes = self.meta.num_classes
        if self.labels.min() < 0 or self.labels.max() >= n_classes:
            raise UsageError(
                f"{corruption_set.root}/labels.npy holds labels {self.labels.min()}..{self.labels.max()} but "
                f"{config.checkpoint} predicts {n_classes} classes: the set and the classifier do not match"
            )
        self.clean_images = corruption_set.clean()

    def clean_batches(self, limit: int):
        """EATA's Fisher images: the first ``limit`` clean images in a seeded order."""
        if self.clean_images is None:
            raise UsageError(
                f"eata needs clean images for its Fisher information and {self.set.root} has no clean.npy "
                "(npy layout) or clean/ folder (ImageNet-C layout): build the set with python -m "
                "selfsup.tta.generate or selfsup.tta.generate_imagenet_c (they write them), or use eta"
            )
        order = np.random.default_rng(self.config.seed + 2).permutation(len(self.clean_images))[:limit]
        for start in range(0, len(order), self.config.batch_size):
            yield self.inputs(self.clean_images[order[start : start + self.config.batch_size]])

    def _clean_top1(self, adapter: Adapter) -> float | None:
        """Clean top-1 of the model as adapted, on the clean twins of the test images (the same
        seeded subset when ``limit`` is set); not adapting, not counted in the passes."""
        if self.clean_images is None:
            return None
        order = np.random.default_rng(self.config.seed).permutation(len(self.labels))[: self.n_images]
        correct = 0
        with torch.no_grad():
            for start in range(0, len(order), 256):
                index = order[start : start + 256]
                logits = adapter.model(self.inputs(self.clean_images[index]))
                correct += int((logits.argmax(1).cpu().numpy() == self.labels[index]).sum())
        return 100.0 * correct / len(order)

    def run(self, method: str) -> MethodResult:
        config = self.config
        model = copy.deepcopy(self.original)
        torch.manual_seed(config.seed)
        adapter = build_adapter(method, model, config, self.meta, self.clean_batches, self.set.image_size)
        adapter.forwards = adapter.backwards = 0  # Fisher estimation is set-up, not test-time cost
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # ... and so is its memory
        correct = np.zeros(len(self.names))
        seen = np.zeros(len(self.names))
        batches, total = self._batches()
        start = time.perf_counter()
        first = True
        for batch in tqdm(batches, desc=method, total=total, unit="batch", leave=False, file=sys.stderr):
            if config.protocol == "reset" and batch.starts_task and not first:
                adapter.reset()
            first = False
            x = self.inputs(batch.images)
            raw = {"raw": batch.images} if isinstance(adapter, MEMO) else {}
            with autocast(self.device, config.mixed_precision):  # resolved by the pipeline
                logits = adapter(x, **raw)
            hits = logits.argmax(1).cpu().numpy() == batch.labels
            np.add.at(correct, batch.sources, hits)
            np.add.at(seen, batch.sources, 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        memory, kind = peak_memory(self.device)
        passes = adapter.forwards, adapter.backwards
        clean = self._clean_top1(adapter)
        errors = {name: 100.0 * (1 - c / s) for name, c, s in zip(self.names, correct, seen)}
        extra = {}
        if hasattr(adapter, "kept"):
            extra["adapted share (%)"] = 100.0 * adapter.kept / max(adapter.seen, 1)
        if hasattr(adapter, "recoveries"):
            extra["recoveries"] = float(adapter.recoveries)
        return MethodResult(
            adapter.name,
            errors,
            float(np.mean(list(errors.values()))),
            clean,
            *passes,
            seconds,
            int(seen.sum()),
            memory,
            kind,
            extra,
        )

    def _batches(self):
        """The protocol's stream of test batches and its length in batches (None when mixed)."""
        config = self.config
        batches = stream(
            self.set,
            self.names,
            config.severity,
            config.protocol,
            config.batch_size,
            config.seed,
            config.limit,
            config.label_shift,
            config.workers,
        )
        per_task = self.n_images * (1 if config.label_shift is None else 2)  # SAR's stream: twice
        total = None if config.protocol == "mixed" else len(self.names) * -(-per_task // config.batch_size)
        return batches, total

    @property
    def n_images(self) -> int:
        """Test images per corruption (``limit`` of them when set)."""
        return len(self.labels) if self.config.limit is None else min(self.config.limit, len(self.labels))
