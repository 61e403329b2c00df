"""After training: scoring a checkpoint on a beton or a val folder, and TorchScript / ONNX exports."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from pipeline_src import params as params_mod
from pipeline_src.evaluate import ValFolder, main as evaluate_main
from pipeline_src.export import load_model, main as export_main
from pipeline_src.loader import make_val_loader
from pipeline_src.engine import betons_dir
from pipeline_src.train import main as train_main


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory) -> Path:
    """A baseline trained for the micro profile's 2 epochs (fp32), in a folder of its own."""
    out = tmp_path_factory.mktemp("evaluate") / "baseline"
    assert train_main(["--params", str(micro), "--run", "baseline", "--out", str(out)]) == 0
    return out


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_beton_scores_equal_the_trainings_final_evaluation(micro, trained, tmp_path, capsys):
    beton = betons_dir(params_mod.load(micro)) / "val.beton"
    argv = ["--params", str(micro), "--checkpoint", str(trained / "model.pt"), "--data", str(beton),
            "--out", str(tmp_path / "scores.json")]
    assert evaluate_main(argv) == 0
    scores = _last_json(capsys)
    final = json.loads((trained / "metrics.json").read_text())
    assert final["precision"] == "fp32"
    assert (scores["top1"], scores["top5"]) == (final["top1"], final["top5"])
    assert scores["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert json.loads((tmp_path / "scores.json").read_text()) == scores


def test_val_folder_sees_the_betons_images_through_the_same_box(micro, trained, capsys):
    """Same images, labels and order as the val beton; pixels differ only by the beton's JPEG
    re-encoding and OpenCV's vs PIL's area resize (a wrong box or normalization differs by ~1)."""
    params = params_mod.resolve_run(params_mod.load(micro), "baseline")
    _, meta = load_model(trained / "model.pt")
    folder = Path(params["paths"]["data"]) / "synthetic" / "imagenet" / "val"
    dataset = ValFolder(folder, meta["wnids"], params)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    batches = list(make_val_loader(betons_dir(params) / "val.beton", params, 64, torch.device("cpu")))
    assert torch.equal(labels, torch.cat([y for _, y in batches]))
    assert (images - torch.cat([x for x, _ in batches]).float()).abs().mean() < 0.15

    assert evaluate_main(["--params", str(micro), "--checkpoint", str(trained / "model.pt"), "--data", str(folder)]) == 0
    scores = _last_json(capsys)
    final = json.loads((trained / "metrics.json").read_text())
    assert scores["val_loss"] == pytest.approx(final["val_loss"], abs=0.05)


def test_a_folder_of_other_classes_is_refused(micro, trained, tmp_path, capsys):
    (tmp_path / "n99999999").mkdir()
    argv = ["--params", str(micro), "--checkpoint", str(trained / "model.pt"), "--data", str(tmp_path)]
    assert evaluate_main(argv) == 2
    assert "n99999999" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_gives_the_same_logits(micro, trained, tmp_path, fmt, capsys):
    out = tmp_path / f"model.{fmt}"
    argv = ["--params", str(micro), "--checkpoint", str(trained / "model.pt"), "--format", fmt, "--out", str(out)]
    # Both exporters parse Python source with `ast`; on CPython 3.11.7 a finalizer failing during a
    # parse breaks it ("AST constructor recursion depth mismatch"), and the numba dispatchers that
    # earlier loader tests left behind have such finalizers: collect them first, pause the collector.
    gc.collect()
    gc.disable()
    try:
        assert export_main(argv) == 0
    finally:
        gc.enable()
    report = _last_json(capsys)
    res = params_mod.load(micro)["loader"]["val_res"]
    assert report["res"] == res and report["max_abs_logit_diff"] <= 1e-4
    model, _ = load_model(trained / "model.pt")
    x = torch.randn(5, 3, res, res)
    with torch.no_grad():
        expected = model(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(out))(x)
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
