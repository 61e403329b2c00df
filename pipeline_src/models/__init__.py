"""Build the classifier a run trains from params['model']: our ResNets, or torchvision's Inception-V3 and
MobileNetV2 (never pretrained: nothing is downloaded), all initialised by the same scheme."""
from __future__ import annotations

from torch import nn

from ..tricks.zero_gamma import apply_zero_gamma
from .plain_cnn import plain_cnn
from .resnet import ResNet, init_weights

ARCHS = ("resnet", "inception_v3", "mobilenet_v2", "plain_cnn")


def build_model(model_cfg: dict, num_classes: int) -> nn.Module:
    """params['model'] (arch, depth, variant, width, stem_stride, init, zero_gamma) -> an initialised nn.Module.

    depth, variant and stem_stride apply to ResNet only; plain_cnn is the reference of `models/plain_cnn.py`; width scales ResNet's channels and is MobileNetV2's
    `width_mult`; Inception-V3 has no width multiplier, so it takes width 1 only.
    """
    arch = model_cfg["arch"]
    if arch == "resnet":
        model: nn.Module = ResNet(
            model_cfg["depth"], model_cfg["variant"], model_cfg["width"], num_classes, model_cfg["init"],
            stem_stride=model_cfg["stem_stride"],
        )
    elif arch == "inception_v3":
        from torchvision.models import inception_v3  # torchvision.models costs ~2 s of imports per job

        if model_cfg["width"] != 1.0:
            raise ValueError(
                f"model.width is {model_cfg['width']} but inception_v3 has no width multiplier; "
                "set model.width: 1.0 for this architecture"
            )
        model = inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=False)
        init_weights(model, model_cfg["init"])
    elif arch == "plain_cnn":
        model = plain_cnn(model_cfg["width"], num_classes)
        init_weights(model, model_cfg["init"])
    elif arch == "mobilenet_v2":
        from torchvision.models import mobilenet_v2

        model = mobilenet_v2(weights=None, num_classes=num_classes, width_mult=model_cfg["width"])
        init_weights(model, model_cfg["init"])
    else:
        raise ValueError(f"model.arch {arch!r} is not one of {list(ARCHS)}")
    if model_cfg["zero_gamma"]:
        apply_zero_gamma(model)
    return model
