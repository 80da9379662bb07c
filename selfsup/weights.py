"""Released self-supervised ViT weights as a selfsup checkpoint (the ``selfsup-weights import`` command).

Key layouts read, with the names the releasing code saves (a file is read with
``torch.load(weights_only=True)`` only: tensors, dicts, lists and numbers, never unpickled code):

* ``moco-v3``: MoCo v3's ``main_moco.py`` checkpoint ``{'epoch', 'arch', 'state_dict', 'optimizer',
  'scaler'}`` (github.com/facebookresearch/moco-v3), keys ``module.base_encoder.*`` and
  ``module.momentum_encoder.*`` (a timm ViT whose ``head`` is the projection MLP) and
  ``module.predictor.*``. The chosen encoder is the backbone; projector and predictor are dropped,
  as ``convert_to_deit.py`` drops them.
* ``mocov3-lincls``: ``main_lincls.py``'s ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}``,
  keys ``module.*`` of the ViT with its linear ``head``: a classifier.
* ``deit``: ``convert_to_deit.py``'s ``{'model': base encoder without head}``, or a DeiT checkpoint
  (github.com/facebookresearch/deit) with its ``head``.
* ``mae``: MAE's ``{'model': ...}`` (github.com/facebookresearch/mae): the encoder
  (``mae_pretrain_vit_base.pth``), a whole pretraining checkpoint (``decoder_*`` and ``mask_token``
  dropped) or a fine-tuned classifier (``fc_norm``: average pooling, as timm's ``global_pool='avg'``).
* ``dino``: DINO's plain ViT state dict (``dino_vitbase16_pretrain.pth``, github.com/facebookresearch/dino);
  a ``backbone.`` prefix is stripped and DINO's projection head dropped.
* ``timm``: a timm model name with its pretrained tag, loaded by timm itself (hub or cache); a tag
  with a classifier (``vit_base_patch16_224.augreg_in21k_ft_in1k``) is imported with it, its classes
  named as timm names them (``pretrained_cfg['label_names']``, else the ImageNet subset timm infers).

``head="drop"`` (``--head drop``) imports any of them as a backbone, without a classifier.

Every ViT key of these files is already timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``fc_norm``, ``head``): the
mapping is which prefix to strip and which modules to drop. What the keys do not say (the number of
heads) comes from the architecture name; the rest (width, depth, patch, grid, MLP ratio, biases,
pooling) is read from the tensors and checked by a strict load.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo, infer_imagenet_subset
from torch import nn

from selfsup.checkpoint import CheckpointMeta, adapt_state_dict, load_state_checked, save_checkpoint
from selfsup.errors import UsageError
from selfsup.files import ensure_writable_dir, file_sha256
from selfsup.models import BackboneSpec, create_backbone, patch_grid_problem, sincos_pos_embed

# what each file format holds, as a refusal names it
EXPECTED = {
    "moco-v3": "main_moco.py's {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', ...}}",
    "mocov3-lincls": "main_lincls.py's {'state_dict': {'module.blocks.*', 'module.head.*', ...}}",
    "deit": "{'model': {'patch_embed.proj.weight', 'blocks.0.*', ...}} (convert_to_deit.py or DeiT)",
    "mae": "{'model': {'patch_embed.proj.weight', 'blocks.0.*', 'norm.*' or 'fc_norm.*', ...}} (MAE)",
    "dino": "a plain ViT state dict {'patch_embed.proj.weight', 'blocks.0.*', ...} (DINO's *_pretrain.pth)",
}
FILE_FORMATS = tuple(EXPECTED)
FORMATS = ("auto", *FILE_FORMATS, "timm")
ENCODERS = ("base", "momentum")
HEADS = ("keep", "drop")  # a file's or timm tag's classifier: imported with it, or a backbone alone
MOCO_FAMILY = ("moco-v3", "mocov3-lincls", "deit")
# --arch when not given, by embedding width: MoCo v3's ViT-S has 12 heads where timm's (DINO's) has 6
MOCO_ARCH_BY_WIDTH = {192: "moco_vit_tiny", 384: "moco_vit_small", 768: "moco_vit_base"}
TIMM_ARCH_BY_WIDTH = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
    1280: "vit_huge_patch14_224",
}
VIT_KEYS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
MAE_DECODER = ("decoder_", "mask_token")


@dataclass
class Imported:
    """A file's ViT weights under timm's key names, and where they came from."""

    state: dict[str, torch.Tensor]
    format: str
    file: str
    sha256: str
    encoder: str = ""  # MoCo v3's base or momentum encoder

    @property
    def num_classes(self) -> int:
        head = self.state.get("head.weight")
        return 0 if head is None else int(head.shape[0])

    def source(self) -> dict[str, Any]:
        found = {"format": self.format, "file": self.file, "sha256": self.sha256}
        return found | ({"encoder": self.encoder} if self.encoder else {})


@dataclass
class ReleasedRun:
    """MoCo v3's ``main_moco.py`` training state, for a pretraining run to continue: ``state`` under
    the file's names without DDP's ``module.`` (``base_encoder.*`` and ``momentum_encoder.*``, each a
    ViT whose ``head.*`` is the projection MLP, and ``predictor.*``), ``epoch`` the epochs it completed
    (``main_moco.py`` saves ``epoch + 1``), its ``arch`` and its ``source``. Its ``optimizer`` and
    ``scaler`` are left out: they are the state of another program's optimizer."""

    state: dict[str, torch.Tensor]
    epoch: int
    arch: str
    source: dict[str, Any]


