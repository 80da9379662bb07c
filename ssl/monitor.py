"""Online collapse check: weighted kNN (DINO protocol, k = 20) on the base backbone's CLS features.

A small labelled set of the same dataset (training split as the memory bank, validation split as
queries, both capped, a fixed subset) is embedded with evaluation preprocessing; an accuracy that
falls to chance while the loss keeps moving is the signature of a collapse.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from selfsup.data import DataOptions, build_dataset
from selfsup.eval.knn import knn_classify
from selfsup.features import extract_features
from selfsup.transforms import eval_transform


def _capped(dataset, cap: int):
    if len(dataset) <= cap:
        return dataset
    keep = np.sort(np.random.default_rng(0).permutation(len(dataset))[:cap])
    return Subset(dataset, keep.tolist())


class KnnMonitor:
    def __init__(
        self, dataset: str, options: DataOptions, img_size: int, train_size: int, val_size: int, k: int = 20
    ):
        _, info = build_dataset(dataset, "train", None, options)
        transform = eval_transform(img_size, info.mean, info.std, native_size=info.image_size)
        train, _ = build_dataset(dataset, "train", transform, options)
        val, _ = build_dataset(dataset, "val", transform, options)
        self.train = _capped(train, train_size)
        self.val = _capped(val, val_size)
        self.k = k
        self.num_classes = info.num_classes

    def _embed(self, backbone: nn.Module, dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # The main process alone (the others wait at the epoch hook), in fp32 as the monitor always ran.
        feats, labels = extract_features(
            backbone, dataset, "cls", num_workers=0, mixed_precision="no", device=device, progress=False
        )
        return torch.from_numpy(feats), torch.from_numpy(labels)

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:
        """Top-1 kNN accuracy in percent."""
        was_training = backbone.training
        backbone.eval()
        try:
            train_x, train_y = self._embed(backbone, self.train, device)
            val_x, val_y = self._embed(backbone, self.val, device)
        finally:
            backbone.train(was_training)
        result = knn_classify(
            train_x, train_y, val_x, val_y, ks=(self.k,), num_classes=self.num_classes, backend="torch"
        )
        return next(iter(result.values())).top1
