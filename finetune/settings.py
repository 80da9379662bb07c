"""The fine-tuning configuration; defaults are MoCo v3's transfer recipe (ViT, CIFAR-10).

Source: facebookresearch/moco-v3 ``transfer/README.md``, which fine-tunes with DeiT's ``main.py``:
100 epochs, 8 GPUs × 128 images, lr 3e-4 scaled by global batch / 512, AdamW, weight decay 0.1,
3 warm-up epochs, cosine to min-lr 1e-5, drop path 0.1, no repeated augmentation, random erasing 0,
mixup 0.8 / cutmix 1, label smoothing 0.1, RandAugment ``rand-m9-mstd0.5-inc1``, images resized to
224. Per-dataset changes live in ``configs/finetune/``. MAE's options (layer-wise lr decay, EMA,
clipping, accumulation) are off by default, as in that recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from selfsup.errors import UsageError
from selfsup.precision import Precision
from selfsup.runstate import RUN_KEYS, RunKeys, check_run_settings


@dataclass
class OptimSettings:
    base_lr: float = 3e-4  # per 512 images (DeiT): lr = base_lr × batch_size / 512
    min_lr: float = 1e-5
    weight_decay: float = 0.1  # never on 1-D parameters (biases, norms), pos_embed or tokens
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 3.0
    # MAE's layer-wise lr decay: block i of L gets lr × decay^(L + 1 − i) (0.65 ViT-B, 0.75 ViT-L);
    # null: off (MoCo v3's recipe)
    layer_decay: float | None = None
    clip_grad: float | None = None  # max gradient norm; null: no clipping
    accum_steps: int = 1  # split each process's batch in this many backward passes (less memory)


@dataclass
class AugmentSettings:
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment string; null: off
    mixup: float = 0.8  # mixup alpha; 0: off
    cutmix: float = 1.0  # cutmix alpha; 0: off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5  # chance of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1
    random_erasing: float = 0.0  # probability (DeiT's reprob)
    hflip: float = 0.5
    min_scale: float = 0.08  # RandomResizedCrop scale, for images larger than 64 px
    # images of 64 px or less (low-resolution mode) are padded and randomly cropped instead, as CIFAR
    # training from scratch does; null padding: img_size / 8
    crop_padding: int | None = None


@dataclass
class DistillSettings:
    teacher: str | None = None  # a classifier checkpoint with the same classes; null: no distillation
    kind: Literal["hinton", "deit"] = "hinton"
    temperature: float = 4.0  # Hinton's T
    alpha: float = 0.5  # weight of the teacher's term (hinton); deit always halves


@dataclass
class FinetuneConfig(RunKeys):
    dataset: str = "cifar10"
    data_root: str | None = None
    checkpoint: str | None = None  # a backbone (pretrain's export) or a classifier (fine-tuned again)
    model: str | None = None  # a timm name or MoCo v3 alias trained from random init (no checkpoint)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # for --model, e.g. {depth: 6}
    # the checkpoint's architecture at random init: the baseline (--model is always from random init)
    random_init: bool = False
    img_size: int | None = None  # null: the checkpoint's (224 for --model)
    patch_size: int | None = None  # null: the checkpoint's; e.g. 4 for 32 px images
    drop_path: float = 0.1
    # auto: keep a classifier checkpoint's head when its classes are the dataset's, refuse otherwise;
    # new: always a new head (a classifier fine-tuned on other classes)
    head: Literal["auto", "new"] = "auto"
    head_init_std: float = 2e-5  # new head: truncated normal (MAE's fine-tuning)
    lp_epochs: int = 0  # LP-FT: train only the head this many epochs first, then everything
    ema_decay: float | None = None  # timm ModelEmaV3 of the weights, evaluated beside them; null: off
    optim: OptimSettings = field(default_factory=OptimSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    epochs: int = 100
    batch_size: int = 1024  # global, split evenly over the processes
    eval_every: int = 1  # epochs between validations (and at the end)
    seed: int = 0
    num_workers: int = 8
    threads: int | None = None
    mixed_precision: Precision = "auto"
    val_fraction: float = 0.1  # held out of a dataset without a val split
    # share of the training labels used (class-stratified, seeded): label-efficient transfer; 1: all
    label_fraction: float = 1.0
    synthetic_size: int = 256
    synthetic_classes: int = 4
    out: str = "runs/finetune"

    def __post_init__(self) -> None:
        check_run_settings(self, {"eval_every": 1, "lp_epochs": 0})
        self._check_run()
        _check_augment(self.augment)
        _check_optim(self.optim, self.epochs - self.lp_epochs)
        _check_distill(self.distill)

    def _check_run(self) -> None:
        if not 0 < self.label_fraction <= 1:
            raise UsageError(
                f"label_fraction must lie in (0, 1], got {self.label_fraction}; e.g. 0.1 for 10% of the labels"
            )
        if self.seed < 0:
            raise UsageError(f"seed must be 0 or more, got {self.seed}")
        if not 0 <= self.drop_path < 1:
            raise UsageError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        if self.lp_epochs >= self.epochs:
            raise UsageError(
                f"lp_epochs={self.lp_epochs} leaves no fine-tuning epoch of epochs={self.epochs}: "
                "lower lp_epochs or raise epochs"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UsageError(f"ema_decay must lie in (0, 1) (e.g. 0.9999), got {self.ema_decay}")

    def check_start(self) -> None:
        """Exactly one starting point (checked when the run starts: the defaults have none)."""
        if (self.checkpoint is None) == (self.model is None):
            raise UsageError(
                "give exactly one starting point: --checkpoint BACKBONE.safetensors (pretrained, or with "
                "--random-init its architecture from scratch) or --model NAME (from scratch)"
            )
        if self.model_kwargs and self.checkpoint is not None:
            raise UsageError(
                "model_kwargs shape a --model built from scratch; a --checkpoint's architecture is its sidecar's"
            )

    @property
    def mixes(self) -> bool:
        return self.augment.mixup > 0 or self.augment.cutmix > 0


def _check_augment(augment: AugmentSettings) -> None:
    if not 0 <= augment.label_smoothing < 1:
        raise UsageError(f"augment.label_smoothing must lie in [0, 1), got {augment.label_smoothing}")
    if augment.rand_augment:
        _check_rand_augment(augment.rand_augment)


def _check_optim(optim: OptimSettings, finetune_epochs: int) -> None:
    """``finetune_epochs``: those after linear probing (epochs - lp_epochs), which the warm-up is part of."""
    if optim.base_lr <= 0:
        raise UsageError(f"optim.base_lr must be positive, got {optim.base_lr}")
    if optim.clip_grad is not None and optim.clip_grad <= 0:
        raise UsageError(
            f"optim.clip_grad must be positive (a max gradient norm) or null, got {optim.clip_grad}"
        )
    if not 0 <= optim.warmup_epochs < finetune_epochs:
        raise UsageError(
            f"optim.warmup_epochs={optim.warmup_epochs} must be at least 0 and shorter than the "
            f"{finetune_epochs} fine-tuning epochs (epochs - lp_epochs)"
        )
    if optim.accum_steps < 1:
        raise UsageError(f"optim.accum_steps must be at least 1, got {optim.accum_steps}")
    if optim.layer_decay is not None and not 0 < optim.layer_decay <= 1:
        raise UsageError(f"optim.layer_decay must lie in (0, 1], got {optim.layer_decay}")


def _check_distill(distill: DistillSettings) -> None:
    if not 0 <= distill.alpha <= 1 or distill.temperature <= 0:
        raise UsageError("distill.alpha must lie in [0, 1] and distill.temperature be positive")


def _check_rand_augment(spec: str) -> None:
    """timm parses the RandAugment string only when it builds the transform (an assert there)."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(spec, {"translate_const": 10, "img_mean": (128, 128, 128)})
    except Exception as err:
        raise UsageError(
            f"augment.rand_augment={spec!r} is not a timm RandAugment string ({err or type(err).__name__}); "
            "e.g. rand-m9-mstd0.5-inc1, or null for none"
        ) from None


# Keys that may change across a resume: where and how the run is driven, not what it computes.
RESUMABLE_CHANGES = RUN_KEYS | {"eval_every"}
