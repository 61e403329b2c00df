"""Zero gamma (section 3.1): every residual block starts as the identity, so the net starts shallower.

gamma = 0 in the last BN of each residual branch makes the block output its shortcut at first.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def residual_last_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BN of each residual branch in `model`, one per residual block.

    Bottleneck blocks (ours and torchvision's) are the modules with a `downsample` attribute and a
    `bn3` BN; MobileNetV2's InvertedResidual counts when it has its shortcut (`use_res_connect`), its
    last BN being the last one of its `conv` branch.
    """
    # A model holding InvertedResidual blocks was built by torchvision, which imported their module;
    # importing it here would cost every ResNet job ~2 s (torchvision.models pulls in torch._dynamo).
    mobilenetv2 = sys.modules.get("torchvision.models.mobilenetv2")
    inverted = mobilenetv2.InvertedResidual if mobilenetv2 is not None else ()
    found = []
    for module in model.modules():
        if isinstance(module, inverted):
            if module.use_res_connect:
                found.append([m for m in module.conv.modules() if isinstance(m, nn.BatchNorm2d)][-1])
        elif hasattr(module, "downsample") and isinstance(getattr(module, "bn3", None), nn.BatchNorm2d):
            found.append(module.bn3)
    return found


@torch.no_grad()
def apply_zero_gamma(model: nn.Module) -> int:
    """Set gamma = 0 in the last BN of every residual block; returns how many were set."""
    bns = residual_last_bns(model)
    if not bns:
        raise ValueError(
            f"zero gamma: {type(model).__name__} has no residual blocks (this trick applies to ResNet "
            "and MobileNetV2); set model.zero_gamma: false for this architecture"
        )
    for bn in bns:
        bn.weight.zero_()
    return len(bns)
