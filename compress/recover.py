"""Recovery training of a pruned classifier: a short fine-tune on the training split, optionally
distilled from the unpruned model (Hinton's soft targets, the loss fine-tuning uses: selfsup.distill).

Deliberately small: AdamW with a warm-up then cosine schedule, light augmentation (padded crop and
flip for images up to 64 px, random resized crop and flip above), seeded batches. The full fine-tuning
recipe (mixup, RandAugment, layer decay, resume) is the finetune stage's; a pruned checkpoint can be
fine-tuned there too (``finetune --checkpoint pruned.safetensors``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from selfsup.distill import distillation_loss
from selfsup.schedules import apply_lr, warmup_cosine


def train_transform(img_size: int, native_size: int, mean, std) -> T.Compose:
    if native_size <= 64:
        crop = [T.Resize(img_size), T.RandomCrop(img_size, padding=img_size // 8)]
    else:
        crop = [T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def recover(
    model: nn.Module,
    train_set,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=num_workers,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = min(1.0, epochs / 10)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    losses = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        batches = tqdm(loader, desc=f"recovery {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for i, (images, labels) in enumerate(batches):
            apply_lr(optimizer, warmup_cosine(epoch + i / len(loader), lr, warmup, epochs))
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(images)
                loss = distillation_loss("hinton", loss, logits, soft, alpha=alpha, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / len(loader))
    model.eval()
    return losses
