"""Frozen features of a whole dataset: batched, in the run's precision (bf16 where native), sharded across processes.

Under ``accelerate launch`` every process reads its shard of the (unshuffled) dataset and
``Accelerator.gather_for_metrics`` reassembles the full set in dataset order, dropping the samples
the sampler duplicated to even out the last batch. A single process needs no launcher.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from selfsup.accel import make_accelerator
from selfsup.features import extract
from selfsup.imagefolder import collate_skip_none
from selfsup.precision import autocast, resolve_precision


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
    desc: str = "features",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,) int64) of every sample of ``dataset``, in order."""
    if accelerator is None:
        accelerator = make_accelerator(None)  # the autocast below is this module's, not accelerate's
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=False,
    )
    loader = accelerator.prepare_data_loader(loader)
    model = model.eval().to(accelerator.device)
    precision = resolve_precision(mixed_precision, accelerator.device)
    feats, labels = [], []
    bar = tqdm(
        loader,
        desc=desc,
        unit="batch",
        disable=not (progress and accelerator.is_local_main_process),
        leave=False,
    )
    for images, targets in bar:
        images = images.to(accelerator.device, non_blocking=True)
        with autocast(accelerator.device, precision):
            out = extract(model, images, kind)
        out, targets = accelerator.gather_for_metrics((out.float(), targets.to(accelerator.device)))
        feats.append(out.cpu())
        labels.append(targets.cpu())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()
