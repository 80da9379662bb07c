"""Frozen-backbone features for the later stages: CLS token, mean patch token, last-n CLS tokens.

``cls_last4`` concatenates the (final-norm) CLS tokens of the last 4 blocks, DINO's linear-probe
feature for ViT-S. Non-ViT backbones (ResNets, ConvNeXts) offer their pooled output as ``cls``.

:func:`extract` embeds one batch, :func:`embed` does it under the run's autocast, and
:func:`extract_features` embeds a whole dataset: the probe's features (sharded across processes
under ``accelerate launch``) and pretraining's kNN monitor (one process, its own device).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from selfsup.accel import make_accelerator
from selfsup.errors import UsageError
from selfsup.imagefolder import marking_collate, readable
from selfsup.models import is_vit
from selfsup.precision import autocast, resolve_precision

FEATURE_KINDS = ("cls", "patch_mean", "cls_lastN (e.g. cls_last4)")
_LAST_N = re.compile(r"^cls_last(\d+)$")


def check_feature_kind(kind: str, model: nn.Module | None = None) -> str:
    if kind not in ("cls", "patch_mean") and not _LAST_N.match(kind):
        raise UsageError(f"unknown feature kind '{kind}'; expected one of {', '.join(FEATURE_KINDS)}")
    if model is not None and kind != "cls" and not is_vit(model):
        raise UsageError(f"feature kind '{kind}' needs a ViT backbone; use 'cls' (pooled output) instead")
    if model is not None and (m := _LAST_N.match(kind)) and int(m.group(1)) > len(model.blocks):
        raise UsageError(f"feature kind '{kind}' asks for more blocks than the model's {len(model.blocks)}")
    return kind


def feature_dim_for(model: nn.Module, kind: str) -> int:
    m = _LAST_N.match(kind)
    return int(model.num_features) * (int(m.group(1)) if m else 1)


def extract(model: nn.Module, images: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """Features of ``images`` (B, 3, H, W) -> (B, D); call under ``torch.no_grad()`` for frozen use."""
    if not is_vit(model):
        if kind != "cls":
            check_feature_kind(kind, model)
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if kind == "cls":
        return model.forward_features(images)[:, 0]
    if kind == "patch_mean":
        return model.forward_features(images)[:, model.num_prefix_tokens :].mean(dim=1)
    m = _LAST_N.match(kind)
    if not m:
        check_feature_kind(kind)
    n = int(m.group(1))  # type: ignore[union-attr]
    blocks = model.forward_intermediates(
        images, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    return torch.cat([prefix[:, 0] for _patches, prefix in blocks], dim=-1)


@torch.no_grad()
def embed(
    model: nn.Module, images: torch.Tensor, kind: str, device: torch.device, precision: str
) -> torch.Tensor:
    """Float32 features of one batch, computed on ``device`` under the resolved ``precision``'s autocast."""
    with autocast(device, precision):
        return extract(model, images.to(device, non_blocking=True), kind).float()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    kind: str = "cls",
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    mixed_precision: str = "auto",
    accelerator=None,
    device: torch.device | str | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,) int64) of every sample of ``dataset``, in order.

    With ``device`` this process embeds the whole dataset alone (pretraining's monitor runs on the
    main process only, so it must not wait for the others). Otherwise, under ``accelerate launch``,
    every process reads its shard of the (unshuffled) dataset and ``Accelerator.gather_for_metrics``
    reassembles the full set in dataset order, dropping the samples the sampler duplicated to even
    out the last batch; ``accelerator`` defaults to the launch's (a single process needs none).
    Unreadable images are left out (their placeholders keep the batches even until the gather).
    """
    alone = device is not None
    if not alone and accelerator is None:
        accelerator = make_accelerator(None)  # the autocast is embed's, not accelerate's
    device = torch.device(device) if alone else accelerator.device
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=marking_collate(dataset),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    if not alone:
        loader = accelerator.prepare_data_loader(loader)
    show = progress and (alone or accelerator.is_local_main_process)
    batches = tqdm(loader, desc=desc, unit="batch", disable=not show, leave=False)
    gather = (lambda pair: pair) if alone else accelerator.gather_for_metrics
    precision = resolve_precision(mixed_precision, device)
    return _embed_all(model.eval().to(device), batches, kind, device, precision, gather)


def _embed_all(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    kind: str,
    device: torch.device,
    precision: str,
    gather: Callable,
) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for images, targets in batches:
        out, targets = gather((embed(model, images, kind, device, precision), targets.to(device)))
        keep = readable(targets)
        feats.append(out[keep].cpu())
        labels.append(targets[keep].cpu())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()
