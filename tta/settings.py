"""The test-time adaptation configuration. Defaults follow the reference implementations for ViTs:
lr (0.001 / 64) x batch (SAR's rule for ViT-B, batch size 1 included; the CNN settings differ: EATA's
ResNet-50 0.00025 per 64, Tent's CIFAR Adam 1e-3), SGD momentum 0.9, entropy margin 0.4 ln C, EATA's
d_margin by class count and Fisher alpha 2000 over 2,000 clean images, SAR's rho 0.05 and recovery
below 0.2, MEMO's per-resolution settings. Runs in fp32 unless asked (the references do)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfsup.config import setting
from selfsup.errors import UsageError
from selfsup.precision import Precision
from selfsup.tta.benchmark import PROTOCOLS

METHODS = ("source", "norm", "tent", "eta", "eata", "sar", "memo")


@dataclass
class EataSettings:
    e_margin_coeff: float = setting(0.4, gt=0)  # E0 = coeff x ln C
    # redundancy: |cosine| to the mean prediction at or above this is dropped; null: the reference's
    # value for the class count, 0.05 for ImageNet's 1,000 classes and 0.4 for CIFAR-10 (used below 1,000)
    d_margin: float | None = setting(None, gt=0, le=1)
    fisher_alpha: float = setting(2000.0, ge=0)
    fisher_size: int = setting(2000, ge=1)  # clean images for the Fisher information (the set's clean.npy)


@dataclass
class SarSettings:
    rho: float = setting(0.05, gt=0)
    e_margin_coeff: float = setting(0.4, gt=0)
    reset_below: float = setting(0.2, ge=0)  # model recovery when the loss EMA falls below this


@dataclass
class MemoSettings:
    # null: the reference's for the images' size: CIFAR (<= 64 px) SGD lr 0.005, no weight decay, 32
    # views; ImageNet ViT-like models AdamW lr 1e-5, weight decay 0.01, 64 views
    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = setting(None, gt=0)
    weight_decay: float | None = setting(None, ge=0)
    views: int | None = setting(None, ge=2)  # a marginal over views


@dataclass
class TTAConfig:
    checkpoint: str | None = None  # a classifier (fine-tune's best.safetensors)
    # cifar10-c | cifar100-c | imagenet-c (under data_root) | a folder in the npy or ImageNet-C layout
    dataset: str = "cifar10-c"
    data_root: str | None = None
    methods: list[str] = field(default_factory=lambda: ["source", "tent", "eata", "sar"])
    protocol: Literal["reset", "continual", "mixed"] = "reset"
    severity: int = setting(5, choices=(1, 2, 3, 4, 5))
    corruptions: list[str] | None = None  # null: the benchmark's 15 that the set holds, in canonical order
    batch_size: int = setting(64, ge=1)
    lr: float | None = setting(None, gt=0)  # null: 0.001 / 64 x batch_size (Tent/ETA/EATA/SAR)
    steps: int = setting(1, ge=1)  # Tent's steps per batch
    # Tent's optimizer: sgd (momentum 0.9, its ImageNet setting) or adam (its CIFAR setting, with lr=0.001)
    tent_optimizer: Literal["sgd", "adam"] = "sgd"
    limit: int | None = setting(None, ge=1)  # first N test images of each corruption (in the seeded order)
    # SAR's imbalanced label stream of this imbalance ratio (SAR's default 500000: almost class order;
    # 1: uniform), 2 x the images long; null: the seeded order. Not with protocol mixed (nor in SAR)
    label_shift: float | None = setting(None, ge=1)
    workers: int = setting(4, ge=0)  # DataLoader workers reading ImageNet-C's image folders
    seed: int = setting(0, ge=0)
    eata: EataSettings = field(default_factory=EataSettings)
    sar: SarSettings = field(default_factory=SarSettings)
    memo: MemoSettings = field(default_factory=MemoSettings)
    # auto: bf16 where native, as every stage; fp16 is refused (entropy gradients underflow in it
    # and the adaptation steps take no loss scaler)
    mixed_precision: Precision = "auto"
    threads: int | None = setting(None, ge=1)
    out: str = "runs/tta"

    def __post_init__(self) -> None:
        self._check_benchmark()
        self._check_adaptation()

    def _check_benchmark(self) -> None:
        """What is measured: the methods and protocol (each number has its rule above)."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UsageError(
                f"unknown method(s) {', '.join(unknown) or '(none given)'}; expected some of: {', '.join(METHODS)}"
            )
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol}")
        if self.label_shift is not None and self.protocol == "mixed":
            raise UsageError("label_shift streams one corruption at a time: use protocol reset or continual")

    def _check_adaptation(self) -> None:
        """How the methods adapt: the arithmetic."""
        if self.mixed_precision == "fp16":
            raise UsageError(
                "tta does not adapt in fp16 (entropy gradients underflow and its steps take no loss "
                "scaler): use mixed_precision=bf16, auto or no"
            )

    @property
    def entropy_lr(self) -> float:
        return self.lr if self.lr is not None else 0.001 / 64 * self.batch_size
