"""The ``compress`` command's work: original -> pruned -> recovered -> INT8, each variant measured the
same way, saved, and written up."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.checkpoint import (
    CheckpointMeta,
    content_hash,
    load_classifier,
    save_checkpoint,
    source_line,
    weights_path,
)
from selfsup.compress import measure, summary
from selfsup.compress.prune import count, prune_l1
from selfsup.compress.quantize import (
    FrozenCompiled,
    check_export,
    export_onnx,
    quantize,
    quantize_pt2e,
    save_program,
    session,
)
from selfsup.compress.recover import check_recovery, recover, train_transform
from selfsup.compress.settings import CompressConfig
from selfsup.config import save_config, to_dict
from selfsup.data import DataOptions, build_dataset
from selfsup.errors import UsageError
from selfsup.files import atomic_write_bytes
from selfsup.imagefolder import first_readable, report_corrupt
from selfsup.loop import on_main, start_process
from selfsup.models import create_backbone
from selfsup.precision import describe_cpu
from selfsup.shapes import shape_manifest
from selfsup.transforms import eval_transform


def _options(config: CompressConfig) -> DataOptions:
    return DataOptions(root=config.data_root, val_fraction=config.val_fraction, seed=config.seed)


def stacked(
    dataset, transform, limit: int | None, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A map-style split's images through ``transform`` as one float32 array, and its labels;
    unreadable images (``None``, logged by the dataset) are left out."""
    index = np.arange(len(dataset)) if order is None else order
    index = index[:limit] if limit is not None else index
    pairs = [pair for pair in (dataset[int(i)] for i in index) if pair is not None]
    images = np.stack([transform(image).numpy() for image, _ in pairs]).astype(np.float32)
    return images, np.array([label for _, label in pairs])


def _check_classes(meta: CheckpointMeta, classes, dataset: str, path: str) -> None:
    if list(meta.class_names) != list(classes):
        raise UsageError(
            f"{path} predicts {meta.num_classes} classes ({', '.join(meta.class_names[:4])}, ...) but {dataset} has "
            f"{len(classes)} ({', '.join(list(classes)[:4])}, ...): pass the dataset the classifier was fine-tuned on"
        )


@dataclass
class CompressResult:
    status: str  # "finished" | "interrupted" (recovery stopped by a signal, its checkpoint saved)
    out: Path
    step: int = 0  # recovery's
    total_steps: int = 0
    signal: int | None = None
    table: str = ""
    paths: dict[str, Path] = field(default_factory=dict)


def run(config: CompressConfig) -> CompressResult:
    """Prune and recover in every process (recovery is a core training run), then measure, quantize
    and report on the main process. Every refusal (a resume of another recovery run included) comes
    before the first write, so a refused run leaves ``out`` as it was."""
    original, meta = load_classifier(config.checkpoint, "compression")
    val, info = build_dataset(config.dataset, "val", None, _options(config))
    _check_classes(meta, info.classes, config.dataset, config.checkpoint)
    accelerator = start_process(config)  # out writable, threads, seed; the processes of accelerate launch
    out, main = Path(config.out), accelerator.is_main_process
    # fine-tuning's evaluation transform: small images whole (no centre crop), larger ones at 0.875
    transform = eval_transform(meta.img_size, meta.mean, meta.std, info.image_size)
    example = transform(first_readable(val.__getitem__, 0, len(val), config.dataset)[0]).unsqueeze(0)
    pruned = _prune(original, example, config, main) if config.prune == "l1" else None
    recovery = None
    if pruned is not None and config.recover_epochs:
        train, _ = build_dataset(config.dataset, "train", None, _options(config))
        shapes = shape_manifest(pruned, create_backbone(meta.spec, num_classes=meta.num_classes))
        facts = {"dataset": info.name, "classes": list(info.classes), "shapes": shapes}
        check_recovery(config, train, facts, accelerator)
        recovery = train, facts, _teacher(config, original)  # a teacher that cannot be read: refused here
    on_main(accelerator, lambda: save_config(config, out / "config.yaml"))  # the first write
    stages: list[tuple[str, nn.Module, Path, str]] = []  # (variant, model, saved file, note)
    result = CompressResult("finished", out)
    if pruned is not None:
        path = on_main(accelerator, lambda: _save_pruned(out / "pruned", pruned, meta, config, "pruned"))
        stages.append(("pruned", pruned, path, f"L1, target {config.target_macs:g}"))
    if recovery is not None:
        recovered = _recovered(accelerator, config, meta, info, pruned, recovery, result)
        if recovered is None:  # stopped by a signal, its checkpoint saved
            return result
        stages.append(recovered)
    report = on_main(accelerator, lambda: _measure_and_report(config, meta, original, stages, val, transform))
    if report is not None:  # the main process's
        result.table, result.paths = report
    return result


