"""The compression configuration: which steps run (prune -> recover -> quantize, each optional, in that
order) and how each variant is measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfsup.errors import UsageError
from selfsup.precision import Precision
from selfsup.runstate import RunKeys


@dataclass
class CompressConfig(RunKeys):
    checkpoint: str | None = None  # a classifier (fine-tune's best.safetensors)
    dataset: str = "cifar10"  # the classifier's dataset: validation split for the table, train for the rest
    data_root: str | None = None
    val_fraction: float = 0.1  # held out of a dataset without a val split (the fine-tuning stage's split)
    prune: Literal["none", "l1"] = "none"
    target_macs: float = 0.5  # the pruned model's MACs as a share of the original's
    recover_epochs: int = 0  # fine-tuning epochs after pruning
    recover_lr: float = 2e-4
    teacher: str | None = None  # "self" (the unpruned model) or a classifier checkpoint; null: labels only
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    # int8-dynamic / int8-static: ONNX Runtime; int8-pt2e: torchao PT2E + torch.compile (pure PyTorch)
    quantize: Literal["none", "int8-dynamic", "int8-static", "int8-pt2e"] = "none"
    calibrate: int = 256  # training images for int8-static's / int8-pt2e's activation ranges (seeded choice)
    batch_size: int = 128  # recovery and evaluation batch
    latency_batches: list[int] = field(default_factory=lambda: [1, 32])
    latency_repeats: int = 20
    limit: int | None = None  # first N validation images only
    # peak memory of each variant, measured in a fresh process (a few seconds each); false: skipped
    measure_memory: bool = True
    seed: int = 0
    threads: int | None = None
    num_workers: int = 0
    out: str = "runs/compress"
    mixed_precision: Precision = "auto"  # recovery only; measured in fp32
    # Recovery is a training run in OUT/recovery (selfsup.loop): the run keys (resume, max_steps, ...) are
    # RunKeys', meaning what they mean in finetune; it keeps its last checkpoint only.
    keep_checkpoints: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.target_macs < 1:
            raise UsageError(
                f"target_macs must lie strictly between 0 and 1 (the pruned MACs as a share of the original's), "
                f"got {self.target_macs}; e.g. 0.5 for half"
            )
        if self.recover_epochs < 0:
            raise UsageError(f"recover_epochs must be 0 or more, got {self.recover_epochs}")
        if self.recover_epochs and self.prune == "none":
            raise UsageError("recover_epochs is recovery after pruning: pass --prune l1 as well")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.calibrate < 1:
            raise UsageError(f"calibrate must be at least 1 image, got {self.calibrate}")
        if not self.latency_batches or min(self.latency_batches) < 1:
            raise UsageError(f"latency_batches must be positive batch sizes, got {self.latency_batches}")

    def check_steps(self) -> None:
        """What a run needs beyond valid values (the defaults alone do nothing)."""
        if not self.checkpoint:
            raise UsageError("no classifier given: pass --checkpoint runs/finetune/best.safetensors")
        if self.prune == "none" and self.quantize == "none":
            raise UsageError(
                "nothing to do: pass --prune l1 and/or --quantize int8-dynamic|int8-static|int8-pt2e"
            )
