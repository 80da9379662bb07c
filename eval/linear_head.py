"""Linear probes by gradient descent on a linear head over a frozen backbone: published protocols.

Two recipes, each as its official script runs it (see :data:`MOCOV3`, :data:`MAE`):

* ``mocov3``: Chen, Xie & He (2021), ``main_lincls.py``: a bare linear head, SGD, cosine per epoch;
* ``mae``: He et al. (2022), ``main_linprobe.py``: BatchNorm1d(affine=False) + linear head, LARS,
  warm-up then cosine per iteration.

By default the head trains on cached features of the eval transform (no augmentation: seconds on
CPU, comparable across backbones but not with published numbers). With ``augment=True`` the caller
passes ``augmented``, a callable giving each epoch's batches of features of RandomResizedCrop +
flip views embedded by the frozen backbone (:mod:`selfsup.eval.augment`), as both official scripts
train; the test set is always the cached eval features.

The learning rate is ``base_lr x batch / 256`` with the batch actually used: a batch larger than
the training set is clamped to it, and the rate scales with the clamped batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from selfsup.accel import threads_for
from selfsup.config import setting
from selfsup.errors import UsageError
from selfsup.eval.logreg import LinearProbeResult
from selfsup.metrics import check_finite, topk_accuracy
from selfsup.schedules import apply_lr, scaled_lr, warmup_cosine

AugmentedBatches = Callable[[int, int, bool], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""``augmented(epoch, batch_size, drop_last)``: that epoch's shuffled (features, labels) batches."""


@dataclass(frozen=True)
class HeadProtocol:
    """A linear-probe recipe; the published ones are :data:`MOCOV3` and :data:`MAE`."""

    name: str
    source: str
    optimizer: str  # "sgd" | "lars"
    batchnorm: bool  # BatchNorm1d(affine=False, eps=1e-6) before the head
    init: str  # "normal" | "trunc_normal" (std 0.01, bias 0)
    base_lr: float  # per 256 samples
    batch_size: int
    warmup_epochs: int
    schedule: str  # "cosine_per_epoch" | "warmup_cosine_per_iter"
    drop_last: bool  # the training loader drops the last partial batch
    interpolation: str  # of the RandomResizedCrop views (augment=True)
    epochs: int = 90  # both papers
    momentum: float = 0.9  # SGD's momentum (MoCo v3), LARS's (MAE)
    weight_decay: float = 0.0  # both scripts' default for the head


# MoCo v3 linear classification (Chen, Xie & He 2021), facebookresearch/moco-v3 ``main_lincls.py``:
# SGD (momentum 0.9, ``--wd`` default 0) on the head alone, initialised N(0, 0.01) with zero bias,
# no BatchNorm; lr = ``--lr`` x batch / 256 with ``--lr=3`` for ViT (CONFIG.md, "ViT-Small/Base,
# linear classification") at the default batch 1024 (lr 12); 90 epochs; cosine decay set once per
# epoch, ``lr x 0.5 (1 + cos(pi epoch / epochs))`` (``adjust_learning_rate``); no warm-up; the
# loader keeps the last partial batch; training views RandomResizedCrop(224) (scale 0.08-1,
# bilinear) + horizontal flip.
MOCOV3 = HeadProtocol(
    name="mocov3",
    source="MoCo v3 main_lincls.py",
    optimizer="sgd",
    batchnorm=False,
    init="normal",
    base_lr=3.0,
    batch_size=1024,
    warmup_epochs=0,
    schedule="cosine_per_epoch",
    drop_last=False,
    interpolation="bilinear",
)

# MAE linear probing (He et al. 2022, App. A.2), facebookresearch/mae ``main_linprobe.py``:
# BatchNorm1d(affine=False, eps=1e-6) before the head, head weight trunc_normal(std 0.01) and zero
# bias; LARS (``util/lars.py``: momentum 0.9, trust coefficient 0.001, 1-D parameters excluded
# from weight decay and from the trust ratio) with weight decay 0; lr = ``--blr`` 0.1 x batch /
# 256, batch 16384 in the paper (Table 9); 90 epochs; 10 warm-up epochs then a half cosine to 0,
# set every iteration at the fractional epoch (``util/lr_sched.py``); ``drop_last=True``; training
# views RandomResizedCrop(224, bicubic; scale 0.08-1) + horizontal flip.
MAE = HeadProtocol(
    name="mae",
    source="MAE main_linprobe.py",
    optimizer="lars",
    batchnorm=True,
    init="trunc_normal",
    base_lr=0.1,
    batch_size=16384,
    warmup_epochs=10,
    schedule="warmup_cosine_per_iter",
    drop_last=True,
    interpolation="bicubic",
)


PROTOCOLS: dict[str, HeadProtocol] = {"mocov3": MOCOV3, "mae": MAE}


