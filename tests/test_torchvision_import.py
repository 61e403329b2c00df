"""Teacher import from torchvision ResNet state dicts: the key mapping gives identical logits."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.models import resnet18, resnet50, resnet152

from pipeline_src import params as params_mod
from pipeline_src.loader import make_val_loader
from pipeline_src.models.resnet import ResNet
from pipeline_src.models.torchvision_resnet import TorchvisionFormatError, convert, is_torchvision_resnet
from pipeline_src.run_folders import output_dir
from pipeline_src.teacher import main as teacher_main
from pipeline_src.engine import betons_dir, evaluate


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """torchvision's init leaves BN at gamma 1, beta 0, mean 0, var 1: randomise so a swap would show."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if t is m.weight.data else 0.0))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("factory,depth", [(resnet50, 50), (resnet152, 152)])
def test_torchvision_resnet_maps_onto_resnet_b_with_identical_logits(factory, depth):
    torch.manual_seed(0)
    theirs = _randomised(factory(weights=None, num_classes=10))
    state, model_cfg, classes = convert(theirs.state_dict())
    assert model_cfg == {"arch": "resnet", "depth": depth, "variant": "B", "width": 1.0} and classes == 10
    ours = ResNet(depth, "B", 1.0, classes, "kaiming").eval()
    ours.load_state_dict(state)  # strict: every key mapped, none left over
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_basic_block_resnets_are_refused_by_name():
    state = resnet18(weights=None).state_dict()
    assert is_torchvision_resnet(state)
    with pytest.raises(TorchvisionFormatError, match="resnet18/34"):
        convert(state)


def test_teacher_stage_imports_a_torchvision_file(micro, tmp_path, capsys):
    sets = [f"paths.runs={tmp_path / 'runs'}", "model.depth=50", "model.variant=B", "model.width=1.0"]
    params = params_mod.resolve_run(params_mod.load(micro, sets), "teacher")
    wnids = json.loads((betons_dir(params) / "classes.json").read_text())["wnids"]
    torch.manual_seed(0)
    theirs = _randomised(resnet50(weights=None, num_classes=len(wnids)))
    source = tmp_path / "resnet50.pth"
    torch.save(theirs.state_dict(), source)
    argv = ["--params", str(micro), "--seed", "11", "--set", f"teacher.checkpoint={source}"]
    assert teacher_main(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert "torchvision ResNet-50 state dict" in capsys.readouterr().out
    metrics = json.loads((output_dir(params, "teacher", 11) / "metrics.json").read_text())
    val = make_val_loader(betons_dir(params) / "val.beton", params, params["train"]["batch_size"], torch.device("cpu"))
    expected = evaluate(theirs, val, params, torch.device("cpu"), "fp32", len(wnids))
    assert metrics["top1"] == pytest.approx(expected["top1"]) and metrics["val_loss"] == pytest.approx(expected["val_loss"])


def test_unknown_teacher_format_is_a_clear_error(micro, tmp_path, capsys):
    source = tmp_path / "odd.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, source)
    argv = ["--params", str(micro), "--set", f"paths.runs={tmp_path / 'runs'}", "--set", f"teacher.checkpoint={source}"]
    assert teacher_main(argv) == 2
    err = capsys.readouterr().err
    assert str(source) in err and "unknown teacher format" in err and "torchvision/timm resnet50/101/152" in err
    assert not (tmp_path / "runs").exists()
