"""The compression configuration: which steps run (prune -> recover -> quantize, each optional, in that
order) and how each variant is measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from selfsup.config import setting
from selfsup.errors import UsageError
from selfsup.precision import Precision
from selfsup.runstate import RunKeys


@dataclass
class CompressConfig(RunKeys):
    checkpoint: str | None = None  # a classifier (fine-tune's best.safetensors)
    dataset: str = "cifar10"  # the classifier's dataset: validation split for the table, train for the rest
    data_root: str | None = None
    # held out of a dataset without a val split (the fine-tuning stage's split)
    val_fraction: float = setting(0.1, gt=0, lt=1)
    prune: Literal["none", "l1"] = "none"
    target_macs: float = setting(0.5, gt=0, lt=1)  # the pruned model's MACs as a share of the original's
    recover_epochs: int = setting(0, ge=0)  # fine-tuning epochs after pruning
    recover_lr: float = setting(2e-4, gt=0)
    teacher: str | None = None  # "self" (the unpruned model) or a classifier checkpoint; null: labels only
    kd_temperature: float = setting(4.0, gt=0)
    kd_alpha: float = setting(0.5, ge=0, le=1)
    # int8-dynamic / int8-static: ONNX Runtime; int8-pt2e: torchao PT2E + torch.compile (pure PyTorch)
    quantize: Literal["none", "int8-dynamic", "int8-static", "int8-pt2e"] = "none"
    # training images for int8-static's / int8-pt2e's activation ranges (seeded choice)
    calibrate: int = setting(256, ge=1)
    batch_size: int = setting(128, ge=1)  # recovery and evaluation batch
    latency_batches: list[int] = setting(factory=lambda: [1, 32], ge=1, nonempty=True)
    latency_repeats: int = setting(20, ge=1)
    limit: int | None = setting(None, ge=1)  # first N validation images only
    # peak memory of each variant, measured in a fresh process (a few seconds each); false: skipped
    measure_memory: bool = True
    seed: int = setting(0, ge=0)
    threads: int | None = setting(None, ge=1)
    num_workers: int = setting(0, ge=0)
    out: str = "runs/compress"
    mixed_precision: Precision = "auto"  # recovery only; measured in fp32
    # Recovery is a training run in OUT/recovery (selfsup.loop): the run keys (resume, max_steps, ...) are
    # RunKeys', meaning what they mean in finetune; it keeps its last checkpoint only.
    keep_checkpoints: int = setting(1, ge=1)

    def __post_init__(self) -> None:
        if self.recover_epochs and self.prune == "none":
            raise UsageError("recover_epochs is recovery after pruning: pass --prune l1 as well")

    def check_steps(self) -> None:
        """What a run needs beyond valid values (the defaults alone do nothing)."""
        if not self.checkpoint:
            raise UsageError("no classifier given: pass --checkpoint runs/finetune/best.safetensors")
        if self.prune == "none" and self.quantize == "none":
            raise UsageError(
                "nothing to do: pass --prune l1 and/or --quantize int8-dynamic|int8-static|int8-pt2e"
            )
