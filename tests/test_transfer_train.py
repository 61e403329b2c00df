"""Transfer stages: backbone loading, Faster-RCNN and FCN structure, and both stages end to end on a
tiny embedded VOC / ADE20K with a tiny backbone checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline_src import checkpoint, params as params_mod, synthetic
from pipeline_src.models import build_model
from pipeline_src.transfer import ade20k, backbone as backbone_mod, detection, segmentation
from pipeline_src.transfer import train_detection, train_segmentation

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "t5-resnet-d"
CLASSES = 3


def _sets(root: Path) -> list[str]:
    return [
        f"paths.data={root / 'data'}", f"paths.runs={root / 'runs'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"synthetic.classes={CLASSES}", "synthetic.voc_trainval=4", "synthetic.voc_test=4",
        "synthetic.ade_train=4", "synthetic.ade_val=3", "synthetic.scene_size=[64, 80]",
        "transfer.detection.epochs=2", "transfer.detection.batch_size=4", "transfer.detection.lr_milestones=[1]",
        "transfer.detection.min_size=64", "transfer.detection.max_size=96",
        "transfer.segmentation.epochs=2", "transfer.segmentation.batch_size=2",
        "transfer.segmentation.base_size=64", "transfer.segmentation.crop_size=48",
        "transfer.segmentation.aux_loss=true",
    ]


def _save_backbone(path: Path, model_cfg: dict, num_classes: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_cfg, num_classes)
    checkpoint.save_final_model(path, model.state_dict(), {
        "run": BACKBONE, "seed": 0, "model": model_cfg, "num_classes": num_classes,
        "wnids": synthetic.wnids(num_classes),
    })
    return model.state_dict()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Params pointing at a tmp tree with tiny embedded VOC and ADE20K and a backbone checkpoint."""
    root = tmp_path_factory.mktemp("transfer")
    sets = _sets(root)
    params = params_mod.load(REPO / "params.yaml", sets)
    synthetic.generate_voc(root / "data" / "synthetic", params["synthetic"])
    synthetic.generate_ade20k(root / "data" / "synthetic", params["synthetic"])
    model_cfg = params_mod.resolve_run(params, BACKBONE)["model"]
    state = _save_backbone(backbone_mod.checkpoint_path(params, BACKBONE, 0), model_cfg, CLASSES)
    (backbone_mod.checkpoint_path(params, BACKBONE, 0).with_name("metrics.json")).write_text('{"top1": 42.5}')
    return {"root": root, "sets": sets, "params": params, "model_cfg": model_cfg, "state": state}


def test_load_backbone_keeps_the_checkpoint_weights(env):
    path = backbone_mod.checkpoint_path(env["params"], BACKBONE, 0)
    trunk, meta = backbone_mod.load_backbone(path, env["model_cfg"])
    assert meta["model"] == env["model_cfg"] and meta["num_classes"] == CLASSES
    assert isinstance(trunk.fc, nn.Identity)
    got = trunk.state_dict()
    expected = {k: v for k, v in env["state"].items() if not k.startswith("fc.")}
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    # dilation changes strides, not weights
    dilated, _ = backbone_mod.load_backbone(path, env["model_cfg"], backbone_mod.DILATION[8])
    assert all(torch.equal(dilated.state_dict()[k], v) for k, v in expected.items())
    # a task's stem_stride changes the stem's downsampling, not its weights, and the meta says which
    assert env["model_cfg"]["stem_stride"] != 4
    strided, strided_meta = backbone_mod.load_backbone(path, env["model_cfg"], stem_stride=4)
    assert strided_meta["model"] == {**env["model_cfg"], "stem_stride": 4} and hasattr(strided.stem, "pool")
    assert all(torch.equal(strided.state_dict()[k], v) for k, v in expected.items())


def test_load_backbone_refuses_another_architecture(env, tmp_path):
    path = backbone_mod.checkpoint_path(env["params"], BACKBONE, 0)
    width = env["model_cfg"]["width"]
    with pytest.raises(backbone_mod.TransferError, match=rf"{path}.*width: checkpoint {width}, params 0.5.*stale"):
        backbone_mod.load_backbone(path, {**env["model_cfg"], "width": 0.5})
    with pytest.raises(backbone_mod.TransferError, match=r"variant: checkpoint 'D', params 'B'"):
        backbone_mod.load_backbone(path, {**env["model_cfg"], "variant": "B"})

    # weights of a wider network under a meta that claims width 0.25
    wrong = tmp_path / "wrong.pt"
    wide = build_model({**env["model_cfg"], "width": 0.5}, CLASSES)
    checkpoint.save_final_model(wrong, wide.state_dict(), {
        "model": env["model_cfg"], "num_classes": CLASSES, "wnids": synthetic.wnids(CLASSES)})
    with pytest.raises(backbone_mod.TransferError, match=rf"{wrong}: the weights do not fit the ResNet.*size mismatch"):
        backbone_mod.load_backbone(wrong)

    other = tmp_path / "mobilenet.pt"
    mobile_cfg = {**env["model_cfg"], "arch": "mobilenet_v2"}
    _save_backbone(other, mobile_cfg, CLASSES)
    with pytest.raises(backbone_mod.TransferError, match=rf"{other}: a mobilenet_v2 checkpoint.*ResNet backbone"):
        backbone_mod.load_backbone(other)


