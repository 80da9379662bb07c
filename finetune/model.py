"""The network to fine-tune (a checkpoint's backbone with a new or kept head, or a timm model from
scratch) and the teacher of a distillation run."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.checkpoint import content_hash, load_backbone, read_meta
from selfsup.data import DatasetInfo
from selfsup.errors import UsageError
from selfsup.finetune.settings import FinetuneConfig
from selfsup.models import MOCO_V3_ARCHS, BackboneSpec, create_backbone, patch_grid_problem


@dataclass
class Start:
    """What fine-tuning starts from; ``spec`` is what the exported classifier records."""

    model: nn.Module
    spec: BackboneSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    parent_sha256: str = ""  # the checkpoint's weights, "" from random init
    description: str = ""


def _classes_differ(names: list[str], info: DatasetInfo) -> str:
    return (
        f"{len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) but "
        f"{info.name} has {info.num_classes} ({', '.join(info.classes[:5])}{', ...' if info.num_classes > 5 else ''})"
    )


def _trainable(model: nn.Module) -> nn.Module:
    """Everything trains in fine-tuning: MoCo v3 freezes its patch projection and sin-cos position
    embedding only while pretraining (DeiT fine-tunes both, starting from the pretrained values)."""
    model.requires_grad_(True)
    return model


def init_head(model: nn.Module, std: float) -> None:
    """A new head: truncated normal weights of a small ``std`` and zero bias (MAE's fine-tuning).

    The head is what timm's ``get_classifier()`` names (a distilled DeiT returns its two heads)."""
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=std)
            if head.bias is not None:
                nn.init.zeros_(head.bias)


def build_start(config: FinetuneConfig, info: DatasetInfo) -> Start:
    """The classifier to fine-tune, ``info.num_classes`` outputs, at the configured input size.

    Every random weight (a new head, a random-init network) comes from ``config.seed`` alone: the same
    in every process of a run and in a resumed run, whatever ran before in the process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _build_start(config, info)


def _build_start(config: FinetuneConfig, info: DatasetInfo) -> Start:
    n = info.num_classes
    if config.model is not None:
        spec = BackboneSpec(
            arch=config.model,
            img_size=config.img_size or 224,
            patch_size=config.patch_size,
            pos_embed="learned",
            # a MoCo v3 alias starts from MoCo v3's initialisation, as its pretrained twin did
            init="moco_v3" if config.model in MOCO_V3_ARCHS else "timm",
            extra=dict(config.model_kwargs),
        )
        spec.drop_path_rate = config.drop_path
        model = create_backbone(spec, num_classes=n)
        init_head(model, config.head_init_std)
        return Start(model, spec, info.mean, info.std, description=f"{config.model} from random init")
    path = config.checkpoint
    meta = read_meta(path)
    spec = _checkpoint_spec(config, meta, path)
    names = list(meta.class_names)
    keep_head = meta.num_classes > 0 and config.head == "auto" and not config.random_init
    if keep_head and names != list(info.classes):
        raise UsageError(
            f"classifier checkpoint {path} predicts {_classes_differ(names, info)}: "
            "pass head=new to fine-tune it with a new head"
        )
    mean, std = tuple(meta.mean), tuple(meta.std)
    if config.random_init:
        content_hash(
            path
        )  # its weights are not used, but a checkpoint that does not match its sidecar is refused
        model = create_backbone(spec, num_classes=n)
        init_head(model, config.head_init_std)
        return Start(
            _trainable(model),
            _as_classifier_spec(spec),
            mean,
            std,
            description=f"{spec.arch} from random init",
        )
    model, loaded = load_backbone(  # the load checks the weights against the sidecar's SHA-256
        path,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        num_classes=n,
        drop_path_rate=config.drop_path,
    )
    if not keep_head:
        init_head(model, config.head_init_std)
    spec = _as_classifier_spec(spec)
    what = "its head" if keep_head else "a new head"
    parent = loaded.weights_sha256 or content_hash(path)  # sidecars without a digest: computed
    return Start(_trainable(model), spec, mean, std, parent, f"{path} with {what}")


def _checkpoint_spec(config: FinetuneConfig, meta, path: str) -> BackboneSpec:
    """The checkpoint's architecture at the configured input and patch size (its own where unset),
    refused when the image does not tile into whole patches (e.g. img_size=30 with 8 px patches)."""
    spec = meta.spec
    spec.img_size = config.img_size or meta.img_size
    spec.patch_size = config.patch_size or spec.patch_size
    spec.drop_path_rate = config.drop_path
    if problem := patch_grid_problem(spec):
        raise UsageError(f"img_size={spec.img_size} for {path}: {problem} (patch_size sets the patch)")
    return spec


def _as_classifier_spec(spec: BackboneSpec) -> BackboneSpec:
    """A fine-tuned position embedding is learned weights, not a table to rebuild; the patch
    projection is no longer frozen."""
    return replace(spec, pos_embed="learned", frozen_patch_embed=False, extra=dict(spec.extra))


def low_res_note(img_size: int, patch: int | None) -> str:
    return (
        f"low-resolution mode: {img_size} px images with {patch or 'the default'} px patches, not upsampled. "
        "Fast on CPUs; not the paper's setting (MoCo v3 fine-tunes at 224 px)"
    )


class Teacher(nn.Module):
    """A classifier checkpoint in eval mode without gradients, fed the student's images converted to
    its own normalization and input size."""

    def __init__(self, path: str, info: DatasetInfo, student_mean, student_std, student_size: int):
        super().__init__()
        meta = read_meta(path)
        if meta.num_classes == 0:
            raise UsageError(
                f"--teacher {path} is a backbone without a classifier head: give a fine-tuned classifier"
            )
        if list(meta.class_names) != list(info.classes):
            raise UsageError(f"--teacher {path} predicts {_classes_differ(list(meta.class_names), info)}")
        self.net, _ = load_backbone(path, num_classes=meta.num_classes)
        self.net.eval().requires_grad_(False)
        self.size = meta.img_size
        self.student_size = student_size
        self.register_buffer("s_mean", torch.tensor(student_mean).view(1, 3, 1, 1))
        self.register_buffer("s_std", torch.tensor(student_std).view(1, 3, 1, 1))
        self.register_buffer("t_mean", torch.tensor(meta.mean).view(1, 3, 1, 1))
        self.register_buffer("t_std", torch.tensor(meta.std).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> Teacher:  # always evaluates (BatchNorm statistics, dropout off)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images * self.s_std + self.s_mean - self.t_mean) / self.t_std
        if self.size != self.student_size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.net(x)


def uses_distillation_token(model: nn.Module) -> bool:
    return hasattr(model, "set_distilled_training")


def warn_teacher_kind(model: nn.Module, kind: str) -> None:
    if kind == "deit" and not uses_distillation_token(model):
        raise UsageError(
            "distill.kind=deit needs a student with a distillation token (timm's deit_*_distilled_* models, "
            "e.g. --model deit_tiny_distilled_patch16_224); use distill.kind=hinton for other students"
        )
    if kind == "hinton" and uses_distillation_token(model):
        print(
            "note: a distilled DeiT student trained with hinton: each of its two heads gets the labels and the "
            "teacher's soft targets (distill.kind=deit trains the distillation head on the teacher's argmax)",
            file=sys.stderr,
        )