def read_moco_v3_run(path: str | Path) -> ReleasedRun:
    """A ``main_moco.py`` checkpoint's encoders, predictor and epoch; anything else is one refusal."""
    path = Path(path)
    obj = read_tensors(path)
    if detect_format(obj) != "moco-v3":
        raise UsageError(
            f"{path} is not a MoCo v3 pretraining checkpoint: expected {EXPECTED['moco-v3']}; found {describe(obj)}"
        )
    epoch = obj.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise UsageError(
            f"{path} has no count of completed epochs ('epoch': {epoch!r}), as main_moco.py saves"
        )
    state = {k: v for k, v in _unwrapped(obj["state_dict"]).items() if isinstance(v, torch.Tensor)}
    source = {"format": "moco-v3", "file": path.name, "sha256": file_sha256(path)}
    return ReleasedRun(state, epoch, str(obj.get("arch", "")), source)


def read_tensors(path: Path) -> Any:
    """The file's contents through ``torch.load(weights_only=True)``; a file that needs unpickling code
    (a class, a function, an ``argparse.Namespace``) is refused, not run."""
    if not path.is_file():
        raise UsageError(
            f"no file at {path}: give a released checkpoint (.pth, .pth.tar), or a timm model name with --format timm"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
        raise UsageError(
            f"{path} needs unpickling code to load, which is never run ({(lines or [str(err)])[0].strip()}); "
            "expected tensors, dicts, lists and numbers only, as MoCo v3, MAE, DINO and DeiT release them"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise UsageError(f"{path} is not a PyTorch checkpoint ({str(err).splitlines()[0]})") from None


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _unwrapped(state: Any) -> dict[str, Any]:
    """A state dict without DistributedDataParallel's ``module.`` prefix ({} for anything else)."""
    if not isinstance(state, dict):
        return {}
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return _strip(state, "module.")
    return dict(state)


def _is_vit(state: dict[str, Any]) -> bool:
    return all(isinstance(state.get(k), torch.Tensor) for k in VIT_KEYS)


def _has_moco_sincos(state: dict[str, Any]) -> bool:
    """Is the position embedding MoCo v3's fixed 2-D sin-cos table (then it is rebuilt, not interpolated)?"""
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return False
    prefix = 1 if "cls_token" in state else 0
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix or pos.shape[-1] % 4:
        return False
    return torch.allclose(pos.float(), sincos_pos_embed((side, side), pos.shape[-1], prefix), atol=1e-5)


def _is_deit(state: dict[str, Any]) -> bool:
    """``{'model': ...}`` files: DeiT's (a head, or MoCo v3's sin-cos table) rather than MAE's."""
    if any(k.startswith((*MAE_DECODER, "fc_norm.")) for k in state):
        return False
    return "head.weight" in state or _has_moco_sincos(state)


def detect_format(obj: Any) -> str | None:
    """The layout of a loaded file (one of :data:`FILE_FORMATS`), or None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("state_dict"), dict):
        flat = _unwrapped(obj["state_dict"])
        if any(k.startswith(("base_encoder.", "momentum_encoder.")) for k in flat):
            return "moco-v3"
        return "mocov3-lincls" if _is_vit(flat) else None
    if isinstance(obj.get("model"), dict):
        flat = _unwrapped(obj["model"])
        return None if not _is_vit(flat) else "deit" if _is_deit(flat) else "mae"
    flat = _unwrapped(obj)
    return "dino" if _is_vit(flat) or _is_vit(_strip(flat, "backbone.")) else None


def describe(obj: Any) -> str:
    """What a file holds, for a refusal: its top-level keys and the first keys of a nested state dict."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = [str(k) for k in obj]
    text = f"top-level keys {keys[:6]}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
    nested = [(k, v) for k, v in obj.items() if isinstance(v, dict) and v]
    if nested:
        name, inner = nested[0]
        text += f", {name!r} holding {[str(k) for k in list(inner)[:4]]}..."
    return text


def extract(obj: Any, fmt: str, encoder: str = "base") -> dict[str, torch.Tensor]:
    """The ViT's tensors under timm's names from a file of layout ``fmt``; refused when it is not one."""
    if fmt == "moco-v3":
        flat = _strip(
            _unwrapped(obj.get("state_dict") if isinstance(obj, dict) else None), f"{encoder}_encoder."
        )
        state = {k: v for k, v in flat.items() if not k.startswith("head.")}  # the projection MLP
    elif fmt == "mocov3-lincls":
        state = _unwrapped(obj.get("state_dict") if isinstance(obj, dict) else None)
    elif fmt in ("deit", "mae"):
        flat = _unwrapped(obj.get("model") if isinstance(obj, dict) else None)
        state = {k: v for k, v in flat.items() if not k.startswith(MAE_DECODER)}
    else:  # dino: the released backbone, or a training checkpoint's backbone.* without its DINO head
        flat = _unwrapped(obj)
        state = _strip(flat, "backbone.") if _is_vit(_strip(flat, "backbone.")) else flat
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not _is_vit(state):
        which = f" ({encoder} encoder)" if fmt == "moco-v3" else ""
        raise UsageError(f"not a {fmt} file{which}: expected {EXPECTED[fmt]}; found {describe(obj)}")
    return state


def _grid_side(state: dict[str, torch.Tensor], patch: int) -> int:
    pos = state.get("pos_embed")
    tokens = 0 if pos is None else pos.shape[1] - (1 if "cls_token" in state else 0)
    side = math.isqrt(tokens)
    if tokens == 0 or side * side != tokens:
        raise UsageError(
            f"the ViT's position embedding ({None if pos is None else tuple(pos.shape)}) is not a square grid "
            "of patches plus a class token: only plain ViTs with absolute position embeddings are imported"
        )
    return side


def _shape_options(state: dict[str, torch.Tensor], spec: BackboneSpec) -> dict[str, Any]:
    """The timm keyword arguments where the tensors differ from ``spec.arch``'s defaults."""
    with torch.device("meta"):  # the architecture's defaults, without allocating its weights
        ref = create_backbone(replace(spec, num_heads=None, pos_embed="learned", init="timm", extra={}))
    width = state["patch_embed.proj.weight"].shape[0]
    found = {
        "embed_dim": (int(width), ref.embed_dim),
        "depth": (len({k.split(".")[1] for k in state if k.startswith("blocks.")}), len(ref.blocks)),
        "mlp_ratio": (
            state["blocks.0.mlp.fc1.weight"].shape[0] / width,
            ref.blocks[0].mlp.fc1.out_features / ref.embed_dim,
        ),
        "qkv_bias": ("blocks.0.attn.qkv.bias" in state, ref.blocks[0].attn.qkv.bias is not None),
        "global_pool": ("avg" if "fc_norm.weight" in state else "token", ref.global_pool),
    }
    return {k: new for k, (new, default) in found.items() if new != default}


def infer_spec(
    state: dict[str, torch.Tensor], fmt: str, arch: str | None = None, num_heads: int | None = None
) -> BackboneSpec:
    """The backbone spec that rebuilds these tensors: ``arch`` (default by width) gives the heads."""
    width = int(state["patch_embed.proj.weight"].shape[0])
    arch = arch or (MOCO_ARCH_BY_WIDTH if fmt in MOCO_FAMILY else TIMM_ARCH_BY_WIDTH).get(width)
    if arch is None:
        raise UsageError(f"no default architecture for a {width}-wide ViT: pass --arch (and --num-heads)")
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    spec = BackboneSpec(
        arch=arch,
        img_size=_grid_side(state, patch) * patch,
        patch_size=patch,
        num_heads=num_heads,
        pos_embed="sincos" if _has_moco_sincos(state) else "learned",
        init="moco_v3" if fmt in MOCO_FAMILY else "timm",
    )
    spec.extra = _shape_options(state, spec)
    return spec


def _at_size(model: nn.Module, spec: BackboneSpec, img_size: int | None, source: str):
    """The model at another input size: a learned position embedding resampled with timm's
    ``resample_abs_pos_embed`` (:func:`selfsup.checkpoint.adapt_state_dict`), a sin-cos one rebuilt."""
    if img_size is None or img_size == spec.img_size:
        return model, spec
    target = replace(spec, img_size=img_size, extra=dict(spec.extra))
    if problem := patch_grid_problem(target):
        raise UsageError(problem)
    resized = create_backbone(target, num_classes=model.num_classes)
    state = model.state_dict()
    if target.pos_embed == "sincos":
        state["pos_embed"] = resized.pos_embed.detach().clone()
    load_state_checked(resized, adapt_state_dict(state, resized), source)
    return resized, target


def class_names(num_classes: int) -> list[str]:
    """ImageNet-1k's WordNet ids (its folder names) for a 1000-way head, else the indices."""
    if num_classes == 1000:
        return list(ImageNetInfo().label_names())
    return [str(i) for i in range(num_classes)]


# timm's tags of weights trained on ImageNet name it: a1_in1k, augreg_in21k_ft_in1k, sw_in12k, ...
IMAGENET_TAG = re.compile(r"in(?:1|12|21|22)k")


def timm_class_names(model: nn.Module) -> list[str]:
    """The classes of a timm model's head as timm names them: its ``pretrained_cfg['label_names']``,
    else, for an ImageNet tag, the labels of the subset timm infers (``infer_imagenet_subset``: the
    WordNet ids of in1k, in21k, ..., guessed from the class count alone, hence the tag check), else
    :func:`class_names`."""
    n = int(model.num_classes)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    imagenet = bool(IMAGENET_TAG.search(cfg.get("tag") or ""))
    if not names and imagenet and (subset := infer_imagenet_subset(model)):
        names = ImageNetInfo(subset).label_names()
    return [str(c) for c in names] if names and len(names) == n else class_names(n)


def write_checkpoint(
    model: nn.Module,
    spec: BackboneSpec,
    source: dict[str, Any],
    out: str | Path,
    norm=None,
    config=None,
    labels: list[str] | None = None,
) -> Path:
    """``OUT/backbone`` (or ``OUT/classifier`` with a head, its classes ``labels`` or :func:`class_names`)
    in the project's format, naming its source."""
    n = int(getattr(model, "num_classes", 0) or 0)
    mean, std = norm or (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    meta = CheckpointMeta(
        backbone=spec.to_dict(),
        img_size=spec.img_size,
        mean=tuple(mean),
        std=tuple(std),
        stage="import",
        num_classes=n,
        class_names=(labels or class_names(n)) if n else [],
        config=config or {},
        parent_sha256=source.get("sha256", ""),
        source=source,
    )
    folder = ensure_writable_dir(out)
    return save_checkpoint(folder / ("classifier" if n else "backbone"), model.state_dict(), meta, model)


def import_file(
    path: str | Path,
    out: str | Path,
    fmt: str = "auto",
    encoder: str = "base",
    arch: str | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
    head: str = "keep",
) -> tuple[Path, str]:
    """Import a released file; returns the written checkpoint and the format it was read as.
    ``head="drop"``: a classifier's head is left out (a backbone is written)."""
    path = Path(path)
    obj = read_tensors(path)
    if fmt == "auto":
        fmt = detect_format(obj) or ""
        if not fmt:
            expected = "; ".join(f"{name}: {what}" for name, what in EXPECTED.items())
            raise UsageError(f"{path} has no known key layout (expected {expected}); found {describe(obj)}")
    state = extract(obj, fmt, encoder)
    if head == "drop":
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    imported = Imported(state, fmt, path.name, file_sha256(path), encoder if fmt == "moco-v3" else "")
    spec = infer_spec(imported.state, fmt, arch, num_heads)
    model = create_backbone(spec, num_classes=imported.num_classes)
    load_state_checked(model, imported.state, f"{path} read as {fmt} with --arch {spec.arch}")
    model, spec = _at_size(model, spec, img_size, str(path))
    settings = {"file": str(path), "format": fmt, "encoder": encoder, "arch": arch, "num_heads": num_heads}
    settings["head"] = head
    return write_checkpoint(model, spec, imported.source(), out, config=settings), fmt


def _hub_file_sha256(cfg: dict[str, Any]) -> str:
    """SHA-256 of the file timm loaded when it is on disk (its ``file``) or in the Hugging Face cache;
    "" when it cannot be found (then the import names the model and tag only)."""
    from huggingface_hub import try_to_load_from_cache

    found = [cfg.get("file")]
    if repo := cfg.get("hf_hub_id"):
        for name in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            found.append(try_to_load_from_cache(repo, name) if name else None)
    files = [Path(f) for f in found if isinstance(f, str) and Path(f).is_file()]
    return file_sha256(files[0]) if files else ""


def _timm_spec(name: str, loaded: nn.Module) -> BackboneSpec:
    """The spec of a model timm built (its own position embedding and init: no MoCo v3 options)."""
    if hasattr(loaded, "patch_embed") and hasattr(loaded, "blocks"):
        size, patch = int(loaded.patch_embed.img_size[0]), int(loaded.patch_embed.patch_size[0])
    else:
        size, patch = int(loaded.pretrained_cfg["input_size"][-1]), None
    return BackboneSpec(
        arch=name.split(".")[0], img_size=size, patch_size=patch, pos_embed="learned", init="timm"
    )


def import_timm(
    name: str, out: str | Path, img_size: int | None = None, head: str = "keep"
) -> tuple[Path, str]:
    """A timm model's pretrained weights (``name`` with its tag), through timm's own loading, with the
    tag's normalization: a classifier where the tag has a head (its classes named by
    :func:`timm_class_names`), a backbone where it has none or ``head="drop"``."""
    if not timm.is_model(name):
        raise UsageError(f"'{name}' is not a timm model name (e.g. vit_base_patch16_224.augreg_in21k)")
    options = {"img_size": img_size} if img_size else {}
    if head == "drop":
        options["num_classes"] = 0
    try:
        loaded = timm.create_model(name, pretrained=True, **options)
    except TypeError:
        raise UsageError(f"{name} has no fixed input size to set: leave out --img-size") from None
    except Exception as err:  # not cached and no network, an unknown tag, a hub error: one fix for all
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"timm could not load the pretrained weights of {name} ({reason}): they are neither cached nor "
            f"reachable; fetch them where the network is (python -c \"import timm; timm.create_model('{name}', "
            'pretrained=True)") and copy the Hugging Face cache (~/.cache/huggingface) here'
        ) from None
    spec = _timm_spec(name, loaded)
    n = int(loaded.num_classes)
    model = create_backbone(spec, num_classes=n)  # the spec must rebuild what timm loaded, strictly
    load_state_checked(model, loaded.state_dict(), f"timm's {name}")
    cfg = loaded.pretrained_cfg
    source = {"format": "timm", "file": name, "sha256": _hub_file_sha256(cfg)}
    settings = {"name": name, "format": "timm", "img_size": img_size, "head": head}
    labels = timm_class_names(loaded) if n else None
    norm = (cfg["mean"], cfg["std"])
    return write_checkpoint(model, spec, source, out, norm, settings, labels), "timm"
