"""MEMO (Zhang, Levine & Finn, NeurIPS 2022, "MEMO: Test Time Robustness via Adaptation and Augmentation").

Episodic, one test image at a time: draw N augmented views (a random crop and flip, then AugMix),
minimise the entropy of the marginal prediction (the views' averaged probabilities) with one step
on every parameter, predict the original image with the adapted weights, then put the weights back,
so no image sees another's adaptation. Facts from the paper and the reference code
(zhangmarvin/memo): AugMix with width 3 and random depth 1-3 over operations that do not overlap
the test corruptions (no colour, contrast, brightness or sharpness changes); ImageNet ViTs use
AdamW, lr 1e-5, weight decay 0.01 (64 views; CIFAR models 32 views, the default here). The views are
AugMix of timm (``AugMixAugment``) at AugMix's default severity 3; each image's views are seeded.
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
from selfsup.tta.adapter import Adapter

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


def view_transform(size: int) -> T.Compose:
    """A random crop and flip (padding crop for small images, resized crop otherwise), then AugMix."""
    crop = T.RandomCrop(size, padding=size // 8) if size <= 64 else T.RandomResizedCrop(size)
    ops = augmix_ops(magnitude=3, hparams={"img_mean": (128, 128, 128)}, transforms=list(AUGMIX_OPS))
    return T.Compose([crop, T.RandomHorizontalFlip(), AugMixAugment(ops, alpha=1.0, width=3, depth=-1)])


class MEMO(Adapter):
    name = "memo"

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        views: int = 32,
        seed: int = 0,
    ):
        model.eval().requires_grad_(False)
        params = [p for p in model.parameters()]
        super().__init__(model, params, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.views, self.seed, self.index = views, seed, 0
        self._transform = None

    def _pil(self, image: torch.Tensor) -> Image.Image:
        """The normalized image back to 8-bit RGB (as the reference, which augments PIL images)."""
        pixels = (image.unsqueeze(0).cpu() * self.std + self.mean).clamp(0, 1)[0]
        return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    def augmented_views(self, image: torch.Tensor) -> torch.Tensor:
        """``views`` AugMix views of one normalized image, normalized; seeded by the image's index."""
        if self._transform is None:
            self._transform = view_transform(image.shape[-1])
        pil = self._pil(image)
        with seeded(sample_seed(self.seed, 0, self.index)):
            arrays = [np.asarray(self._transform(pil), dtype=np.float32) / 255 for _ in range(self.views)]
        views = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return ((views - self.mean) / self.std).to(image.device, image.dtype)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for image in images:
            with torch.enable_grad():
                loss = marginal_entropy(self.forward(self.augmented_views(image)))
                self.optimizer.zero_grad(set_to_none=True)
                self.backward(loss)
                self.optimizer.step()
            with torch.no_grad():
                out.append(self.forward(image.unsqueeze(0)))
            self.reset()  # episodic: the next image starts from the original weights
            self.index += 1
        return torch.cat(out)
