"""The project's architectures, registered with timm's model registry on import.

``import selfsup.architectures`` makes ``timm.create_model(name)`` build each of them (the stages
import it for you; stock timm needs the import before rebuilding a checkpoint of one of them):

* BoTNet: ``botnet50`` (the paper's BoT50), ``botnet_tiny`` (32-64 px) (:mod:`selfsup.backbones.botnet`);
* T2T-ViT: ``t2t_vit_t_7``, ``t2t_vit_t_12``, ``t2t_vit_t_14``, ``t2t_vit_t_tiny`` (32 px) (:mod:`selfsup.backbones.t2t_vit`);
* DynamicConv: ``dy_resnet18``, ``dy_mobilenetv2_100``, ``dy_resnet_tiny`` (32 px) (:mod:`selfsup.backbones.dynamic_conv`);
* SkipNet: ``skip_resnet110`` (CIFAR SkipNet-110), ``skip_resnet38`` (:mod:`selfsup.backbones.skipnet`).
"""

from __future__ import annotations

from selfsup.backbones import botnet, dynamic_conv, skipnet, t2t_vit  # noqa: F401  (registers the models)

ARCHITECTURES = {
    "botnet": ("botnet50", "botnet_tiny"),
    "t2t_vit": ("t2t_vit_t_7", "t2t_vit_t_12", "t2t_vit_t_14", "t2t_vit_t_tiny"),
    "dynamic_conv": ("dy_resnet18", "dy_mobilenetv2_100", "dy_resnet_tiny"),
    "skipnet": ("skip_resnet110", "skip_resnet38"),
}
