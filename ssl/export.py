"""The backbone alone (no projector, predictor or momentum encoder) as a selfsup checkpoint.

MoCo v3 transfers the base encoder's backbone (official ``convert_to_deit.py`` keeps
``base_encoder`` and drops its head). The state dict keys are plain timm ViT keys, so
``timm.create_model(...).load_state_dict`` reads the file as well as
:func:`selfsup.checkpoint.load_backbone` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from selfsup.checkpoint import CheckpointMeta, save_checkpoint
from selfsup.config import to_dict
from selfsup.errors import UsageError
from selfsup.runstate import MODEL_FILE, check_resume_config, load_position, resolve_resume
from selfsup.ssl.builder import build_model
from selfsup.ssl.settings import RESUMABLE_CHANGES, PretrainConfig

BACKBONE_NAME = "backbone"


def export_backbone(
    backbone: nn.Module, config: PretrainConfig, data: dict[str, Any], out: str | Path | None = None
) -> Path:
    """Write ``OUT/backbone.safetensors`` + ``backbone.json``; ``data`` holds the dataset's mean/std."""
    meta = CheckpointMeta(
        backbone=config.model.to_dict(),
        img_size=config.model.img_size,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        stage="pretrain",
        config=to_dict(config),
        source=dict(data.get("source") or {}),  # a run continued from a released file (import_run)
    )
    return save_checkpoint(
        Path(out or config.out) / BACKBONE_NAME, backbone.state_dict(), meta, model=backbone
    )


def export_latest(config: PretrainConfig) -> Path:
    """``export_only=true``: the backbone of the checkpoint ``resume`` points at (default: latest in ``out``)."""
    checkpoint = resolve_resume(config.resume if config.resume != "never" else "auto", config.out)
    if checkpoint is None:
        raise UsageError(f"export_only: no complete checkpoint under {config.out}/checkpoints; train first")
    position = load_position(checkpoint)
    model = build_model(config)  # resolves the recipe keys, as the run that saved the checkpoint did
    check_resume_config(checkpoint, position, to_dict(config), config.force_resume, RESUMABLE_CHANGES)
    state = load_file(str(checkpoint / MODEL_FILE))
    model.load_state_dict(state)
    return export_backbone(model.backbone, config, position.data)