def test_check_backbone_run_names_the_problem(env):
    with pytest.raises(backbone_mod.TransferError, match="'no-such-run' is not a run.*transfer.backbones"):
        backbone_mod.check_backbone_run(env["params"], "no-such-run", 0)
    not_trained = r"seed7/model.pt: backbone checkpoint not found.*--run t5-resnet-d --seed 7"
    with pytest.raises(backbone_mod.TransferError, match=not_trained):
        backbone_mod.check_backbone_run(env["params"], BACKBONE, 7)
    assert backbone_mod.check_backbone_run(env["params"], BACKBONE, 0) \
        == backbone_mod.checkpoint_path(env["params"], BACKBONE, 0)


def _detector(env, style: str, **changes):
    cfg = {**env["params"]["transfer"]["detection"], "style": style, **changes}
    trunk, _ = backbone_mod.load_backbone(backbone_mod.checkpoint_path(env["params"], BACKBONE, 0),
                                          stem_stride=cfg["stem_stride"])
    mean, std = backbone_mod.normalization(env["params"], BACKBONE)
    return trunk, detection.build_faster_rcnn(trunk, CLASSES, cfg, mean, std)


def test_c4_detector_structure(env):
    trunk, model = _detector(env, "c4")
    head = model.roi_heads.box_head
    assert isinstance(head, detection.C5BoxHead) and head.layer4 is trunk.layer4
    assert "layer4" not in dict(model.backbone.named_children())
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    assert model.roi_heads.box_predictor.cls_score.in_features == trunk.stage_channels["layer4"]
    assert model.roi_heads.box_predictor.cls_score.out_features == CLASSES + 1
    # one feature map at stride 16, and stage 5 halves the 14 x 14 RoIs again
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    assert list(features) == ["0"] and features["0"].shape[-2:] == (4, 6)
    assert head(torch.zeros(2, trunk.stage_channels["layer3"], 14, 14)).shape == (2, trunk.stage_channels["layer4"])
    # BN frozen everywhere; stem and layer1 fixed, later stages trained
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(p.requires_grad for p in trunk.stem.parameters())
    assert not any(p.requires_grad for p in trunk.layer1.parameters())
    assert all(p.requires_grad for p in trunk.layer2.parameters())
    assert all(p.requires_grad for p in trunk.layer4.parameters())


def test_fpn_detector_builds_and_predicts(env):
    trunk, model = _detector(env, "fpn")
    assert isinstance(model.backbone, BackboneWithFPN)
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert {f.shape[1] for f in features.values()} == {detection.FPN_CHANNELS}
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 70, 90)])
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["labels"]) == len(out["scores"])
    with pytest.raises(ValueError, match="style must be one of"):
        _detector(env, "c5")


def test_detection_train_transform_drops_difficult_and_flips():
    image = torch.arange(2 * 10, dtype=torch.float32).reshape(1, 2, 10).expand(3, 2, 10)
    target = {"boxes": torch.tensor([[1.0, 0.0, 4.0, 2.0], [5.0, 0.0, 9.0, 1.0]]),
              "labels": torch.tensor([1, 2]), "difficult": torch.tensor([False, True])}
    flipped = kept = None
    for seed in range(20):
        transform = detection.TrainTransform(keep_difficult=False, generator=torch.Generator().manual_seed(seed))
        img, out = transform(image, target)
        assert out["labels"].tolist() == [1]
        if torch.equal(img, image.flip(-1)):
            flipped = out
        else:
            kept = out
    assert flipped is not None and kept is not None
    assert kept["boxes"].tolist() == [[1.0, 0.0, 4.0, 2.0]]
    assert flipped["boxes"].tolist() == [[6.0, 0.0, 9.0, 2.0]]
    transform = detection.TrainTransform(keep_difficult=True, generator=torch.Generator().manual_seed(0))
    assert transform(image, target)[1]["labels"].tolist() == [1, 2]


