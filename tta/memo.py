"""MEMO (Zhang, Levine & Finn, NeurIPS 2022, "MEMO: Test Time Robustness via Adaptation and Augmentation").

Episodic, one test image at a time: draw N augmented views (a random crop and flip, then AugMix),
minimise the entropy of the marginal prediction (the views' averaged probabilities) with one step
on every parameter, predict the original image with the adapted weights, then put the weights back,
so no image sees another's adaptation. Facts from the paper and the reference code
(zhangmarvin/memo): views from the test image at its own size (CIFAR: padded random crop; ImageNet:
random resized crop) and a flip, then AugMix with width 3, random depth 1-3 and every operation at
level 1 (a random magnitude below it) over operations that do not overlap the test corruptions (no
colour, contrast, brightness or sharpness changes); CIFAR models: SGD lr 0.005, 32 views; ImageNet
ViT-like models: AdamW lr 1e-5, weight decay 0.01, 64 views. AugMix is timm's (``AugMixAugment``);
each image's views are seeded by its position in the stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, augmix_ops
from torch import nn
from torchvision import transforms as T

from selfsup.sampling import sample_seed, seeded
from selfsup.transforms import is_low_res
from selfsup.tta.adapter import Adapter
from selfsup.tta.benchmark import to_model_input

# AugMix's operations minus those that overlap the corruptions (AugMix paper, section 4; MEMO)
AUGMIX_OPS = (
    "AutoContrast",
    "Equalize",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of softmax(logits) over the views (rows), computed in log space."""
    log_p = logits.log_softmax(dim=1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(len(logits))
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()


def view_transform(native_size: int) -> T.Compose:
    """A random crop and flip at the image's own size (CIFAR's padded crop up to 64 px, ImageNet's
    resized crop above), then AugMix at MEMO's strength: every operation at level 1 of 10 with the
    magnitude drawn uniformly below it (timm's ``magnitude_std=inf``)."""
    crop = (
        T.RandomCrop(native_size, padding=native_size // 8)
        if is_low_res(native_size)
        else T.RandomResizedCrop(native_size)
    )
    hparams = {"img_mean": (128, 128, 128), "magnitude_std": float("inf")}
    ops = augmix_ops(magnitude=1, hparams=hparams, transforms=list(AUGMIX_OPS))
    return T.Compose([crop, T.RandomHorizontalFlip(), AugMixAugment(ops, alpha=1.0, width=3, depth=-1)])


def default_settings(native_size: int) -> tuple[str, float, float, int]:
    """(optimizer, lr, weight decay, views) of the reference: CIFAR models SGD 0.005 with 32 views,
    ImageNet ViT-like models AdamW 1e-5, weight decay 0.01, with 64 views."""
    return ("sgd", 0.005, 0.0, 32) if is_low_res(native_size) else ("adamw", 1e-5, 0.01, 64)


class MEMO(Adapter):
    name = "memo"

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        optimizer: str = "sgd",
        lr: float = 0.005,
        weight_decay: float = 0.0,
        views: int = 32,
        seed: int = 0,
    ):
        model.eval().requires_grad_(False)
        params = [p for p in model.parameters()]
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        super().__init__(model, params, opt)
        self.mean, self.std = tuple(mean), tuple(std)
        self.views, self.seed, self.index = views, seed, 0
        self._transform: T.Compose | None = None

    def _raw(self, image: torch.Tensor) -> np.ndarray:
        """A normalized image back to 8-bit RGB, for callers that have no raw image."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        pixels = (image.detach().cpu().float() * std + mean).clamp(0, 1)
        return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def augmented_views(self, raw: np.ndarray, model_size: int, device=None) -> torch.Tensor:
        """``views`` augmented copies of one (H, W, 3) uint8 image as the model's normalized input;
        seeded by the image's position in the stream."""
        if self._transform is None:
            self._transform = view_transform(raw.shape[0])
        pil = Image.fromarray(raw)
        with seeded(sample_seed(self.seed, 0, self.index)):
            arrays = np.stack([np.asarray(self._transform(pil), dtype=np.uint8) for _ in range(self.views)])
        return to_model_input(arrays, self.mean, self.std, model_size, device or torch.device("cpu"))

    def __call__(self, images: torch.Tensor, raw: np.ndarray | None = None) -> torch.Tensor:
        """``images``: the model's normalized input; ``raw``: the same images as uint8 at their own
        size, which the views are made from (MEMO augments the image, not the resized tensor)."""
        out = []
        for i, image in enumerate(images):
            pixels = raw[i] if raw is not None else self._raw(image)
            with torch.enable_grad():
                views = self.augmented_views(pixels, image.shape[-1], image.device).to(image.dtype)
                loss = marginal_entropy(self.forward(views))
                self.optimizer.zero_grad(set_to_none=True)
                self.backward(loss)
                self.optimizer.step()
            with torch.no_grad():
                out.append(self.forward(image.unsqueeze(0)))
            # episodic: the next image starts from the original weights (the base class's copy); the
            # optimizer's state carries over, as in the reference (which reloads the weights only)
            self.model.load_state_dict(self._saved[0])
            self.index += 1
        return torch.cat(out)
