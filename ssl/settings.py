"""The pretraining configuration; defaults are the MoCo v3 ViT-S recipe.

Source for every default: Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
Transformers" (ICCV 2021) and the official code (facebookresearch/moco-v3: ``main_moco.py``,
``moco/builder.py``, ``vits.py``, ``CONFIG.md`` ViT-S/B commands): AdamW with torch's default
betas (0.9, 0.999), lr 1.5e-4 × batch/256, weight decay 0.1, 300 epochs with 40 warm-up epochs at
batch 4096, T = 0.2, m from 0.99 to 1 by a half-cycle cosine, 3-layer projector and 2-layer
predictor of width 4096 and output 256, random frozen patch projection, 2-D sin-cos position
embedding, BYOL augmentations with crop scale (0.08, 1).

Convolutional backbones (ResNets, BoTNet, DynamicConv, SkipNet) get the paper's ResNet recipe
(``CONFIG.md`` ResNet-50 commands, ``main_moco.py`` defaults): LARS (momentum 0.9, trust coefficient
0.001, no weight decay or adaptation for biases and norms), lr 0.6 × batch/256, weight decay 1e-6,
10 warm-up epochs, T = 1.0, crop scale (0.2, 1), a 2-layer projector and a predictor without the
final BatchNorm. The recipe keys left at null (``optim.name``, ``optim.base_lr``,
``optim.weight_decay``, ``optim.warmup_epochs``, ``moco.temperature``, ``augment.min_scale``) take
the values of the backbone's kind (:func:`resolve_recipe`); config.yaml records what was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfsup.config import setting
from selfsup.errors import UsageError
from selfsup.models import BackboneSpec, patch_grid_problem
from selfsup.precision import Precision
from selfsup.runstate import RUN_KEYS, RunKeys, check_run_settings


def _paper_backbone() -> BackboneSpec:
    return BackboneSpec(
        arch="moco_vit_small", img_size=224, pos_embed="sincos", frozen_patch_embed=True, init="moco_v3"
    )


@dataclass
class MocoSettings:
    dim: int = setting(256, ge=1)
    mlp_dim: int = setting(4096, ge=1)
    proj_layers: int | None = setting(None, ge=1)  # None: 3 for ViTs, 2 for ResNets
    pred_layers: int = setting(2, ge=1)
    temperature: float | None = setting(None, gt=0)  # null: 0.2 for ViTs, 1.0 for convolutional backbones
    momentum: float = setting(0.99, ge=0, le=1)  # m0, raised to 1 by a half-cycle cosine when momentum_cosine
    momentum_cosine: bool = True


@dataclass
class OptimSettings:
    name: Literal["auto", "adamw", "lars"] = "auto"  # auto: AdamW for ViTs, LARS for convolutional backbones
    # per 256 images: lr = base_lr × batch_size / 256 (null: 1.5e-4 / 0.6)
    base_lr: float | None = setting(None, gt=0)
    weight_decay: float | None = setting(None, ge=0)  # null: 0.1 (ViT) / 1e-6 (conv)
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)  # AdamW's
    momentum: float = setting(0.9, ge=0, lt=1)  # LARS's
    warmup_epochs: float | None = setting(None, ge=0)  # null: 40 (ViT) / 10 (conv)
    clip_grad: float | None = setting(None, gt=0)  # max gradient norm; the official code does not clip


@dataclass
class AugmentSettings:
    """BYOL's two asymmetric views (lightly's BYOLView1/2Transform defaults are these values)."""

    # random resized crop's lower scale; null: 0.08 (ViT) / 0.2 (conv)
    min_scale: float | None = setting(None, gt=0, le=1)
    blur_prob: tuple[float, float] = setting((1.0, 0.1), ge=0, le=1)
    # Blur sigma range in pixels of a `blur_reference_size`-wide image, scaled to the input size:
    # BYOL's (0.1, 2.0) at 224 px is (0.014, 0.29) px at 32 px, the same blur relative to the image.
    # null reference: the sigmas are absolute pixels.
    blur_sigmas: tuple[float, float] = setting((0.1, 2.0), gt=0)
    blur_reference_size: int | None = setting(224, ge=1)
    solarize_prob: tuple[float, float] = setting((0.0, 0.2), ge=0, le=1)
    jitter_prob: float = setting(0.8, ge=0, le=1)
    # brightness, contrast, saturation, hue
    jitter: tuple[float, float, float, float] = setting((0.4, 0.4, 0.2, 0.1), ge=0)
    gray_prob: float = setting(0.2, ge=0, le=1)
    flip_prob: float = setting(0.5, ge=0, le=1)
    # pil: every op per image with PIL in the DataLoader workers (lightly's transforms, the reference);
    # batched: the workers crop and sample the parameters, the training device applies the ops to the
    # batch (selfsup.ssl.batched_views); same distributions, not the same random numbers
    backend: Literal["pil", "batched"] = "pil"


@dataclass
class PretrainConfig(RunKeys):
    dataset: str = "imagenet"
    data_root: str | None = None
    out: str = "runs/pretrain"
    model: BackboneSpec = field(default_factory=_paper_backbone)
    moco: MocoSettings = field(default_factory=MocoSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    epochs: int = setting(300, ge=1)
    batch_size: int = setting(4096, ge=1)  # global, split evenly over the processes
    seed: int = setting(0, ge=0)
    num_workers: int = setting(8, ge=0)  # DataLoader workers per process
    # torch threads per process; 1 keeps a shared CPU from thrashing
    threads: int | None = setting(None, ge=1)
    # auto: bf16 where native (GPU, AVX-512 BF16/AMX)
    mixed_precision: Precision = "auto"
    # share of a folder without val/ held out when hold_out_val (monitor queries)
    val_fraction: float = setting(0.1, gt=0, lt=1)
    # false: pretrain on every training image (a folder without val/ loses none to a hold-out; the
    # monitor then queries a held-out sample that pretraining also saw, without its labels).
    # true: carve val_fraction off and never pretrain on it (for measuring probes on unseen images).
    hold_out_val: bool = False
    length_per_epoch: int | None = setting(None, ge=1)  # samples per epoch; required for WebDataset shards
    synthetic_size: int = setting(256, ge=1)
    synthetic_classes: int = setting(4, ge=1)
    # run management: resume, saves, logging and the NaN policy are selfsup.runstate.RunKeys
    monitor_every: int = setting(0, ge=0)  # epochs between kNN monitors; 0: off
    monitor_at_start: bool = True
    monitor_train_size: int = setting(2000, ge=1)
    monitor_val_size: int = setting(1000, ge=1)
    monitor_k: int = setting(20, ge=1)
    export_only: bool = False  # export the backbone of the latest checkpoint in `out`, no training
    # a released MoCo v3 main_moco.py checkpoint: written as `out`'s first checkpoint (encoders, projector,
    # predictor, epoch; a fresh optimizer), no training; resume=auto then continues it (selfsup.ssl.released)
    import_run: str | None = None

    def __post_init__(self) -> None:
        check_run_settings(self, {"monitor_every": 0})
        if self.import_run and self.export_only:
            raise UsageError("import_run writes a run's first checkpoint and export_only reads one: pass one")
        problem = patch_grid_problem(self.model)
        if problem:
            raise UsageError(
                f"model.img_size={self.model.img_size}: {problem} (model.patch_size sets the patch)"
            )


# Settings that may differ between a checkpoint and the run that resumes it: the shared run keys
# (where and how the run is driven) and pretraining's own that do not change what it computes.
RESUMABLE_CHANGES = RUN_KEYS | {
    "export_only",
    "import_run",  # where the first checkpoint came from; the checkpoint holds what it gave
    "monitor_every",
    "monitor_at_start",
    "monitor_train_size",
    "monitor_val_size",
    "monitor_k",
}


# The paper's two recipes (values above); a null recipe key takes its backbone kind's value.
RECIPES: dict[str, dict[str, object]] = {
    "vit": {
        "optim.name": "adamw",
        "optim.base_lr": 1.5e-4,
        "optim.weight_decay": 0.1,
        "optim.warmup_epochs": 40.0,
        "moco.temperature": 0.2,
        "augment.min_scale": 0.08,
    },
    "conv": {
        "optim.name": "lars",
        "optim.base_lr": 0.6,
        "optim.weight_decay": 1e-6,
        "optim.warmup_epochs": 10.0,
        "moco.temperature": 1.0,
        "augment.min_scale": 0.2,
    },
}


def resolve_recipe(config: PretrainConfig, vit: bool) -> str:
    """Fill the recipe keys left null (or ``optim.name=auto``) with the values of the backbone's kind;
    returns the kind ("vit" or "conv")."""
    kind = "vit" if vit else "conv"
    for key, value in RECIPES[kind].items():
        section, name = key.split(".")
        holder = getattr(config, section)
        if getattr(holder, name) in (None, "auto"):
            setattr(holder, name, value)
    return kind