@dataclass
class LinearHeadConfig:
    """Overrides of the chosen protocol (``None``: the protocol's own value) and run options."""

    epochs: int | None = setting(None, ge=1)
    batch_size: int | None = setting(None, ge=1)
    base_lr: float | None = setting(None, gt=0)  # per 256 samples
    warmup_epochs: int | None = setting(None, ge=0)  # mae only
    weight_decay: float | None = setting(None, ge=0)
    augment: bool = False  # train on RandomResizedCrop + flip views through the frozen backbone
    seed: int = setting(0, ge=0)
    device: str = "auto"  # auto: cuda when available


def resolve_protocol(name: str, config: LinearHeadConfig | None = None) -> HeadProtocol:
    """The named protocol with the non-``None`` overrides of ``config`` applied and checked."""
    if name == "torch":
        raise UsageError(
            "linear protocol 'torch' was replaced by the published recipes: use --linear-protocol mocov3 "
            "(SGD, no BatchNorm) or mae (BatchNorm + LARS)"
        )
    if name not in PROTOCOLS:
        raise UsageError(f"unknown linear protocol '{name}'; expected sklearn, mocov3 or mae")
    config = config or LinearHeadConfig()
    overrides = {
        k: getattr(config, k)
        for k in ("epochs", "batch_size", "base_lr", "warmup_epochs", "weight_decay")
        if getattr(config, k) is not None
    }
    protocol = dataclasses.replace(PROTOCOLS[name], **overrides)
    if protocol.epochs < 1 or protocol.batch_size < 1:
        raise UsageError(
            f"linear_head.epochs and linear_head.batch_size must be at least 1, got {protocol.epochs} "
            f"and {protocol.batch_size}"
        )
    if protocol.base_lr <= 0 or protocol.weight_decay < 0:
        raise UsageError(
            f"linear_head.base_lr must be positive and weight_decay non-negative, got {protocol.base_lr} "
            f"and {protocol.weight_decay}"
        )
    if protocol.schedule == "cosine_per_epoch" and protocol.warmup_epochs:
        raise UsageError(
            f"linear_head.warmup_epochs={protocol.warmup_epochs}: the mocov3 protocol has no warm-up; "
            "leave it unset or use --linear-protocol mae"
        )
    if not 0 <= protocol.warmup_epochs < protocol.epochs:
        raise UsageError(
            f"linear_head.warmup_epochs must be in [0, epochs={protocol.epochs}), got {protocol.warmup_epochs}"
        )
    return protocol


def learning_rate(protocol: HeadProtocol, peak_lr: float, step: int, steps_per_epoch: int) -> float:
    """The learning rate of iteration ``step`` (0-based), as the protocol's script sets it before that step.

    ``cosine_per_epoch`` (MoCo v3): ``peak x 0.5 (1 + cos(pi e / E))`` with e the integer epoch.
    ``warmup_cosine_per_iter`` (MAE): at the fractional epoch t = step / steps_per_epoch,
    ``peak x t / W`` while t < W, then ``peak x 0.5 (1 + cos(pi (t - W) / (E - W)))``.
    """
    if protocol.schedule == "cosine_per_epoch":  # no warm-up, the epoch as an integer
        return warmup_cosine(step // steps_per_epoch, peak_lr, 0, protocol.epochs)
    return warmup_cosine(step / steps_per_epoch, peak_lr, protocol.warmup_epochs, protocol.epochs)


def linear_head(dim: int, num_classes: int, batchnorm: bool = True, init: str = "normal") -> nn.Module:
    """The probe: [BatchNorm1d(affine=False, eps=1e-6)] + Linear, weights std 0.01 (normal or truncated), bias 0."""
    fc = nn.Linear(dim, num_classes)
    if (
        init == "trunc_normal"
    ):  # MAE calls timm's trunc_normal_, torch's twin: bounds +-2 absolute (+-200 std)
        nn.init.trunc_normal_(fc.weight, std=0.01, a=-2.0, b=2.0)
    else:
        nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    if not batchnorm:
        return fc
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc)


