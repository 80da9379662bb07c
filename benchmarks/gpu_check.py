"""One command that checks every GPU path: install, each stage in bf16, the MoCo v3 step, input, 2 GPUs.

    .venv/bin/python benchmarks/gpu_check.py                  # a GPU machine: runs/gpu_check/ (< 8 min on one GPU)
    .venv/bin/python benchmarks/gpu_check.py --out /tmp/gc    # elsewhere
    .venv/bin/python benchmarks/gpu_check.py --device cpu     # the same checks at the smallest sizes (--smoke: CI)

Writes OUT/gpu_check.json (every number), OUT/gpu_check.md (the table it also prints) and one log per
check under OUT/logs/. Each check ends as pass, fail (with the error's one line) or skip (with why),
with its seconds; a failure never stops the others. Exit status 0 when nothing failed, else 1.
What each check does and how its numbers are computed: docs/gpu-check.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the PCIe/NVL boards come before their SXM one.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
)
# A MoCo v3 step per image: 2 views x (the base encoder's forward and backward, ~3 forwards, plus
# the momentum encoder's forward) = 8 backbone forwards; FLOPs = 2 x MACs. Heads are left out.
FORWARDS_PER_STEP_IMAGE = 8
# Stage checks run a ViT this small: they prove a path runs on the device, not how fast.
TINY_VIT = [
    f"model.{key}={value}"
    for key, value in {
        "arch": "moco_vit_tiny", "img_size": 32, "patch_size": 8,
        "extra.depth": 1, "extra.embed_dim": 32, "extra.num_heads": 2,
    }.items()
]  # fmt: skip
MOCO_HEADS = (256, 4096)  # MoCo v3's projector/predictor (dim, mlp_dim) for ViTs


@dataclass(frozen=True)
class Sizes:
    """How much each timed check does on a device."""

    step_models: tuple[tuple[str, str, int], ...]  # (label, arch, batch), patch 16; batch 0: skipped
    step_size: int  # image size of the step (px)
    steps: int
    warmup: int
    input_images: int
    input_batch: int
    input_workers: int


SIZES = {
    "cuda": Sizes(
        (("ViT-S/16", "moco_vit_small", 128), ("ViT-B/16", "moco_vit_base", 64)),
        step_size=224,
        steps=10,
        warmup=3,
        input_images=1024,
        input_batch=64,
        input_workers=min(16, os.cpu_count() or 1),
    ),
    # CI on 2 busy cores: one step of the smallest case, a few JPEGs through one worker
    "cpu": Sizes(
        (("ViT-S/16", "moco_vit_small", 2), ("ViT-B/16", "moco_vit_base", 0)),
        step_size=64,  # the code path, not a measurement: 16 patches instead of 196
        steps=1,
        warmup=0,
        input_images=24,
        input_batch=8,
        input_workers=1,
    ),
}


class Skipped(Exception):
    """A check that does not apply here (its message says why)."""


class Failed(Exception):
    """A check that ran and found something wrong (its message says what)."""


# --- running checks --------------------------------------------------------------------------------


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_check(name: str, fn: Callable[[dict], None], logs: Path) -> dict:
    """``fn(detail)`` with its output in ``logs/NAME.log``: pass, skip or fail (one line), and seconds.

    ``fn`` fills ``detail`` as it goes (``detail["summary"]``: the table's line), so a failure keeps
    what was measured before it."""
    detail: dict = {}
    log = logs / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".log")
    status, error, start = "pass", None, time.perf_counter()
    with open(log, "w") as out:
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                fn(detail)
        except Skipped as why:
            status, error = "skip", str(why)
        except SystemExit as stop:  # a stage's command refused (exit 2: its one line is in the log)
            if stop.code not in (0, None):
                out.flush()
                status, error = "fail", f"exit {stop.code}: {last_line(log.read_text())}"
        except Exception as err:
            traceback.print_exc(file=out)
            status, error = (
                "fail",
                f"{type(err).__name__}: {(str(err).strip().splitlines() or [repr(err)])[0]}",
            )
    seconds = round(time.perf_counter() - start, 1)
    print(f"{status:4s} {name} ({seconds} s){': ' + error if error else ''}", file=sys.stderr, flush=True)
    return {"check": name, "status": status, "seconds": seconds, "error": error, "detail": detail}


# --- 1. the installation ---------------------------------------------------------------------------


def install_check(device: str) -> Callable[[dict], None]:
    def check(detail: dict) -> None:
        import accelerate
        import timm
        import torch

        from selfsup.eval.knn import _faiss, faiss_gpus

        faiss = _faiss()
        cuda = torch.cuda.is_available()
        detail.update(
            torch=torch.__version__,
            cuda_build=torch.version.cuda,
            cuda_seen=cuda,
            gpus=torch.cuda.device_count(),
            device_name=device_name(),
            bf16=torch.cuda.is_bf16_supported() if cuda else None,
            faiss=getattr(faiss, "__version__", None),
            faiss_gpus=faiss_gpus(),
            accelerate=accelerate.__version__,
            timm=timm.__version__,
        )
        detail["summary"] = (
            f"torch {detail['torch']} (CUDA {detail['cuda_build']}), {detail['gpus']} GPU(s), bf16 {detail['bf16']}, "
            f"faiss {detail['faiss']} ({detail['faiss_gpus']} GPU), accelerate {detail['accelerate']}, timm {detail['timm']}"
        )
        if device == "cpu":
            return
        problems = [
            text
            for ok, text in (
                (cuda, "torch sees no CUDA device"),
                (detail["bf16"], "the GPU has no bf16"),
                (faiss is not None, "faiss is not installed"),
                (detail["faiss_gpus"] > 0, "faiss sees no GPU (faiss-cpu installed instead of faiss-gpu?)"),
            )
            if not ok
        ]
        if problems:
            raise Failed("; ".join(problems))

    return check


def device_name() -> str:
    import torch

    from selfsup.precision import describe_cpu

    return torch.cuda.get_device_name() if torch.cuda.is_available() else describe_cpu()


def bf16_peak_tflops(name: str) -> float | None:
    """The GPU's dense bf16 peak by name (:data:`BF16_PEAK_TFLOPS`), None when unknown (and on CPUs)."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


# --- 2. each stage on the device ------------------------------------------------------------------


class Stages:
    """The five stages chained on the digits (built in), each through its command's ``main``, in this
    process. A stage whose input is missing (the one before it failed) starts from a random-init
    stand-in, so one failure does not hide the next."""

    def __init__(self, work: Path, device: str):
        self.work = work
        self.device = device
        self.precision = "bf16" if device == "cuda" else "auto"  # CPUs: bf16 only where native

    def checks(self) -> dict[str, Callable[[dict], None]]:
        return {
            "pretrain": self.pretrain,
            "probe": self.probe,
            "probe kNN = faiss-cpu": self.knn_agrees,
            "finetune": self.finetune,
            "tta": self.tta,
            "compress": self.compress,
        }

    def pretrain(self, detail: dict) -> None:
        from selfsup.ssl.cli import main

        out = self.work / "pretrain"
        main(["--config", str(CONFIGS / "pretrain" / "digits_cpu.yaml"), f"out={out}", "max_steps=2", "batch_size=32",
              "num_workers=0", "progress_bar=false", "monitor_every=1", "monitor_train_size=64", "monitor_val_size=32",
              "moco.dim=16", "moco.mlp_dim=32", f"mixed_precision={self.precision}", *TINY_VIT])  # fmt: skip
        log = read_jsonl(out / "log.jsonl")
        losses = [r["loss"] for r in log if "event" not in r]
        monitor = [r["knn_top1_k20"] for r in log if r.get("event") == "monitor"]
        detail.update(losses=losses, monitor=monitor, precision=resolved_precision(out))
        detail["summary"] = (
            f"{len(losses)} steps in {detail['precision']}, last loss {losses[-1]:.4f}, "
            f"kNN monitor top-1 {monitor[-1] if monitor else '-'}"
        )
        if not monitor:
            raise Failed("the kNN monitor did not run before the first step")

    def probe(self, detail: dict) -> None:
        from selfsup.eval.cli import main
        from selfsup.eval.knn import faiss_gpus

        # without faiss-gpu (the install check fails then) the features are still checked on the GPU
        backend = "faiss-gpu" if self.device == "cuda" and faiss_gpus() > 0 else "auto"
        main(["--checkpoint", str(self.backbone()), "--dataset", "digits", "--method", "knn", "--ks", "10,20",
              "--knn-backend", backend, "--out", str(self.work / "probe"), "--cache-dir", str(self.work / "cache"),
              "--num-workers", "0", "--mixed-precision", self.precision])  # fmt: skip
        model = json.loads((self.work / "probe" / "metrics.json").read_text())["models"][0]
        detail.update(knn={k: v["top1"] for k, v in model["knn"].items()}, backend=backend)
        detail["summary"] = f"kNN top-1 k=20 {model['knn']['20']['top1']:.2f} ({backend})"

    def knn_agrees(self, detail: dict) -> None:
        """The probe's own features searched by the device's kNN and by faiss-cpu: same neighbours."""
        from selfsup.eval.knn import _faiss, classify_neighbours, faiss_gpus, neighbours, recall_at_k

        if _faiss() is None:
            raise Skipped("faiss is not installed")
        if self.device == "cuda" and faiss_gpus() == 0:
            raise Failed("faiss sees no GPU: faiss-gpu's kNN is not checked (pip install '.[gpu]')")
        (train_x, train_y), (val_x, val_y) = self.cached_features()
        other = "faiss-gpu" if self.device == "cuda" else "torch"
        found = {b: neighbours(train_x, val_x, 20, b, "flat") for b in (other, "faiss-cpu")}
        top1 = {b: classify_neighbours(f, train_y, val_y, ks=(20,))[20].top1 for b, f in found.items()}
        recall = recall_at_k(found[other].idx, found["faiss-cpu"].idx)
        same = (found[other].idx == found["faiss-cpu"].idx).all(dim=1).float().mean().item()
        detail.update(compared=other, recall_at_20=recall, rows_identical=same, top1=top1)
        detail["summary"] = (
            f"{other} vs faiss-cpu on {len(val_x)} queries: recall@20 {recall:.4f}, "
            f"{100 * same:.1f}% rows in the same order, top-1 {top1[other]:.2f} vs {top1['faiss-cpu']:.2f}"
        )
        if recall < 0.999 or top1[other] != top1["faiss-cpu"]:
            raise Failed(detail["summary"])

    def cached_features(self):
        """(train, val) (features, labels) the probe cached under WORK/cache."""
        import numpy as np
        import torch

        by_split = {}
        for info in (self.work / "cache").glob("*/info.json"):
            split = json.loads(info.read_text())["split"]
            by_split[split] = tuple(
                torch.from_numpy(np.load(info.parent / name)) for name in ("features.npy", "labels.npy")
            )
        if set(by_split) != {"train", "val"}:
            raise Failed(
                f"the probe cached {sorted(by_split)} under {self.work / 'cache'}, not train and val"
            )
        return by_split["train"], by_split["val"]

    def finetune(self, detail: dict) -> None:
        from selfsup.finetune.cli import main

        out = self.work / "finetune"
        main(["--config", str(CONFIGS / "finetune" / "digits_cpu.yaml"), "--checkpoint", str(self.backbone()),
              "--out", str(out), "max_steps=2", "batch_size=32", "progress_bar=false",
              f"mixed_precision={self.precision}"])  # fmt: skip
        top1 = [r["top1"] for r in read_jsonl(out / "metrics.jsonl")]
        detail.update(top1=top1, precision=resolved_precision(out))
        detail["summary"] = f"2 steps in {detail['precision']}, validation top-1 {top1[-1]:.2f}"

    def tta(self, detail: dict) -> None:
        from selfsup.tta.cli import main
        from selfsup.tta.generate import main as generate

        corrupted, out = self.work / "digits-c", self.work / "tta"
        generate(["--dataset", "digits", "--split", "val", "--corruptions", "contrast", "--severities", "3",
                  "--limit", "32", "--out", str(corrupted)])  # fmt: skip
        main(["--checkpoint", str(self.classifier()), "--dataset", str(corrupted), "--corruptions", "contrast",
              "--severity", "3", "--method", "source,tent,eata,sar,memo", "--batch-size", "16", "--out", str(out),
              "eata.fisher_size=16", "memo.views=2", f"mixed_precision={self.precision}"])  # fmt: skip
        results = json.loads((out / "results.json").read_text())["results"]
        detail["errors"] = {r["method"]: r["mean_error"] for r in results}
        detail["summary"] = ", ".join(f"{m} {e:.1f}" for m, e in detail["errors"].items()) + " (% error)"

    def compress(self, detail: dict) -> None:
        from selfsup.compress.cli import main

        out = self.work / "compress"
        main([f"checkpoint={self.classifier()}", "dataset=digits", "prune=l1", "target_macs=0.6", "recover_epochs=1",
              "max_steps=2", "batch_size=16", "teacher=self", "quantize=int8-dynamic", "calibrate=32",
              "progress_bar=false", "measure_memory=false", "latency_repeats=1", "latency_batches=[1]", "limit=64",
              f"mixed_precision={self.precision}", f"out={out}"])  # fmt: skip
        variants = json.loads((out / "metrics.json").read_text())["variants"]
        detail["top1"] = {v["name"]: v["top1"] for v in variants}
        detail["summary"] = ", ".join(f"{n} {t:.1f}" for n, t in detail["top1"].items()) + " (top-1 %)"

    def backbone(self) -> Path:
        made = self.work / "pretrain" / "backbone.safetensors"
        return made if made.is_file() else self.stand_in("backbone", "pretrain")

    def classifier(self) -> Path:
        made = self.work / "finetune" / "best.safetensors"
        return made if made.is_file() else self.stand_in("classifier", "finetune")

    def stand_in(self, name: str, stage: str) -> Path:
        """A random-init tiny ViT (a classifier of the digits' classes for ``finetune``) in the
        project's checkpoint format, for a stage whose predecessor failed."""
        from selfsup.checkpoint import CheckpointMeta, save_checkpoint
        from selfsup.config import load_config
        from selfsup.data import build_dataset
        from selfsup.models import create_backbone
        from selfsup.ssl.settings import PretrainConfig

        print(f"warning: no {name} from the {stage} check; using a random-init stand-in", file=sys.stderr)
        spec = load_config(PretrainConfig, None, TINY_VIT).model
        _, info = build_dataset("digits", "train")
        classes = list(info.classes) if name == "classifier" else []
        model = create_backbone(spec, len(classes))
        meta = CheckpointMeta(
            spec.to_dict(), spec.img_size, info.mean, info.std, stage, len(classes), classes
        )
        return save_checkpoint(self.work / "stand-in" / name, model.state_dict(), meta, model)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resolved_precision(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["mixed_precision"]


# --- 3. the MoCo v3 step ----------------------------------------------------------------------------


def step_checks(sizes: Sizes, device: str, rates: dict) -> dict[str, Callable[[dict], None]]:
    """One check per (model, implementation); ``rates[label, impl]`` gets the step's images/s."""
    checks = {}
    for label, arch, batch in sizes.step_models:
        if not batch:
            checks[f"step {label}"] = skip(f"too slow for --device {device}; it runs on a GPU")
            continue
        for impl in ("plain", "selfsup"):
            run = StepRun(label, arch, batch, impl, device)
            checks[f"step {label} {impl}"] = step_check(run, sizes, rates)
    return checks


def skip(why: str) -> Callable[[dict], None]:
    def check(_detail: dict) -> None:
        raise Skipped(why)

    return check


@dataclass(frozen=True)
class StepRun:
    label: str
    arch: str
    batch: int
    impl: str  # "plain" or "selfsup" (bench_pretrain_step's)
    device: str


def step_check(run: StepRun, sizes: Sizes, rates: dict) -> Callable[[dict], None]:
    label, batch, impl, device = run.label, run.batch, run.impl, run.device

    def check(detail: dict) -> None:
        from bench_pretrain_step import CASES, run_one

        spec = {"arch": run.arch, "img_size": sizes.step_size, "patch_size": 16}
        case = f"gpu_check {label} b{batch}"
        CASES[case] = (spec, MOCO_HEADS, batch)  # bench_pretrain_step's own timing of its own factories
        detail["allocated_before_mib"] = release_memory()  # ~0 on a GPU: the previous case is gone
        # CPU: one thread, bench_pretrain_step's default (two threads on two busy cores run 10x slower)
        threads = None if device == "cuda" else 1
        row = run_one(case, impl, "bf16" if device == "cuda" else "auto", sizes.steps, sizes.warmup, threads)
        release_memory()
        tflops = row["images_per_s"] * step_flops_per_image(run.arch, sizes.step_size) / 1e12
        peak = bf16_peak_tflops(device_name()) if device == "cuda" else None
        detail.update(row, tflops=tflops, bf16_peak_tflops=peak, mfu=tflops / peak if peak else None)
        rates[label, impl] = row["images_per_s"]
        plain = rates.get((label, "plain")) if impl == "selfsup" else None
        versus = f", {row['images_per_s'] / plain:.2f}x the plain step" if plain else ""
        mfu = f"MFU {100 * detail['mfu']:.1f}%" if peak else "MFU unknown (no bf16 peak for this device)"
        memory = "peak allocated" if device == "cuda" else "the process's peak RSS"
        detail["summary"] = (
            f"{sizes.step_size} px, batch {batch}, {row['precision']}: {row['images_per_s']:.1f} img/s, {memory} {row['peak_mib']:.0f} MiB, "
            f"{tflops:.2f} TFLOP/s, {mfu}{versus}"
        )

    return check


@functools.cache
def step_flops_per_image(arch: str, size: int) -> float:
    """FLOPs of one MoCo v3 step per image: :data:`FORWARDS_PER_STEP_IMAGE` backbone forwards, each
    counted by ``selfsup.flops.count_macs`` (PyTorch's FlopCounterMode) on the CPU."""
    import torch

    from selfsup.flops import count_macs
    from selfsup.models import BackboneSpec, create_backbone

    model = create_backbone(BackboneSpec(arch, img_size=size, patch_size=16, frozen_patch_embed=True))
    return 2.0 * FORWARDS_PER_STEP_IMAGE * count_macs(model, torch.zeros(1, 3, size, size))


def release_memory() -> float | None:
    """Free what earlier checks left; the MiB still allocated on the GPU (None on a CPU)."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**20


# --- 4. the input pipeline ----------------------------------------------------------------------------


def input_check(sizes: Sizes, device: str, work: Path, rates: dict) -> Callable[[dict], None]:
    """The pretraining stage's own pipeline (build_pipeline: per-image PIL views in DataLoader workers)
    over synthetic 500x375 JPEGs, against the step rates measured before it."""

    def check(detail: dict) -> None:
        root = write_jpegs(work / "jpegs", sizes.input_images)
        rate = pipeline_rate(root, sizes, device, "pil")
        detail.update(
            pil_images_per_s=rate, workers=sizes.input_workers, per_worker=rate / sizes.input_workers
        )
        detail["batched_images_per_s"] = batched_rate(root, sizes, device, detail)
        feeds = {
            label: step / detail["per_worker"] for (label, impl), step in rates.items() if impl == "selfsup"
        }
        detail["workers_to_feed"] = feeds
        detail["summary"] = (
            f"PIL views: {rate:.0f} img/s with {sizes.input_workers} worker(s), {detail['per_worker']:.0f} per worker; "
            + "; ".join(f"the {label} step needs {n:.2g} workers" for label, n in feeds.items())
            + f"; batched backend: {detail['batched']}"
        )

    return check


def write_jpegs(folder: Path, count: int) -> Path:
    """``count`` ImageNet-sized (500x375) JPEGs of smooth random colour fields, one class folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "train" / "a").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        image.save(folder / "train" / "a" / f"{i:05d}.jpg", quality=90)
    return folder


def pipeline_rate(root: Path, sizes: Sizes, device: str, backend: str) -> float:
    """Images/s of one epoch of ``selfsup.ssl.pipeline.build_pipeline`` (its first batch not timed:
    the workers start then), views finished on ``device`` where the backend does that there."""
    import torch

    from selfsup.config import load_config
    from selfsup.ssl.pipeline import build_pipeline
    from selfsup.ssl.settings import PretrainConfig, resolve_recipe

    keys = [
        f"dataset=imagefolder:{root}",
        f"batch_size={sizes.input_batch}",
        f"num_workers={sizes.input_workers}",
    ]
    if backend != "pil":
        keys.append(f"augment.backend={backend}")
    config = load_config(PretrainConfig, None, keys)
    resolve_recipe(config, vit=True)
    pipeline = build_pipeline(config, 0, 1, torch.device(device))
    try:
        batches = iter(pipeline.batches(0, 0))
        next(batches)
        start, images = time.perf_counter(), 0
        for batch in batches:  # the batched backend finishes its views on the device: counted in
            view1, _view2 = pipeline.to_device(batch, torch.device(device)) if pipeline.to_device else batch
            images += view1.shape[0]
        return images / (time.perf_counter() - start)
    finally:
        pipeline.close()


def batched_rate(root: Path, sizes: Sizes, device: str, detail: dict) -> float | None:
    """The slot for the batched augmentation backend (issue 22): measured once ``augment.backend``
    exists, else recorded as not built."""
    from dataclasses import fields

    from selfsup.ssl.settings import AugmentSettings

    if "backend" not in {f.name for f in fields(AugmentSettings)}:
        detail["batched"] = "not built yet (no augment.backend setting)"
        return None
    rate = pipeline_rate(root, sizes, device, "batched")
    detail["batched"] = f"{rate:.0f} img/s ({rate / sizes.input_workers:.0f} per worker)"
    return rate


# --- 5. two GPUs = one GPU ------------------------------------------------------------------------------

TWO_PROCESS_STEPS = 4


def two_gpus_check(work: Path, device: str) -> Callable[[dict], None]:
    """A tiny pretraining (BatchNorm heads: SyncBatchNorm across processes) in one process on the
    whole global batch and in two ``accelerate launch`` processes on half each: the same losses."""

    def check(detail: dict) -> None:
        import torch

        if device == "cuda" and torch.cuda.device_count() < 2:
            raise Skipped(f"{torch.cuda.device_count()} GPU visible: needs 2")
        if device == "cpu":
            raise Skipped("device cpu: the 2-process CPU run is tests/test_ssl_runs.py's")
        one, two = two_process_losses(work, device)
        worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one, two))
        detail.update(one=one, two=two, max_relative_difference=worst)
        detail["summary"] = f"{len(one)} steps (fp32), losses agree to {worst:.1e} (relative)"
        if len(one) != len(two) or worst > 1e-3:
            raise Failed(detail["summary"] + f": one {one}, two {two}")

    return check