def _prune(original: nn.Module, example: torch.Tensor, config: CompressConfig, main: bool) -> nn.Module:
    pruned = copy.deepcopy(original)
    pruning = prune_l1(pruned, example, config.target_macs)
    if main:
        print(
            f"pruned to {100 * pruning.macs_ratio:.1f}% of the MACs ({pruning.params_after:,} of "
            f"{pruning.params_before:,} parameters)",
            file=sys.stderr,
        )
    return pruned


def _recovered(
    accelerator,
    config: CompressConfig,
    meta: CheckpointMeta,
    info,
    pruned: nn.Module,
    recovery: tuple[Any, dict[str, Any], nn.Module | None],
    result: CompressResult,
) -> tuple[str, nn.Module, Path, str] | None:
    """Recovery training of a copy of ``pruned`` (``recovery``: its training set, checkpoint facts
    and teacher), saved as ``OUT/recovered``: its stage entry, or None when a signal stopped it."""
    recovered = copy.deepcopy(pruned)
    train, facts, teacher = recovery
    transform = train_transform(meta.img_size, info.image_size, meta.mean, meta.std)
    done = recover(accelerator, recovered, train, transform, config, facts, teacher)
    result.step, result.total_steps, result.signal = done.step, done.total_steps, done.signal
    on_main(accelerator, lambda: report_corrupt(train, what="recovery"))  # each replaced, in train
    if done.status == "interrupted":
        result.status = "interrupted"
        return None
    out = Path(config.out)
    path = on_main(
        accelerator, lambda: _save_pruned(out / "recovered", recovered, meta, config, "pruned+recovered")
    )
    how = (
        "distilled from " + ("the unpruned model" if config.teacher == "self" else str(config.teacher))
        if teacher
        else "labels only"
    )
    return "pruned + recovered", recovered, path, f"{config.recover_epochs} epochs, {how}"


def _measure_and_report(
    config: CompressConfig,
    meta: CheckpointMeta,
    original: nn.Module,
    stages: list[tuple[str, nn.Module, Path, str]],
    val,
    transform,
) -> tuple[str, dict[str, Path]]:
    """Every variant measured the same way (top-1, agreement, size, MACs, latency, peak memory),
    INT8 ones made from the original and the last pruned model; report.md/html and metrics.json."""
    for model in (original, *(model for _, model, _, _ in stages)):
        model.cpu()  # deployment is measured on the CPU, whichever device recovery trained on
    bench = Bench(config, *stacked(val, transform, config.limit), original)
    bench.skipped = [path for path, _ in report_corrupt(val, what="validation, not counted")]
    source = weights_path(config.checkpoint)
    bench.add(
        "original (fp32)",
        measure.torch_predict(original),
        source.stat().st_size,
        original,
        "",
        ("torch", source),
    )
    for name, model, path, note in stages:
        bench.add(name, measure.torch_predict(model), path.stat().st_size, model, note, ("torch", path))
    if config.quantize != "none":
        final_name, final = stages[-1][:2] if stages else ("original", original)
        calibration = _calibration(config, transform)
        for name, model in [("original", original)] + (
            [(final_name, final)] if final is not original else []
        ):
            label, stem = ("INT8", "original") if model is original else (f"{name} + INT8", "pruned")
            quantize_variant = _pt2e_variant if config.quantize == "int8-pt2e" else _onnx_variant
            quantize_variant(bench, label, model, calibration, Path(config.out) / stem)
    return _report(config, meta, bench)


@dataclass
class Bench:
    """The validation images every variant is measured on, the original's predictions on them, and
    the variants measured so far."""

    config: CompressConfig
    images: np.ndarray
    labels: np.ndarray
    original: nn.Module
    variants: list[measure.Variant] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable validation files, not counted

    def __post_init__(self) -> None:
        self.example = torch.from_numpy(self.images[:1])
        self.reference = measure.predictions(measure.torch_predict(self.original), self.images)

    def add(self, name: str, predict, file_bytes: int, model=None, note="", stored=None) -> measure.Variant:
        """Measure a variant; ``model`` for its MACs and parameters; ``stored``: (kind, path) of its
        file, for the peak-memory child process."""
        config = self.config
        preds = self.reference if model is self.original else measure.predictions(predict, self.images)
        macs, params = count(model, self.example) if model is not None else (None, None)
        latency = {
            b: measure.latency_ms(predict, self.images, b, config.latency_repeats)
            for b in config.latency_batches
        }
        variant = measure.Variant(
            name,
            100.0 * float((preds == self.labels).mean()),
            100.0 * float((preds == self.reference).mean()),
            params,
            macs,
            file_bytes,
            latency,
            note,
        )
        if stored is not None and config.measure_memory:
            shape = (max(config.latency_batches), *self.images.shape[1:])
            variant.peak_mib = measure.peak_memory_mib(*stored, shape, torch.get_num_threads())
        self.variants.append(variant)
        print(f"{name}: top-1 {variant.top1:.2f}%, {variant.file_bytes / 1e6:.2f} MB", file=sys.stderr)
        return variant


