"""Layer sizes that differ from an architecture's defaults (a structurally pruned model), recorded as a
manifest in the checkpoint's sidecar and re-applied to a freshly built model before its weights load.

Structured pruning (compress/) removes channels, heads and hidden neurons, so the pruned weights no
longer fit the architecture the sidecar names. The manifest lists, for every resized module, what is
needed to rebuild it with plain torch (no pruning library): Linear in/out features, Conv in/out
channels, norm widths, and a timm attention module's head count and head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selfsup.errors import UsageError

try:  # timm's attention keeps its head layout in attributes the pruned qkv must agree with
    from timm.models.vision_transformer import Attention as TimmAttention
except ImportError:  # pragma: no cover - timm is a dependency
    TimmAttention = ()


def _describe(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in": module.in_features, "out": module.out_features}
    if isinstance(module, nn.Conv2d):
        return {
            "kind": "conv2d",
            "in": module.in_channels,
            "out": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.LayerNorm):
        return {"kind": "layernorm", "shape": list(module.normalized_shape)}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"kind": "batchnorm", "features": module.num_features}
    if isinstance(module, nn.GroupNorm):
        return {"kind": "groupnorm", "groups": module.num_groups, "channels": module.num_channels}
    if TimmAttention and isinstance(module, TimmAttention):
        return {"kind": "attention", "num_heads": module.num_heads, "head_dim": module.head_dim}
    return None


def shape_manifest(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, Any]]:
    """The modules of ``model`` whose sizes differ from the same-named modules of ``reference`` (the
    architecture at its defaults)."""
    ref = dict(reference.named_modules())
    manifest = {}
    for name, module in model.named_modules():
        mine = _describe(module)
        if mine is not None and name in ref and _describe(ref[name]) != mine:
            manifest[name] = mine
    return manifest


def _resized(old: nn.Module, spec: dict[str, Any]) -> nn.Module:
    kind = spec["kind"]
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=old.bias is not None)
    if kind == "conv2d":
        return nn.Conv2d(
            spec["in"],
            spec["out"],
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            spec["groups"],
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
        )
    if kind == "layernorm":
        return nn.LayerNorm(spec["shape"], eps=old.eps, elementwise_affine=old.elementwise_affine)
    if kind == "batchnorm":
        return type(old)(spec["features"], eps=old.eps, momentum=old.momentum, affine=old.affine)
    if kind == "groupnorm":
        return nn.GroupNorm(spec["groups"], spec["channels"], eps=old.eps, affine=old.affine)
    raise UsageError(f"a shape manifest names a module of unknown kind {kind!r}: written by a newer selfsup?")


def apply_shapes(model: nn.Module, manifest: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize ``model``'s modules in place as the manifest says (weights are loaded afterwards)."""
    for name, spec in manifest.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UsageError(
                f"the shape manifest names module {name!r}, which the architecture lacks"
            ) from None
        if spec["kind"] == "attention":
            old.num_heads, old.head_dim = spec["num_heads"], spec["head_dim"]
            old.attn_dim = spec["num_heads"] * spec["head_dim"]
            old.scale = spec["head_dim"] ** -0.5
            continue
        new = _resized(old, spec)
        new.to(next((p.dtype for p in old.parameters()), torch.float32))
        model.set_submodule(name, new)
    return model