def two_process_losses(work: Path, device: str) -> tuple[list[float], list[float]]:
    """Losses of the same run in this process and in two launched ones (gloo when ``device`` is cpu)."""
    import subprocess

    from selfsup.ssl.cli import main

    args = ["dataset=synthetic", "synthetic_size=64", "batch_size=16", "epochs=2", f"max_steps={TWO_PROCESS_STEPS}",
            "num_workers=0", "progress_bar=false", "mixed_precision=no", "save_every_epochs=0", "resume=never",
            "moco.dim=16", "moco.mlp_dim=32", "augment.blur_sigmas=[0.1, 0.5]", *TINY_VIT]  # fmt: skip
    main([*args, f"out={work / 'one'}"])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run(
        [*launch, str(REPO / "ssl" / "pretrain.py"), *args, f"out={work / 'two'}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    print(run.stdout, run.stderr, sep="\n")
    if run.returncode:
        raise Failed(f"accelerate launch exited {run.returncode}: {last_line(run.stderr)}")
    return tuple(
        [r["loss"] for r in read_jsonl(work / side / "log.jsonl") if "event" not in r]
        for side in ("one", "two")
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the report ---------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    counts = {s: sum(r["status"] == s for r in report["checks"]) for s in ("pass", "fail", "skip")}
    lines = [
        f"GPU check on {report['device_name']} (--device {report['device']}), {report['started']}, "
        f"{report['seconds']:.0f} s: {counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip.",
        "",
        "| check | status | s | result |",
        "|---|---|---|---|",
    ]
    for r in report["checks"]:
        result = r["error"] if r["status"] != "pass" else r["detail"].get("summary", "")
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']:.1f} | {result.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def all_checks(args, work: Path) -> dict[str, Callable[[dict], None]]:
    sizes, rates = SIZES[args.device], {}  # rates: filled by the step checks, read by the input check
    return {
        "install": install_check(args.device),
        **Stages(work / "stages", args.device).checks(),
        **step_checks(sizes, args.device, rates),
        "input pipeline": input_check(sizes, args.device, work, rates),
        "2 GPUs = 1 GPU": two_gpus_check(work / "two_gpus", args.device),
    }


def run_all(args) -> dict:
    out, started = Path(args.out), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        checks = [run_check(name, fn, out / "logs") for name, fn in all_checks(args, Path(tmp)).items()]
    return {
        "command": [sys.argv[0], *sys.argv[1:]],
        "device": args.device,
        "device_name": device_name(),
        "started": started,
        "seconds": round(time.perf_counter() - start, 1),
        "sizes": asdict(SIZES[args.device]),
        "checks": checks,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--out", help="folder for gpu_check.json, gpu_check.md and logs/ (default runs/gpu_check)"
    )
    parser.add_argument("--smoke", action="store_true", help="--device cpu in a temporary folder (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before torch is imported: every stage then picks the CPU itself
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():  # GPU sizes on a CPU would take hours
        print(
            "error: torch sees no CUDA device: run this on a GPU machine, or with --device cpu",
            file=sys.stderr,
        )
        return 2
    with contextlib.ExitStack() as stack:
        if args.out is None:
            args.out = stack.enter_context(tempfile.TemporaryDirectory()) if args.smoke else "runs/gpu_check"
        report = run_all(args)
        table = markdown(report)
        Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        Path(args.out, "gpu_check.md").write_text(table)
        print(table, end="")
        print(f"written: {args.out}/gpu_check.json, {args.out}/gpu_check.md, {args.out}/logs/")
    return 1 if any(r["status"] == "fail" for r in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
