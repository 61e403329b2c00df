"""A plain CNN, the reference a ResNet of the same budget should reach on a small dataset.

Four 3x3 conv-BN-ReLU stages, each but the last followed by a 2x2 max pool, then a global average
pool and a linear classifier (a VGG-style net with one conv per stage). It has no shortcut and no
strided conv, so on a small input every pixel keeps reaching the classifier: trained with a run's
recipe (`--set model.arch=plain_cnn`) it tells whether that run's ResNet learns what the data allows.
"""
from __future__ import annotations

from torch import nn

from .resnet import scale_channels

STAGE_CHANNELS = (128, 256, 512, 1024)  # at width 0.25: 32, 64, 128, 256


def plain_cnn(width: float, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for i, channels in enumerate(STAGE_CHANNELS):
        out_ch = scale_channels(channels, width)
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
        if i < len(STAGE_CHANNELS) - 1:
            layers.append(nn.MaxPool2d(2))
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)]
    return nn.Sequential(*layers)