def make_optimizer(protocol: HeadProtocol, head: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD (MoCo v3) or LARS (MAE) over the head's parameters.

    LARS is timm's ``Lars`` in two groups: matrices with ``always_adapt=True`` (MAE applies the
    trust ratio even at weight decay 0) and ``eps=0``, vectors (biases) without adaptation or weight
    decay, as MAE's ``util/lars.py`` treats parameters of at most one dimension. At weight decay 0
    this is MAE's update exactly; above 0 timm's trust ratio divides by ||g|| + wd ||w|| (NVIDIA
    LARC) where MAE divides by ||g + wd w||.
    """
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(
            head.parameters(), lr=lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
        )
    from timm.optim import Lars

    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return Lars(
        [
            {"params": matrices, "weight_decay": protocol.weight_decay, "always_adapt": True},
            {"params": vectors, "weight_decay": 0.0, "always_adapt": False},
        ],
        lr=lr,
        momentum=protocol.momentum,
        trust_coeff=0.001,
        eps=0.0,
    )


def train_linear_head(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    config: LinearHeadConfig | None = None,
    num_classes: int | None = None,
    protocol: str = "mocov3",
    augmented: AugmentedBatches | None = None,
) -> LinearProbeResult:
    """Train the protocol's head on (train_x, train_y), or on ``augmented`` batches; score on (test_x, test_y).

    With ``augmented`` the training features are drawn from it each epoch; ``train_x`` then only
    gives the feature size and the number of training samples (which sets the steps per epoch).
    """
    config = config or LinearHeadConfig()
    recipe = resolve_protocol(protocol, config)
    if config.augment and augmented is None:
        raise UsageError(
            "linear_head.augment=true needs the backbone and images: run it through `probe`, or pass "
            "augmented= (see selfsup.eval.augment)"
        )
    device = _device(config.device)
    x, y = _tensor(train_x, torch.float32, device), _tensor(train_y, torch.long, device)
    xt = _tensor(test_x, torch.float32, device)
    num_classes = num_classes or int(y.max()) + 1
    batch = _batch_size(recipe, len(x))
    lr = scaled_lr(recipe.base_lr, batch)
    steps_per_epoch = len(x) // batch if recipe.drop_last else math.ceil(len(x) / batch)
    torch.manual_seed(config.seed)
    head = linear_head(x.shape[1], num_classes, recipe.batchnorm, recipe.init).to(device)
    opt = make_optimizer(recipe, head, lr)
    batches = augmented or _shuffled_batches(x, y, torch.Generator().manual_seed(config.seed))
    # Tiny steps on cached features: intra-op threads cost more in waiting than they save.
    few = threads_for(x.numel() * num_classes) if augmented is None and device.type == "cpu" else None
    with _threads(few):
        losses = _train(head, opt, recipe, lr, batches, batch, steps_per_epoch, device)
    scores = _scores(head, xt)
    top1, top5 = topk_accuracy(scores, np.asarray(test_y), np.arange(num_classes))
    details = _details(recipe, lr, batch, steps_per_epoch, augmented is not None, losses)
    return LinearProbeResult(top1, top5, scores.argmax(1), details)


def _device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tensor(values: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.as_tensor(np.asarray(values), dtype=dtype, device=device)
    if dtype.is_floating_point:
        check_finite(out)
    return out


def _batch_size(recipe: HeadProtocol, n_train: int) -> int:
    """The protocol's batch clamped to the training set (the lr follows the batch used)."""
    batch = min(recipe.batch_size, n_train)
    if recipe.batchnorm and batch < 2:
        raise UsageError(
            f"the {recipe.name} protocol's BatchNorm needs batches of at least 2 samples, got {batch} "
            "(more training samples or a larger linear_head.batch_size)"
        )
    return batch


def _shuffled_batches(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AugmentedBatches:
    """Each epoch's shuffled batches of the cached features, one draw of ``generator`` per epoch."""

    def batches(epoch: int, size: int, drop_last: bool):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        end = len(x) - len(x) % size if drop_last else len(x)
        return ((x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, end, size))

    return batches


@contextlib.contextmanager
def _threads(count: int | None):
    """torch's intra-op threads set to ``count`` inside (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _scores(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    head.eval()
    return torch.cat([head(features[i : i + 4096]) for i in range(0, len(features), 4096)]).cpu().numpy()


def _details(
    recipe: HeadProtocol, lr: float, batch: int, steps_per_epoch: int, augment: bool, losses: list[float]
) -> dict:
    """What the report states about the run: the recipe as used, and its last epoch's loss."""
    return {
        "protocol": recipe.name,
        "source": recipe.source,
        "optimizer": recipe.optimizer.upper(),
        "batchnorm": recipe.batchnorm,
        "lr": lr,
        "base_lr": recipe.base_lr,
        "batch_size": batch,
        "epochs": recipe.epochs,
        "warmup_epochs": recipe.warmup_epochs,
        "schedule": recipe.schedule,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "augment": augment,
        "steps": recipe.epochs * steps_per_epoch,
        "final_train_loss": losses[-1] if losses else None,
    }


def _train(
    head,
    opt,
    recipe: HeadProtocol,
    lr: float,
    batches: AugmentedBatches,
    batch: int,
    steps_per_epoch: int,
    device,
) -> list[float]:
    """The protocol's epochs; the lr is set before every step. Returns the mean training loss per epoch."""
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    head.train()
    for epoch in range(recipe.epochs):
        total, seen = 0.0, 0
        for i, (xb, yb) in enumerate(batches(epoch, batch, recipe.drop_last)):
            xb, yb = xb.to(device, torch.float32), yb.to(device)
            if len(yb) < 2 and recipe.batchnorm:
                continue  # BatchNorm needs two samples (a batch thinned by skipped corrupt images)
            step_lr = learning_rate(recipe, lr, epoch * steps_per_epoch + i, steps_per_epoch)
            apply_lr(opt, step_lr)
            loss = loss_fn(head(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(yb), seen + len(yb)
        losses.append(total / max(seen, 1))
    return losses
