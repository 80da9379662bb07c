"""The fine-tuning configuration; defaults are MoCo v3's transfer recipe (ViT, CIFAR-10).

Source: facebookresearch/moco-v3 ``transfer/README.md``, which fine-tunes with DeiT's ``main.py``:
100 epochs, 8 GPUs × 128 images, lr 3e-4 scaled by global batch / 512, AdamW, weight decay 0.1,
3 warm-up epochs, cosine to min-lr 1e-5, drop path 0.1, no repeated augmentation, random erasing 0,
mixup 0.8 / cutmix 1, label smoothing 0.1, RandAugment ``rand-m9-mstd0.5-inc1``, images resized to
224. Per-dataset changes live in ``configs/finetune/``. MAE's options (layer-wise lr decay, EMA,
clipping, accumulation) are off by default, as in that recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from selfsup.config import setting
from selfsup.errors import UsageError
from selfsup.precision import Precision
from selfsup.runstate import RUN_KEYS, RunKeys, check_run_settings

# timm's RandAugment parts (rand_augment_transform's docstring). timm skips a part it does not know and
# takes an unknown transform set as its default, so "rand-bogus" would train on defaults unnoticed.
_RAND_PART = re.compile(r"(m|n|p|mstd|mmax|inc)\d.*|t(weights|3aw|3a)")


def rand_augment_problem(spec: str) -> str | None:
    """What ``augment.rand_augment`` must be, when timm's parser rejects ``spec`` or would skip a part."""
    from timm.data.auto_augment import rand_augment_transform

    expected = "a timm RandAugment string, e.g. rand-m9-mstd0.5-inc1"
    head, *parts = spec.split("-")
    unknown = [part for part in parts if not _RAND_PART.fullmatch(part)]
    if head != "rand" or unknown:
        return f"{expected} (parts after rand-: m, n, p, mstd, mmax, inc with a number, tweights, t3a, t3aw)"
    try:
        rand_augment_transform(spec, {"translate_const": 10, "img_mean": (128, 128, 128)})
    except Exception as err:  # timm's parser asserts and converts with int()/float()
        return f"{expected} ({err or type(err).__name__})"
    return None


@dataclass
class OptimSettings:
    base_lr: float = setting(3e-4, gt=0)  # per 512 images (DeiT): lr = base_lr × batch_size / 512
    min_lr: float = setting(1e-5, ge=0)
    weight_decay: float = setting(0.1, ge=0)  # never on 1-D parameters (biases, norms), pos_embed or tokens
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)
    warmup_epochs: float = setting(3.0, ge=0)
    # MAE's layer-wise lr decay: block i of L gets lr × decay^(L + 1 − i) (0.65 ViT-B, 0.75 ViT-L);
    # null: off (MoCo v3's recipe)
    layer_decay: float | None = setting(None, gt=0, le=1)
    clip_grad: float | None = setting(None, gt=0)  # max gradient norm; null: no clipping
    # split each process's batch in this many backward passes (less memory)
    accum_steps: int = setting(1, ge=1)


@dataclass
class AugmentSettings:
    # timm's RandAugment string, parsed before training; null: off
    rand_augment: str | None = setting("rand-m9-mstd0.5-inc1", check=rand_augment_problem)
    mixup: float = setting(0.8, ge=0)  # mixup alpha; 0: off
    cutmix: float = setting(1.0, ge=0)  # cutmix alpha; 0: off
    mixup_prob: float = setting(1.0, ge=0, le=1)
    mixup_switch_prob: float = setting(0.5, ge=0, le=1)  # chance of cutmix instead of mixup when both are on
    label_smoothing: float = setting(0.1, ge=0, lt=1)
    random_erasing: float = setting(0.0, ge=0, le=1)  # probability (DeiT's reprob)
    hflip: float = setting(0.5, ge=0, le=1)
    min_scale: float = setting(0.08, gt=0, le=1)  # RandomResizedCrop scale, for images larger than 64 px
    # images of 64 px or less (low-resolution mode) are padded and randomly cropped instead, as CIFAR
    # training from scratch does; null padding: img_size / 8
    crop_padding: int | None = setting(None, ge=0)


