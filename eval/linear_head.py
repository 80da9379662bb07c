"""Linear probe by SGD on a linear head over frozen (cached) features: the MoCo v3 protocol.

Chen, Xie & He (2021), MoCo v3, ``main_lincls.py``: SGD with momentum 0.9, weight decay 0, a
cosine learning-rate schedule, 90 epochs, batch 1024, lr 3 per 256 samples (12 at 1024), the head
initialised N(0, 0.01) with zero bias. ``batchnorm=True`` puts MAE's parameter-free
BatchNorm1d(affine=False, eps=1e-6) before the head (He et al., 2022), which makes one learning
rate work for backbones whose feature scales differ (e.g. trained vs random init).

Unlike the papers this trains on cached features, so there is no crop/flip augmentation: it is
the fast variant (seconds on CPU), comparable across backbones but not to published numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from selfsup.errors import UsageError
from selfsup.eval.logreg import LinearProbeResult, topk_accuracy


@dataclass
class LinearHeadConfig:
    epochs: int = 90
    batch_size: int = 1024
    base_lr: float = 3.0  # per 256 samples (MoCo v3, ViT linear probe)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batchnorm: bool = True
    seed: int = 0
    device: str = "auto"  # auto: cuda when available


def linear_head(dim: int, num_classes: int, batchnorm: bool = True) -> nn.Module:
    """The probe: [BatchNorm1d without affine] + Linear, initialised N(0, 0.01), bias 0."""
    fc = nn.Linear(dim, num_classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    if not batchnorm:
        return fc
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc)


def train_linear_head(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    config: LinearHeadConfig | None = None,
    num_classes: int | None = None,
) -> LinearProbeResult:
    """Train the head on (train_x, train_y), return accuracy and predictions on (test_x, test_y)."""
    config = config or LinearHeadConfig()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    x = torch.as_tensor(np.asarray(train_x), dtype=torch.float32, device=device)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    xt = torch.as_tensor(np.asarray(test_x), dtype=torch.float32, device=device)
    if not (torch.isfinite(x).all() and torch.isfinite(xt).all()):
        raise UsageError("features contain NaN or inf: the backbone diverged or the checkpoint is broken")
    num_classes = num_classes or int(y.max()) + 1
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = linear_head(x.shape[1], num_classes, config.batchnorm).to(device)
    batch = min(config.batch_size, len(x))
    lr = config.base_lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch)
    total = max(1, config.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    threads = torch.get_num_threads()
    if device.type == "cpu" and x.numel() * num_classes < 50_000_000:
        torch.set_num_threads(1)  # tiny steps: intra-op threads cost more in waiting than they save
    try:
        losses = _train(head, opt, sched, x, y, batch, config.epochs, config.batchnorm, generator)
    finally:
        torch.set_num_threads(threads)
    head.eval()
    with torch.no_grad():
        scores = torch.cat([head(xt[i : i + 4096]) for i in range(0, len(xt), 4096)]).cpu().numpy()
    top1, top5 = topk_accuracy(scores, np.asarray(test_y), np.arange(num_classes))
    details = {"protocol": "torch", "lr": lr, "epochs": config.epochs, "batchnorm": config.batchnorm,
               "final_train_loss": losses[-1] if losses else None}
    return LinearProbeResult(top1, top5, scores.argmax(1), details)


def _train(head, opt, sched, x, y, batch: int, epochs: int, batchnorm: bool, generator) -> list[float]:
    """Plain SGD epochs over shuffled mini-batches; returns the mean training loss per epoch."""
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        epoch_loss = 0.0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            if len(idx) < 2 and batchnorm:
                continue  # BatchNorm needs two samples; a lone remainder sample is skipped
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
        losses.append(epoch_loss / len(x))
    return losses
