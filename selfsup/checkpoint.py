"""The one checkpoint format between stages: ``NAME.safetensors`` plus a ``NAME.json`` sidecar.

The sidecar (:class:`CheckpointMeta`) says how to rebuild the model (backbone spec), what it
expects as input (image size, normalization), what it predicts (classes), who made it (stage,
resolved config, library versions) and the SHA-256 of the weights file, so a sidecar cannot be
paired with the wrong weights and caches can key on the content. See docs/checkpoint-format.md.

Files are written atomically (temporary file in the same folder, fsync, rename): a kill during a
save leaves the previous checkpoint intact. Weights are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from selfsup.errors import UsageError
from selfsup.files import atomic_write_bytes, file_sha256
from selfsup.models import BackboneSpec, create_backbone, is_vit, timm_pretrained_cfg, timm_rebuild_args
from selfsup.shapes import apply_shapes
from selfsup.transforms import eval_crop_pct

# 2: the `timm` section (stock-timm rebuild recipe); 3: parent_sha256; 4: shapes; 5: source (an imported file)
FORMAT_VERSION = 5
# classifier heads in timm's models: ViTs (a distilled DeiT has two), ConvNeXt (head.fc), ResNets, EfficientNets
HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")


def library_versions() -> dict[str, str]:
    import timm

    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        from importlib.metadata import version

        versions["selfsup"] = version("selfsup")
    except Exception:  # running from a source tree that was not installed
        versions["selfsup"] = "unknown"
    return versions


@dataclass
class CheckpointMeta:
    """The JSON sidecar. ``backbone`` is a :class:`BackboneSpec` as a dict."""

    backbone: dict[str, Any]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stage: str
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    # How stock timm rebuilds the model: {"model_name", "kwargs", "pretrained_cfg"}; see timm_call().
    timm: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of the checkpoint this one was trained from ("" for a start from random weights)
    parent_sha256: str = ""
    # modules whose sizes differ from the architecture's (a structurally pruned model): see
    # selfsup.shapes; applied before the weights load, with plain torch
    shapes: dict[str, Any] = field(default_factory=dict)
    # the released file the weights were imported from (selfsup.weights): {"format", "file", "sha256",
    # ...}; kept by every checkpoint trained from it, {} for weights this project pretrained
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> BackboneSpec:
        return BackboneSpec.from_dict(self.backbone)


def inherited_source(path: str | Path | None, parent_sha256: str) -> dict[str, Any]:
    """The imported file that the checkpoint at ``path`` descends from, for a checkpoint trained from
    it (``parent_sha256`` set: its weights were used); ``{}`` otherwise."""
    return dict(read_meta(path).source) if path and parent_sha256 else {}


def source_line(source: dict[str, Any]) -> str:
    """The imported file in one sentence, for reports (``""`` without one)."""
    if not source:
        return ""
    encoder = f", {source['encoder']} encoder" if source.get("encoder") else ""
    digest = f", SHA-256 {source['sha256'][:12]}" if source.get("sha256") else ""
    return f"Weights imported from {source['file']} ({source['format']}{encoder}{digest})."


def sidecar_path(path: str | Path) -> Path:
    return weights_path(path).with_suffix(".json")


def weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def save_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    model: nn.Module | None = None,
    crop_pct: float | None = None,
) -> Path:
    """Save tensors and sidecar; returns the ``.safetensors`` path. Weights first, then the sidecar.

    With ``model``, the sidecar also records how stock timm rebuilds it (:func:`timm_call`), with
    the evaluation crop ``crop_pct`` the producing stage used (default:
    :func:`selfsup.transforms.eval_crop_pct` of the model's input size).
    """
    target = weights_path(path)
    if model is not None:
        name, kwargs = timm_rebuild_args(model, meta.spec, meta.num_classes)
        crop = crop_pct if crop_pct is not None else eval_crop_pct(meta.img_size)
        meta.timm = {
            "model_name": name,
            "kwargs": kwargs,
            "pretrained_cfg": timm_pretrained_cfg(
                name, meta.num_classes, meta.img_size, meta.mean, meta.std, crop, target.name
            ),
        }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # One metadata key only: safetensors stores metadata in a hash map whose order varies per
    # process, so two keys would give identical weights a different SHA-256 in each process.
    payload = st_save(tensors, metadata={"format": "pt"})
    meta.weights_sha256 = hashlib.sha256(payload).hexdigest()
    atomic_write_bytes(target, payload)
    atomic_write_bytes(sidecar_path(target), json.dumps(asdict(meta), indent=2).encode())
    return target


def timm_call(path: str | Path, meta: CheckpointMeta | None = None) -> str:
    """The Python line that builds this checkpoint's model in stock timm (no selfsup import)."""
    meta = meta or read_meta(path)
    if not meta.timm:
        return ""
    cfg = dict(meta.timm["pretrained_cfg"], file=str(weights_path(path)))
    kwargs = "".join(f", {k}={v!r}" for k, v in meta.timm["kwargs"].items())
    return f"timm.create_model({meta.timm['model_name']!r}, pretrained=True, pretrained_cfg_overlay={cfg!r}{kwargs})"


def read_meta(path: str | Path) -> CheckpointMeta:
    side = sidecar_path(path)
    if not side.is_file():
        raise UsageError(
            f"no checkpoint sidecar at {side}: a selfsup checkpoint is NAME.safetensors plus NAME.json "
            "(written by pretrain/finetune); check the --checkpoint path"
        )
    try:
        data = json.loads(side.read_text())
        meta = CheckpointMeta(**data)
        meta.spec  # noqa: B018  (an unknown backbone field fails here, with the sidecar named)
    except (ValueError, TypeError) as err:  # ValueError: bad JSON or not text (UnicodeDecodeError)
        raise UsageError(f"checkpoint sidecar {side} is not a selfsup sidecar ({err})") from None
    if meta.format_version > FORMAT_VERSION:
        raise UsageError(f"{side} has format version {meta.format_version}; upgrade selfsup to read it")
    return meta


def _weights_file(path: str | Path) -> tuple[Path, CheckpointMeta]:
    target = weights_path(path)
    meta = read_meta(target)
    if not target.is_file():
        raise UsageError(
            f"checkpoint weights {target} are missing (the sidecar {sidecar_path(target)} exists)"
        )
    return target, meta


def _check_digest(target: Path, digest: str, meta: CheckpointMeta) -> str:
    if meta.weights_sha256 and digest != meta.weights_sha256:
        raise UsageError(
            f"{target} does not match its sidecar (SHA-256 {digest[:12]} != {meta.weights_sha256[:12]}); "
            "the files come from different saves: re-export the checkpoint"
        )
    return digest


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Tensors and sidecar of a checkpoint; the sidecar's SHA-256 must match the weights."""
    target, meta = _weights_file(path)
    payload = target.read_bytes()
    _check_digest(target, hashlib.sha256(payload).hexdigest(), meta)
    try:
        state = st_load(payload)
    except SafetensorError as err:
        raise UsageError(f"{target} is not a valid safetensors file ({err})") from None
    return state, meta


def content_hash(path: str | Path) -> str:
    """The weights' SHA-256, computed from the file (streamed) and checked against the sidecar.

    A cache key: replaced weights at the same path get a new key, or an error if the sidecar disagrees.
    """
    target, meta = _weights_file(path)
    return _check_digest(target, file_sha256(target), meta)


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT's position and patch embeddings to ``model``'s grid and patch size (timm helpers)."""
    if not is_vit(model):
        return state
    state = dict(state)
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old_tokens = state["pos_embed"].shape[1] - prefix
        old_side = math.isqrt(old_tokens)
        if old_side * old_side == old_tokens:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"],
                new_size=list(model.patch_embed.grid_size),
                old_size=[old_side, old_side],
                num_prefix_tokens=prefix,
            )
    key = "patch_embed.proj.weight"
    if (
        key in state
        and state[key].shape[-2:] != own[key].shape[-2:]
        and state[key].shape[:2] == own[key].shape[:2]
    ):
        state[key] = resample_patch_embed(state[key], new_size=list(own[key].shape[-2:]))
    return state


def load_state_checked(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing: tuple[str, ...] = ()
) -> None:
    """``load_state_dict`` that reports missing/unexpected keys and shape mismatches in one error.

    ``allow_missing`` lists key prefixes the caller will initialise itself (e.g. a new ``head.``).
    """
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        for label, keys in (
            ("shape mismatches", mismatched),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise UsageError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def load_backbone(
    path: str | Path,
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    num_classes: int = 0,
    drop_path_rate: float | None = None,
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the backbone recorded in a checkpoint and load its weights.

    Pass ``img_size``/``patch_size`` to get the model at another resolution: the position and
    patch embeddings are resampled. ``num_classes > 0`` adds a fresh classifier head; a head stored
    in the checkpoint is kept when its size matches. ``drop_path_rate`` sets stochastic depth for
    training (not recorded in the returned sidecar).
    """
    state, meta = load_checkpoint(path)
    spec = meta.spec
    if img_size is not None:
        spec.img_size = img_size
    if patch_size is not None:
        spec.patch_size = patch_size
    recorded_drop_path = spec.drop_path_rate
    if drop_path_rate is not None:
        spec.drop_path_rate = drop_path_rate
    model = create_backbone(spec, num_classes=num_classes)
    if meta.shapes:
        apply_shapes(model, meta.shapes)
    if spec.pos_embed == "sincos" and "pos_embed" in state:
        state["pos_embed"] = (
            model.pos_embed.detach().clone()
        )  # a fixed table: rebuilt for this grid, never interpolated
    state = adapt_state_dict(state, model)
    own = model.state_dict()
    head_keys = [k for k in state if k.startswith(HEAD_PREFIXES)]
    if num_classes == 0 or any(state[k].shape != own.get(k, state[k]).shape for k in head_keys):
        for k in head_keys:  # a backbone is asked for, or the classifier's size changed
            state.pop(k)
    load_state_checked(model, state, str(weights_path(path)), allow_missing=HEAD_PREFIXES)
    spec.drop_path_rate = recorded_drop_path
    meta.img_size = spec.img_size
    meta.backbone = spec.to_dict()
    return model, meta


def load_classifier(path: str | Path, needed_by: str) -> tuple[nn.Module, CheckpointMeta]:
    """A classifier checkpoint (backbone + head, e.g. fine-tune's best.safetensors) in eval mode;
    a backbone alone is one UsageError naming what ``needed_by`` needs it for."""
    meta = read_meta(path)
    if meta.num_classes <= 0:
        raise UsageError(
            f"{path} is a backbone without a classifier head (stage {meta.stage!r}); {needed_by} needs a "
            "classifier: fine-tune it first (finetune --checkpoint ...) and pass its best.safetensors"
        )
    model, meta = load_backbone(path, num_classes=meta.num_classes, drop_path_rate=0.0)
    return model.eval(), meta