@dataclass
class DistillSettings:
    teacher: str | None = None  # a classifier checkpoint with the same classes; null: no distillation
    kind: Literal["hinton", "deit"] = "hinton"
    temperature: float = setting(4.0, gt=0)  # Hinton's T
    alpha: float = setting(0.5, ge=0, le=1)  # weight of the teacher's term (hinton); deit always halves


@dataclass
class FinetuneConfig(RunKeys):
    dataset: str = "cifar10"
    data_root: str | None = None
    checkpoint: str | None = None  # a backbone (pretrain's export) or a classifier (fine-tuned again)
    model: str | None = None  # a timm name or MoCo v3 alias trained from random init (no checkpoint)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # for --model, e.g. {depth: 6}
    # the checkpoint's architecture at random init: the baseline (--model is always from random init)
    random_init: bool = False
    img_size: int | None = setting(None, ge=1)  # null: the checkpoint's (224 for --model)
    patch_size: int | None = setting(None, ge=1)  # null: the checkpoint's; e.g. 4 for 32 px images
    drop_path: float = setting(0.1, ge=0, lt=1)
    # auto: keep a classifier checkpoint's head when its classes are the dataset's, refuse otherwise;
    # new: always a new head (a classifier fine-tuned on other classes)
    head: Literal["auto", "new"] = "auto"
    head_init_std: float = setting(2e-5, ge=0)  # new head: truncated normal (MAE's fine-tuning)
    lp_epochs: int = setting(0, ge=0)  # LP-FT: train only the head this many epochs first, then everything
    # timm ModelEmaV3 of the weights, evaluated beside them; null: off
    ema_decay: float | None = setting(None, gt=0, lt=1)
    optim: OptimSettings = field(default_factory=OptimSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    epochs: int = setting(100, ge=1)
    batch_size: int = setting(1024, ge=1)  # global, split evenly over the processes
    eval_every: int = setting(1, ge=1)  # epochs between validations (and at the end)
    seed: int = setting(0, ge=0)
    num_workers: int = setting(8, ge=0)
    threads: int | None = setting(None, ge=1)
    mixed_precision: Precision = "auto"
    val_fraction: float = setting(0.1, gt=0, lt=1)  # held out of a dataset without a val split
    # share of the training labels used (class-stratified, seeded): label-efficient transfer; 1: all
    label_fraction: float = setting(1.0, gt=0, le=1)
    synthetic_size: int = setting(256, ge=1)
    synthetic_classes: int = setting(4, ge=1)
    out: str = "runs/finetune"

    def __post_init__(self) -> None:
        check_run_settings(self, {"eval_every": 1, "lp_epochs": 0})
        self._check_epochs()
        self._check_model()

    def _check_epochs(self) -> None:
        """Linear probing leaves fine-tuning epochs, and the warm-up is part of those."""
        if self.lp_epochs >= self.epochs:
            raise UsageError(
                f"lp_epochs={self.lp_epochs} leaves no fine-tuning epoch of epochs={self.epochs}: "
                "lower lp_epochs or raise epochs"
            )
        if self.optim.warmup_epochs >= self.epochs - self.lp_epochs:
            raise UsageError(
                f"optim.warmup_epochs={self.optim.warmup_epochs} must be at least 0 and shorter than the "
                f"{self.epochs - self.lp_epochs} fine-tuning epochs (epochs - lp_epochs)"
            )

    def _check_model(self) -> None:
        """img_size and patch_size size the model and the data alike, so model_kwargs may not set them;
        a --model's image size must tile into its patches."""
        for key in ("img_size", "patch_size"):
            if key in self.model_kwargs:
                raise UsageError(
                    f"model_kwargs.{key}={self.model_kwargs[key]} would size the model but not the data: "
                    f"set {key}={self.model_kwargs[key]} instead (the top-level key sizes both)"
                )
        if self.model is not None:
            from selfsup.models import BackboneSpec, patch_grid_problem  # timm: only for a --model

            spec = BackboneSpec(arch=self.model, img_size=self.img_size or 224, patch_size=self.patch_size)
            problem = patch_grid_problem(spec)
            if problem:
                raise UsageError(f"img_size={spec.img_size}: {problem} (patch_size sets the patch)")

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


# Keys that may change across a resume: where and how the run is driven, not what it computes.
RESUMABLE_CHANGES = RUN_KEYS | {"eval_every"}
