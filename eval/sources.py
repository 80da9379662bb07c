"""What is being evaluated: a saved checkpoint, or an architecture at random initialisation.

A :class:`Source` knows how to build its frozen backbone, which normalisation its inputs need and
what identifies its weights for the feature cache: the weights' SHA-256 (checked against the file,
so replaced weights are never mistaken for the recorded ones) or, at random init, spec + seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.checkpoint import content_hash, load_backbone, read_meta, weights_path
from selfsup.models import MOCO_V3_ARCHS, BackboneSpec, create_backbone

Stats = tuple[float, float, float]


@dataclass
class Source:
    name: str  # the row label in the report
    kind: str  # "checkpoint" | "random_init"
    spec: BackboneSpec
    mean: Stats | None  # None: use the dataset's defaults (a timm name has no sidecar)
    std: Stats | None
    path: str | None = None
    weights_sha256: str | None = None
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        """What the features depend on besides the data: the cache key's model part."""
        if self.kind == "checkpoint":
            return {"weights_sha256": self.weights_sha256, "spec": self.spec.to_dict()}
        return {"random_init": self.spec.to_dict(), "seed": self.seed}

    def build(self) -> nn.Module:
        if self.kind == "checkpoint":
            model, _ = load_backbone(self.path, img_size=self.spec.img_size, patch_size=self.spec.patch_size)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = create_backbone(self.spec)
        return model.eval().requires_grad_(False)


def from_checkpoint(path: str | Path, img_size: int | None = None, patch_size: int | None = None) -> Source:
    """A checkpoint's source; a missing file or weights that do not match the sidecar are refused."""
    actual = content_hash(path)  # refuses a missing file or weights from another save
    meta = read_meta(path)
    weights = weights_path(path)
    spec = meta.spec
    spec.img_size = img_size or meta.img_size or spec.img_size
    spec.patch_size = patch_size or spec.patch_size
    name = f"{weights.parent.name}/{weights.stem}" if weights.parent.name else weights.stem
    return Source(name, "checkpoint", spec, tuple(meta.mean), tuple(meta.std), str(weights), actual)


def random_init_twin(source: Source, seed: int = 0) -> Source:
    """The same architecture, input size and normalisation as ``source``, at random initialisation."""
    return Source(
        f"{source.name} (random init)",
        "random_init",
        replace(source.spec),
        source.mean,
        source.std,
        seed=seed,
    )


def from_model_name(arch: str, img_size: int | None, patch_size: int | None, seed: int = 0) -> Source:
    """A timm name (or a MoCo v3 alias) at random init; timm's own default pos-embed unless an alias."""
    spec = BackboneSpec(
        arch=arch,
        img_size=img_size or 224,
        patch_size=patch_size,
        pos_embed="sincos" if arch in MOCO_V3_ARCHS else "learned",
        init="moco_v3" if arch in MOCO_V3_ARCHS else "timm",
    )
    create_backbone(replace(spec, extra={**spec.extra}))  # an unknown name fails here, with a hint
    return Source(f"{arch} (random init)", "random_init", spec, None, None, seed=seed)


def unique_names(sources: list[Source]) -> list[Source]:
    seen: dict[str, int] = {}
    for s in sources:
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name} #{seen[s.name]}"
    return sources