def _calibration(config: CompressConfig, transform) -> list[np.ndarray] | None:
    """Seeded batches of training images for the static INT8 modes (None for dynamic)."""
    if config.quantize not in ("int8-static", "int8-pt2e"):
        return None
    train, _ = build_dataset(config.dataset, "train", None, _options(config))
    order = np.random.default_rng(config.seed).permutation(len(train))
    images, _ = stacked(train, transform, config.calibrate, order)
    report_corrupt(train, what="calibration")
    return [images[i : i + 32] for i in range(0, len(images), 32)]


def _onnx_variant(bench: Bench, label: str, model: nn.Module, calibration, stem: Path) -> None:
    """fp32 ONNX (checked against torch), quantized by ONNX Runtime, measured in ONNX Runtime."""
    fp32 = export_onnx(model, bench.example, f"{stem}.fp32.onnx")
    diff = check_export(model, fp32, torch.from_numpy(bench.images[:8]))
    int8 = quantize(fp32, f"{stem}.int8.onnx", bench.config.quantize, calibration)
    note = (
        f"{bench.config.quantize}, ONNX Runtime; fp32 ONNX {fp32.stat().st_size / 1e6:.2f} MB, "
        f"matches torch to {diff:.1e}"
    )
    predict = measure.onnx_predict(session(int8, torch.get_num_threads()))
    variant = bench.add(label, predict, int8.stat().st_size, None, note, ("onnx", int8))
    variant.fp32_bytes = fp32.stat().st_size


def _pt2e_variant(bench: Bench, label: str, model: nn.Module, calibration, stem: Path) -> None:
    """torchao's PT2E INT8 saved as ``STEM.int8.pt2`` and compiled (frozen int8 weights) for the
    timings; the fp32 program saved beside it (``STEM.fp32.pt2``) for the same-container size."""
    example = bench.example
    two = example[:1].expand(2, *example.shape[1:]).contiguous()
    fp32 = save_program(torch.export.export(model.eval(), (two,)), f"{stem}.fp32.pt2")
    program = quantize_pt2e(model, example, calibration)
    int8 = save_program(program, f"{stem}.int8.pt2")
    predict = measure.torch_predict(FrozenCompiled(program), set_eval=False)
    note = "int8-pt2e, torchao + torch.compile (frozen int8 weights)"
    variant = bench.add(label, predict, int8.stat().st_size, None, note, ("pt2", int8))
    variant.fp32_bytes = fp32.stat().st_size


def _report(config: CompressConfig, meta: CheckpointMeta, bench: Bench) -> tuple[str, dict[str, Path]]:
    """report.md/html and metrics.json from the measured variants; returns the table and the paths."""
    out = Path(config.out)
    facts = [
        f"**Classifier** `{config.checkpoint}` ({meta.spec.arch}, {meta.num_classes} classes, {meta.img_size} px).",
        f"**Validation** {config.dataset}, {len(bench.labels)} images (the split fine-tuning validated on)"
        + (
            f"; {len(bench.skipped)} unreadable file(s) skipped: {', '.join(bench.skipped)}."
            if bench.skipped
            else "."
        ),
        f"**Machine** {describe_cpu()}; {torch.get_num_threads()} threads for torch and ONNX Runtime alike; "
        f"latency: median of {config.latency_repeats} runs after a warm-up, in this process.",
    ]
    if line := source_line(meta.source):
        facts.insert(1, line)  # the classifier descends from a released file
    paths = summary.write(out, "Compression: " + Path(config.checkpoint).name, facts, bench.variants)
    payload = {"config": to_dict(config), "source": meta.source}
    payload["variants"] = [dataclasses.asdict(v) for v in bench.variants]
    payload.update(images=len(bench.labels), skipped=bench.skipped)
    atomic_write_bytes(out / "metrics.json", json.dumps(payload, indent=2).encode())
    return summary.markdown_table(bench.variants), paths


def _teacher(config: CompressConfig, original: nn.Module) -> nn.Module | None:
    if config.teacher is None:
        return None
    if config.teacher == "self":
        return original
    teacher, _ = load_classifier(config.teacher, "distillation")
    return teacher


def _save_pruned(
    path: Path, model: nn.Module, meta: CheckpointMeta, config: CompressConfig, what: str
) -> Path:
    """The pruned classifier in the project format: the sidecar's shape manifest rebuilds it with plain torch."""
    reference = create_backbone(meta.spec, num_classes=meta.num_classes)
    pruned_meta = dataclasses.replace(
        meta,
        stage="compress",
        config={"compress": to_dict(config), "variant": what},
        parent_sha256=content_hash(config.checkpoint),
        shapes=shape_manifest(model, reference),
        timm={},  # stock timm cannot build the pruned shapes
        source=dict(meta.source),  # the released file the classifier descends from, if any
    )
    return save_checkpoint(path, model.state_dict(), pruned_meta)
