"""torchvision (and timm) `resnet50/101/152` state dicts -> our ResNet-B's parameter names.

torchvision's bottleneck ResNet strides in the 3x3 conv and has the 7x7 stem: the paper's ResNet-B
at width 1. timm's plain `resnet50/101/152` use the same names. Only the stem and the projection
shortcut are named differently:

    conv1.*, bn1.*                      -> stem.conv1.*, stem.bn1.*
    layerS.B.downsample.0.* / .1.*      -> layerS.B.downsample.conv.* / .bn.*
    layerS.B.{conv,bn}{1,2,3}.*, fc.*   -> unchanged
"""
from __future__ import annotations

import re

import torch

from .resnet import DEPTHS, EXPANSION, STAGE_PLANES, STEM_WIDTH

_RENAMES = (
    (re.compile(r"^(conv1|bn1)\."), r"stem.\1."),
    (re.compile(r"^(layer\d+\.\d+\.downsample)\.0\."), r"\1.conv."),
    (re.compile(r"^(layer\d+\.\d+\.downsample)\.1\."), r"\1.bn."),
)
_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")


class TorchvisionFormatError(ValueError):
    """A state dict that looks like torchvision's ResNet but is not one we can map."""


def is_torchvision_resnet(state: object) -> bool:
    """A bare mapping of tensors with torchvision's ResNet stem and head names."""
    return (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
            and {"conv1.weight", "bn1.weight", "fc.weight", "layer1.0.conv1.weight"} <= set(state))


def _depth(state: dict) -> int:
    blocks = [0, 0, 0, 0]
    for key in state:
        match = _BLOCK.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage - 1] = max(blocks[stage - 1], block + 1)
    for depth, layout in DEPTHS.items():
        if tuple(blocks) == layout and depth != 26:  # torchvision has no bottleneck ResNet-26
            return depth
    raise TorchvisionFormatError(
        f"blocks per stage {blocks} are none of torchvision's bottleneck ResNets "
        f"(50: {DEPTHS[50]}, 101: {DEPTHS[101]}, 152: {DEPTHS[152]}); resnet18/34 (basic blocks) are not supported"
    )


def _check_widths(state: dict) -> None:
    """Width 1 only: wide_resnet*/resnext* have other inner widths than ResNet-B's."""
    if state["conv1.weight"].shape[0] != STEM_WIDTH:
        raise TorchvisionFormatError(f"stem has {state['conv1.weight'].shape[0]} channels, not {STEM_WIDTH}")
    for stage, planes in enumerate(STAGE_PLANES, start=1):
        got = tuple(state[f"layer{stage}.0.conv2.weight"].shape[:2])
        if got != (planes, planes):
            raise TorchvisionFormatError(
                f"layer{stage}'s 3x3 conv is {got[1]} -> {got[0]} channels, not {planes} -> {planes}: "
                "a wide_resnet or resnext (grouped / wider 3x3), which has no ResNet-B equivalent here"
            )
        if state[f"layer{stage}.0.conv3.weight"].shape[0] != planes * EXPANSION:
            raise TorchvisionFormatError(f"layer{stage} does not expand its output by {EXPANSION}")


def convert(state: dict) -> tuple[dict, dict, int]:
    """(our state dict, the model params it fits, its class count) of a torchvision ResNet state dict."""
    depth = _depth(state)
    _check_widths(state)
    ours = {}
    for key, value in state.items():
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        ours[key] = value
    model = {"arch": "resnet", "depth": depth, "variant": "B", "width": 1.0}
    return ours, model, int(state["fc.weight"].shape[0])