@pytest.mark.parametrize("style", ["c4", "fpn"])
def test_detector_takes_anchors_sampling_and_frozen_stages_from_params(env, style):
    cfg = env["params"]["transfer"]["detection"]
    trunk, model = _detector(env, style, frozen_stages=["stem", "layer1", "layer2"])
    sizes, ratios = tuple(cfg["anchor_sizes"]), tuple(cfg["aspect_ratios"])
    generator = model.rpn.anchor_generator
    if style == "c4":
        assert generator.sizes == (sizes,) and generator.aspect_ratios == (ratios,)
    else:
        assert generator.sizes == tuple((s,) for s in sizes) and generator.aspect_ratios == (ratios,) * 5
    rpn, roi = model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler
    assert (rpn.batch_size_per_image, rpn.positive_fraction) == \
        (cfg["rpn_batch_size_per_image"], cfg["rpn_positive_fraction"])
    assert (roi.batch_size_per_image, roi.positive_fraction) == \
        (cfg["box_batch_size_per_image"], cfg["box_positive_fraction"])
    assert model.rpn._pre_nms_top_n == {"training": cfg["rpn_pre_nms_top_n_train"],
                                        "testing": cfg["rpn_pre_nms_top_n_test"]}
    assert model.rpn._post_nms_top_n == {"training": cfg["rpn_post_nms_top_n_train"],
                                         "testing": cfg["rpn_post_nms_top_n_test"]}
    assert model.rpn.nms_thresh == cfg["rpn_nms_thresh"]
    assert (model.rpn.proposal_matcher.high_threshold, model.rpn.proposal_matcher.low_threshold) == \
        (cfg["rpn_fg_iou_thresh"], cfg["rpn_bg_iou_thresh"])
    assert (model.roi_heads.proposal_matcher.high_threshold, model.roi_heads.proposal_matcher.low_threshold) == \
        (cfg["box_fg_iou_thresh"], cfg["box_bg_iou_thresh"])
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == \
        (cfg["box_score_thresh"], cfg["box_nms_thresh"], cfg["box_detections_per_img"])
    assert model.transform.min_size == (cfg["min_size"],) and model.transform.max_size == cfg["max_size"]
    assert not any(p.requires_grad for p in trunk.layer2.parameters())
    assert all(p.requires_grad for p in trunk.layer3.parameters())


