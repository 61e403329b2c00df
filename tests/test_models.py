"""ResNet variants A-D against the paper's definitions and the published parameter counts; build_model."""
import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from pipeline_src.models import build_model
from pipeline_src.models.resnet import DEPTHS, ResNet, scale_channels


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_resnet(depth: int, variant: str, width: float = 1.0) -> ResNet:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return ResNet(depth, variant, width, 1000, "xavier")


def cfg(**kw) -> dict:
    base = {"arch": "resnet", "depth": 26, "variant": "A", "width": 0.125, "stem_stride": 4, "init": "xavier"}
    return {**base, "zero_gamma": False, **kw}


@pytest.mark.parametrize(
    "depth, variant, expected",
    [
        (50, "A", 25_557_032),
        (50, "B", 25_557_032),
        (50, "C", 25_576_264),
        (50, "D", 25_576_264),
        (152, "A", 60_192_808),
        (152, "D", 60_212_040),
    ],
)
def test_published_parameter_counts(depth, variant, expected):
    assert n_params(meta_resnet(depth, variant)) == expected


def test_width_multiplier_scales_channels_and_counts():
    assert [scale_channels(c, 1.0) for c in (32, 64, 128, 256, 512)] == [32, 64, 128, 256, 512]
    assert [scale_channels(c, 0.25) for c in (64, 128, 256, 512)] == [16, 32, 64, 128]
    assert scale_channels(64, 0.0625) == 8  # never below 8 channels
    assert scale_channels(64, 0.3) == 24  # 19.2 -> 16 would lose more than 10 %, so 24
    quarter = meta_resnet(50, "D", 0.25)
    assert quarter.stage_channels == {"stem": 16, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert [m.out_channels for m in quarter.stem if isinstance(m, nn.Conv2d)] == [8, 8, 16]
    counts = [n_params(meta_resnet(50, "D", w)) for w in (0.25, 0.5, 1.0, 2.0)]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert counts[2] == 25_576_264


@pytest.mark.parametrize(
    "depth, variant",
    [(d, v) for d in (26, 50) for v in "ABCD"] + [(101, "A"), (152, "D")],
)
@torch.no_grad()
def test_forward_shapes(depth, variant):
    model = ResNet(depth, variant, 0.0625, 7, "xavier").eval()
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, model.num_features, 2, 2)  # output stride 32
    assert model.fc(torch.flatten(model.avgpool(feats), 1)).shape == (2, 7)
    assert len(model.layer3) == DEPTHS[depth][2]


def test_stride_position_a_vs_b():
    a, b = meta_resnet(50, "A"), meta_resnet(50, "B")
    for layer in ("layer2", "layer3", "layer4"):
        first_a, first_b = getattr(a, layer)[0], getattr(b, layer)[0]
        assert first_a.conv1.stride == (2, 2) and first_a.conv2.stride == (1, 1)
        assert first_b.conv1.stride == (1, 1) and first_b.conv2.stride == (2, 2)
        assert first_a.downsample.conv.stride == (2, 2) == first_b.downsample.conv.stride
    # layer1 never downsamples, and non-first blocks never stride
    for model in (a, b):
        assert all(c.stride == (1, 1) for c in model.layer1.modules() if isinstance(c, nn.Conv2d))
        assert all(blk.conv1.stride == blk.conv2.stride == (1, 1) for blk in model.layer2[1:])


def test_stem_composition():
    for variant in ("A", "B"):
        convs = [m for m in meta_resnet(50, variant).stem if isinstance(m, nn.Conv2d)]
        assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((7, 7), (2, 2), 64)]
    for variant in ("C", "D"):
        stem = meta_resnet(50, variant).stem
        convs = [m for m in stem if isinstance(m, nn.Conv2d)]
        assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [
            ((3, 3), (2, 2), 32),
            ((3, 3), (1, 1), 32),
            ((3, 3), (1, 1), 64),
        ]
        assert sum(isinstance(m, nn.BatchNorm2d) for m in stem) == 3
        assert isinstance(stem[-1], nn.MaxPool2d) and stem[-1].stride == 2
    # C keeps B's blocks
    c = meta_resnet(50, "C")
    assert c.layer2[0].conv2.stride == (2, 2) and not hasattr(c.layer2[0].downsample, "pool")


def test_d_shortcut_is_avgpool_then_stride1_conv():
    d = meta_resnet(50, "D")
    for layer in ("layer2", "layer3", "layer4"):
        block = getattr(d, layer)[0]
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)  # B's stride position
        pool, conv, bn = block.downsample
        assert isinstance(pool, nn.AvgPool2d)
        assert (pool.kernel_size, pool.stride, pool.ceil_mode, pool.count_include_pad) == (2, 2, True, False)
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and isinstance(bn, nn.BatchNorm2d)
    # layer1's projection does not downsample, so it has no pool
    assert not hasattr(d.layer1[0].downsample, "pool") and d.layer1[0].downsample.conv.stride == (1, 1)
    # odd sizes: ceil_mode keeps the shortcut the same size as the strided 3x3 path
    small = ResNet(26, "D", 0.0625, 3, "xavier")
    assert small(torch.randn(2, 3, 50, 50)).shape == (2, 3)


