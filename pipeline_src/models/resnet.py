"""Bottleneck ResNets with the paper's variants A-D (section 4, figure 2), a width multiplier and dilation.

Variants, as He et al. (2019) define them:
  A  the original ResNet: a downsampling block strides in its first 1x1 conv, stem = 7x7 conv + maxpool.
  B  the stride moves to the 3x3 conv (torchvision's and timm's `resnet50` are ResNet-B).
  C  B's blocks, stem = three 3x3 convs (32, 32, 64 channels, the first with stride 2) + maxpool.
  D  C, plus the shortcut of a downsampling block is a 2x2 average pool (stride 2) and a stride-1 1x1 conv.

`stem_stride` is the stem's total downsampling: 4 is the paper's (a stride-2 conv, then a stride-2 max
pool), 2 drops the max pool, 1 also the conv's stride. Small inputs need less: at 32 px the paper's
stem leaves layer4 at 1x1, where a global average pool has nothing to pool and the strided 1x1
shortcuts of A-C keep one pixel in 64 of layer1's map.

Stages are named children `stem, layer1..layer4, avgpool, fc` in forward order, so torchvision's
`IntermediateLayerGetter` / `BackboneWithFPN` can wrap the trunk; `stage_channels` gives their widths.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
VARIANTS = ("A", "B", "C", "D")
INITS = ("xavier", "kaiming")
EXPANSION = 4
STEM_STRIDES = (1, 2, 4)
STEM_WIDTH = 64
STAGE_PLANES = (64, 128, 256, 512)
DEEP_STEM = (32, 32, 64)
CHANNEL_DIVISOR = 8  # scaled widths are multiples of 8: the vector width CPU/GPU kernels like


def scale_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to a multiple of 8 (at least 8, never below 90 % of the exact value).

    Width 1 keeps the published widths exactly, since they are all multiples of 8.
    """
    exact = channels * width
    rounded = max(CHANNEL_DIVISOR, int(exact + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if rounded < 0.9 * exact:
        rounded += CHANNEL_DIVISOR
    return rounded


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel - 1) // 2
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a shortcut; `bn3` is the last BN of the residual branch (zero gamma)."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        dilation: int,
        stride_in_1x1: bool,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = _conv_bn(in_channels, planes, 1, stride=stride_1x1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride=stride_3x3, dilation=dilation)
        self.conv3, self.bn3 = _conv_bn(planes, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample  # None: the identity shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _shortcut(in_ch: int, out_ch: int, stride: int, avg_down: bool) -> nn.Sequential:
    """Projection shortcut: a strided 1x1 conv (A-C), or for D a 2x2 average pool then a stride-1 1x1 conv.

    D pools only when the block really downsamples; with stride 1 (layer1, or a stage whose stride was
    replaced by dilation) the shortcut is the plain 1x1 conv.
    """
    layers: list[tuple[str, nn.Module]] = []
    if avg_down and stride > 1:
        layers.append(("pool", nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)))
        stride = 1
    conv, bn = _conv_bn(in_ch, out_ch, 1, stride=stride)
    layers += [("conv", conv), ("bn", bn)]
    return nn.Sequential(OrderedDict(layers))


def _stem(variant: str, width: float, stem_stride: int) -> tuple[nn.Sequential, int]:
    layers: list[tuple[str, nn.Module]] = []
    conv_stride = 1 if stem_stride == 1 else 2
    if variant in ("C", "D"):
        in_ch = 3
        for i, channels in enumerate(DEEP_STEM, start=1):
            out_ch = scale_channels(channels, width)
            conv, bn = _conv_bn(in_ch, out_ch, 3, stride=conv_stride if i == 1 else 1)
            layers += [(f"conv{i}", conv), (f"bn{i}", bn), (f"relu{i}", nn.ReLU(inplace=True))]
            in_ch = out_ch
    else:
        out_ch = scale_channels(STEM_WIDTH, width)
        layers += [
            ("conv1", nn.Conv2d(3, out_ch, 7, stride=conv_stride, padding=3, bias=False)),
            ("bn1", nn.BatchNorm2d(out_ch)),
            ("relu1", nn.ReLU(inplace=True)),
        ]
    if stem_stride == 4:
        layers.append(("pool", nn.MaxPool2d(3, stride=2, padding=1)))
    return nn.Sequential(OrderedDict(layers)), out_ch


class ResNet(nn.Module):
    """A bottleneck ResNet of depth 26/50/101/152, variant A/B/C/D, channels scaled by `width`.

    `replace_stride_with_dilation` (one flag for each of layer2..layer4) keeps those stages at the
    previous resolution and dilates their 3x3 convs instead, as torchvision does: (False, True, True)
    gives output stride 8 for FCN.
    """

    def __init__(
        self,
        depth: int,
        variant: str,
        width: float,
        num_classes: int,
        init: str,
        replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
        stem_stride: int = 4,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not supported; choose one of {sorted(DEPTHS)}")
        if variant not in VARIANTS:
            raise ValueError(f"ResNet variant {variant!r} is not one of {list(VARIANTS)}")
        if width <= 0:
            raise ValueError(f"ResNet width multiplier must be > 0, got {width}")
        if stem_stride not in STEM_STRIDES:
            raise ValueError(f"ResNet stem_stride {stem_stride} is not one of {list(STEM_STRIDES)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs 3 flags, one for each of layer2..layer4")
        self.depth, self.variant, self.width = depth, variant, width
        self.stem, in_ch = _stem(variant, width, stem_stride)
        self.stage_channels: dict[str, int] = {"stem": in_ch}
        dilation = 1
        for i, (blocks, base_planes) in enumerate(zip(DEPTHS[depth], STAGE_PLANES), start=1):
            stride = 1 if i == 1 else 2
            previous_dilation = dilation
            if i > 1 and replace_stride_with_dilation[i - 2]:
                dilation *= stride
                stride = 1
            planes = scale_channels(base_planes, width)
            layer = self._make_layer(in_ch, planes, blocks, stride, previous_dilation, dilation)
            in_ch = planes * EXPANSION
            self.add_module(f"layer{i}", layer)
            self.stage_channels[f"layer{i}"] = in_ch
        self.num_features = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self, init)

    def _make_layer(
        self, in_ch: int, planes: int, blocks: int, stride: int, first_dilation: int, dilation: int
    ) -> nn.Sequential:
        out_ch = planes * EXPANSION
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = _shortcut(in_ch, out_ch, stride, avg_down=self.variant == "D")
        stride_in_1x1 = self.variant == "A"
        layers = [Bottleneck(in_ch, planes, stride, first_dilation, stride_in_1x1, downsample)]
        layers += [Bottleneck(out_ch, planes, 1, dilation, stride_in_1x1, None) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk: the last feature map (N, num_features, H/s, W/s), s = 8 * stem_stride, before pooling."""
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise every conv, linear and BN layer of `model` (any architecture).

    xavier (the paper, section 2): conv and FC weights ~ U[-a, a], a = sqrt(6 / (d_in + d_out)), where
      d_in/d_out count the kernel's receptive field as well (torch's `xavier_uniform_`, MXNet's
      `Xavier(rnd_type='uniform', factor_type='avg', magnitude=3)` of the reference code).
    kaiming: conv ~ N(0, 2 / fan_out) (He et al. 2015), FC ~ N(0, 0.01^2), as torchvision's MobileNetV2.
    Both: biases 0, BN gamma 1 and beta 0. Zero gamma is a separate trick (tricks/zero_gamma.py).
    """
    if scheme not in INITS:
        raise ValueError(f"init scheme {scheme!r} is not one of {list(INITS)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