@pytest.mark.parametrize("stride", [8, 16])
def test_fcn_output_stride_and_logits_at_input_size(env, stride):
    trunk, _ = backbone_mod.load_backbone(backbone_mod.checkpoint_path(env["params"], BACKBONE, 0), None,
                                          backbone_mod.DILATION[stride],
                                          stem_stride=env["params"]["transfer"]["segmentation"]["stem_stride"])
    model = segmentation.build_fcn(trunk, CLASSES, aux_loss=True).eval()
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(x)
        out = model(x)
    assert features["out"].shape[-2:] == (64 // stride, 96 // stride)
    assert features["aux"].shape[-2:] == (64 // stride, 96 // stride)
    assert out["out"].shape == (1, CLASSES, 64, 96) and out["aux"].shape == (1, CLASSES, 64, 96)
    without_aux = segmentation.build_fcn(trunk, CLASSES, aux_loss=False).eval()
    with torch.no_grad():
        assert set(without_aux(x)) == {"out"}


def test_segmentation_transform_crops_pads_with_ignore_and_keeps_alignment():
    mask = torch.zeros(20, 30, dtype=torch.int64)
    mask[:, 15:] = 1  # right half is class 1
    image = mask.float()[None].expand(3, 20, 30).clone()
    transform = segmentation.TrainTransform(base_size=12, crop_size=40, scale_range=[0.5, 2.0], mean=[0.0] * 3,
                                            std=[1.0] * 3, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        img, out = transform(image, mask)
        assert img.shape == (3, 40, 40) and out.shape == (40, 40)
        # the rescaled scene is at most 24 px high: the rest of the crop is padding, ignored
        assert (out == ade20k.IGNORE_INDEX).any()
        labelled = out != ade20k.IGNORE_INDEX
        # image and mask stay aligned (bilinear and nearest resizing may differ on the class edge)
        agree = ((img[0][labelled] > 0.5).long() == out[labelled]).float().mean()
        assert agree > 0.9


def test_segmentation_scale_range_sets_the_rescaled_shorter_side():
    mask = torch.zeros(20, 30, dtype=torch.int64)
    image = torch.zeros(3, 20, 30)
    transform = segmentation.TrainTransform(base_size=12, crop_size=40, scale_range=[1.0, 1.0], mean=[0.0] * 3,
                                            std=[1.0] * 3, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        _, out = transform(image, mask)
        assert (out != ade20k.IGNORE_INDEX).sum() == 12 * 18  # the scene at exactly base_size, padded to 40


def test_fcn_loss_weighs_the_auxiliary_head():
    target = torch.tensor([[[0, 1], [1, ade20k.IGNORE_INDEX]]])
    outputs = {"out": torch.randn(1, CLASSES, 2, 2), "aux": torch.randn(1, CLASSES, 2, 2)}
    main = segmentation.fcn_loss({"out": outputs["out"]}, target, aux_weight=0.5)
    aux = segmentation.fcn_loss({"out": outputs["aux"]}, target, aux_weight=0.5)
    assert segmentation.fcn_loss(outputs, target, aux_weight=0.25).item() == pytest.approx((main + 0.25 * aux).item())


def _mlflow_run(env, name: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{env['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(env["params"]["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], f"tags.run = '{name}'")
    return client, runs


def test_detection_stage_end_to_end_and_skip(env, capsys):
    argv = ["--backbone", BACKBONE, "--seed", "0", "--params", str(REPO / "params.yaml")]
    for s in env["sets"]:
        argv += ["--set", s]
    assert train_detection.main(argv) == 0
    out = backbone_mod.result_dir(env["params"], "detection", BACKBONE, 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"map", "ap", "backbone", "backbone_top1", "metric", "wall_time_s"} <= set(metrics)
    assert metrics["backbone"] == BACKBONE and metrics["backbone_top1"] == 42.5 and metrics["metric"] == "voc07"
    assert set(metrics["ap"]) == set(synthetic.class_names(CLASSES))
    assert 0.0 <= metrics["map"] <= 100.0 and metrics["wall_time_s"] > 0
    state, meta = checkpoint.load_model_weights(out / "model.pt")
    assert meta["task"] == "detection" and meta["wnids"] == synthetic.class_names(CLASSES)
    assert any(k.startswith("roi_heads.box_head.layer4.") for k in state)

    client, runs = _mlflow_run(env, f"transfer-detection/{BACKBONE}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["map"] == pytest.approx(metrics["map"])
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1]

    stamp = (out / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert train_detection.main(argv) == 0
    assert "already finished with these params, skipping" in capsys.readouterr().out
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    assert len(_mlflow_run(env, f"transfer-detection/{BACKBONE}")[1]) == 1


def test_segmentation_stage_end_to_end_and_skip(env, capsys):
    params = env["params"]
    metrics = train_segmentation.run(params, BACKBONE, 0)
    out = backbone_mod.result_dir(params, "segmentation", BACKBONE, 0)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {"pixel_accuracy", "miou", "miou_present", "backbone", "backbone_top1", "wall_time_s"} <= set(metrics)
    assert 0.0 <= metrics["miou"] <= metrics["miou_present"] <= 100.0 and 0.0 <= metrics["pixel_accuracy"] <= 100.0
    assert metrics["num_classes"] == CLASSES and metrics["output_stride"] == 8
    _, meta = checkpoint.load_model_weights(out / "model.pt")
    assert meta["task"] == "segmentation" and meta["num_classes"] == CLASSES

    client, runs = _mlflow_run(env, f"transfer-segmentation/{BACKBONE}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["miou"] == pytest.approx(metrics["miou"])
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [0, 1]

    stamp = (out / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert train_segmentation.run(params, BACKBONE, 0) == metrics
    assert "already finished with these params, skipping" in capsys.readouterr().out
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    # Other fine-tune settings, or another backbone recipe, are not this result: it is not skipped.
    other_lr = params_mod.load(REPO / "params.yaml", [*env["sets"], "transfer.segmentation.lr=0.5"])
    assert backbone_mod.finished_metrics(other_lr, "segmentation", BACKBONE, 0) is None
    assert backbone_mod.finished_metrics(params_mod.load(REPO / "params.yaml", [*env["sets"], "model.init=kaiming"]),
                                         "segmentation", BACKBONE, 0) is None


def test_stage_cli_reports_a_missing_backbone(env, capsys):
    argv = ["--backbone", "t6-cosine", "--seed", "0", "--params", str(REPO / "params.yaml")]
    for s in env["sets"]:
        argv += ["--set", s]
    assert train_segmentation.main(argv) == 2
    assert "t6-cosine/seed0/model.pt: backbone checkpoint not found" in capsys.readouterr().err