def test_dilation_gives_output_stride_8():
    model = ResNet(50, "D", 0.0625, 5, "xavier", replace_stride_with_dilation=(False, True, True))
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape[-2:] == (8, 8)
    assert [blk.conv2.dilation for blk in model.layer3] == [(1, 1)] + [(2, 2)] * 5
    assert [blk.conv2.dilation for blk in model.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert model.layer4[0].conv2.stride == (1, 1) and not hasattr(model.layer4[0].downsample, "pool")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_trunk_wraps_into_torchvision_fpn():
    model = ResNet(26, "D", 0.0625, 5, "xavier")
    layers = ["layer1", "layer2", "layer3", "layer4"]
    fpn = BackboneWithFPN(
        model,
        return_layers={name: str(i) for i, name in enumerate(layers)},
        in_channels_list=[model.stage_channels[name] for name in layers],
        out_channels=16,
    )
    out = fpn(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape) for k, v in out.items() if k != "pool"] == [
        (1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2)
    ]


def _conv_fc_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_xavier_init_bound_and_std():
    torch.manual_seed(0)
    model = ResNet(26, "D", 0.25, 10, "xavier")
    normalised = []
    for w in _conv_fc_weights(model):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound
        normalised.append((w / bound).flatten())
    pooled = torch.cat(normalised)  # U[-1, 1] if every layer is Xavier-uniform
    assert abs(pooled.std().item() - 1 / math.sqrt(3)) < 0.01
    assert abs(pooled.mean().item()) < 0.01
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)


def test_kaiming_init_option():
    torch.manual_seed(0)
    model = ResNet(26, "B", 0.25, 10, "kaiming")
    conv = model.layer3[1].conv2  # 64 -> 64, 3x3: fan_out = 576
    assert abs(conv.weight.std().item() - math.sqrt(2.0 / 576)) < 0.005
    assert abs(model.fc.weight.std().item() - 0.01) < 0.001


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="depth 34"):
        ResNet(34, "A", 1.0, 10, "xavier")
    with pytest.raises(ValueError, match="variant 'E'"):
        ResNet(50, "E", 1.0, 10, "xavier")
    with pytest.raises(ValueError, match="init scheme 'he'"):
        ResNet(26, "A", 0.0625, 10, "he")
    with pytest.raises(ValueError, match="model.arch 'vgg'"):
        build_model(cfg(arch="vgg"), 10)
    with pytest.raises(ValueError, match="inception_v3 has no width multiplier"):
        build_model(cfg(arch="inception_v3", width=0.5), 10)
    with pytest.raises(ValueError, match="no residual blocks"):
        build_model(cfg(arch="inception_v3", width=1.0, zero_gamma=True), 10)


def test_build_model_resnet_follows_config():
    model = build_model(cfg(depth=50, variant="D", zero_gamma=True), 12)
    assert isinstance(model, ResNet) and model.variant == "D" and model.fc.out_features == 12
    assert len(model.layer3) == 6 and model.stage_channels["layer4"] == scale_channels(512, 0.125) * 4
    assert all(torch.all(blk.bn3.weight == 0) for layer in (model.layer1, model.layer4) for blk in layer)
    assert torch.all(model.layer1[0].bn2.weight == 1)


def test_build_inception_v3():
    torch.manual_seed(0)
    model = build_model(cfg(arch="inception_v3", width=1.0), 7)
    assert model.AuxLogits is None and model.fc.out_features == 7
    fc_bound = math.sqrt(6.0 / (model.fc.in_features + 7))
    assert model.fc.weight.abs().max() <= fc_bound and model.fc.weight.abs().max() > 0.9 * fc_bound
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 7)


def test_build_mobilenet_v2_with_width_and_zero_gamma():
    torch.manual_seed(0)
    model = build_model(cfg(arch="mobilenet_v2", width=0.5, zero_gamma=True), 9)
    assert model.classifier[-1].out_features == 9
    assert model.features[0][0].out_channels == 16  # 32 * 0.5
    w = model.features[1].conv[0][0].weight  # a Xavier-initialised conv
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    assert w.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out))
    residual = [blk for blk in model.features if getattr(blk, "use_res_connect", False)]
    assert residual and all(torch.all(blk.conv[-1].weight == 0) for blk in residual)
    model.train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 9)


@pytest.mark.parametrize("variant", "AD")
@pytest.mark.parametrize("stem_stride, layer4_side", [(4, 1), (2, 2), (1, 4)])
@torch.no_grad()
def test_stem_stride_sets_the_feature_map_sizes_and_keeps_the_weights(variant, stem_stride, layer4_side):
    model = ResNet(26, variant, 0.0625, 5, "xavier", stem_stride=stem_stride).eval()
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == layer4_side
    assert hasattr(model.stem, "pool") == (stem_stride == 4)
    paper = ResNet(26, variant, 0.0625, 5, "xavier")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in paper.state_dict().items()}


def test_stem_stride_outside_the_choices_is_refused():
    with pytest.raises(ValueError, match="stem_stride 3"):
        ResNet(26, "A", 0.0625, 5, "xavier", stem_stride=3)


def test_plain_cnn_reference_keeps_every_pixel_and_has_no_residual_block():
    model = build_model(cfg(arch="plain_cnn", width=0.25), 10).eval()
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == [32, 64, 128, 256]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    model(images).sum().backward()
    assert (images.grad.abs().amax(dim=1) > 0).all()  # no strided conv drops a pixel
    with pytest.raises(ValueError, match="no residual blocks"):
        build_model(cfg(arch="plain_cnn", zero_gamma=True), 10)
