"""params.yaml is the single source of truth: validation, --set, run resolution, the paper profile."""
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline_src import params as params_mod

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_params_load_with_every_key():
    params = params_mod.load(ROOT / "params.yaml")
    for section, field in params_mod.Params.model_fields.items():
        assert section in params
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            assert set(params[section]) == set(field.annotation.model_fields)


def test_unknown_key_names_path_file_and_suggestion(tmp_path):
    path = _write(tmp_path, lambda raw: raw["train"].__setitem__("epohcs", 3))
    with pytest.raises(params_mod.ParamsError) as err:
        params_mod.load(path)
    msg = str(err.value)
    assert str(path) in msg and "train.epohcs" in msg and "did you mean 'train.epochs'" in msg


def test_unknown_section_is_an_error(tmp_path):
    path = _write(tmp_path, lambda raw: raw.__setitem__("trian", {}))
    with pytest.raises(params_mod.ParamsError, match="unknown key 'trian'.*did you mean 'train'"):
        params_mod.load(path)


def test_missing_key_is_an_error_not_a_hidden_default(tmp_path):
    path = _write(tmp_path, lambda raw: raw["loader"].pop("res"))
    with pytest.raises(params_mod.ParamsError, match=r"section 'loader' is missing key\(s\) \['res'\]"):
        params_mod.load(path)


@pytest.mark.parametrize("key,value,pattern", [
    ("train.epochs", "1.5", "must be an integer"),
    ("train.epochs", "0", "must be >= 1"),
    ("train.schedule", "linear", r"must be one of \['step', 'cosine'\]"),
    ("train.nesterov", "yes please", "must be true or false"),
    ("augment.crop_area", "[0.9, 0.1]", "low <= high"),
    ("augment.mean", "[1, 2]", "must have 3 items"),
    ("train.step_milestones", "[6, 3]", "strictly increasing"),
    ("data.on_corrupt", "ignore", "must be one of"),
    ("transfer.detection.frozen_stages", "[stem, layer5]", r"'transfer.detection.frozen_stages.1' must be one of"),
    ("transfer.detection.lr_decay", "1.5", r"'transfer.detection.lr_decay' must be <= 1.0"),
    ("transfer.detection.anchor_sizes", "[]", r"'transfer.detection.anchor_sizes' must not be empty"),
    ("transfer.detection.anchor_sizes", "[64, 32]", r"'transfer.detection.anchor_sizes' must be strictly"),
    ("transfer.detection.aspect_ratios", "[0, 1]", r"'transfer.detection.aspect_ratios.0' must be >= 0.001"),
    ("transfer.detection.rpn_batch_size_per_image", "0", r"'transfer.detection.rpn_batch_size_per_image' must be >="),
    ("transfer.detection.rpn_pre_nms_top_n_train", "1e3", r"'transfer.detection.rpn_pre_nms_top_n_train' must be an"),
    ("transfer.detection.box_positive_fraction", "1.25", r"'transfer.detection.box_positive_fraction' must be <= 1.0"),
    ("transfer.detection.rpn_bg_iou_thresh", "0.8", r"'transfer.detection.rpn_bg_iou_thresh' \(0.8\) must not exceed"),
    ("transfer.detection.box_nms_thresh", "-0.1", r"'transfer.detection.box_nms_thresh' must be >= 0.0"),
    ("transfer.segmentation.scale_range", "[2.0, 0.5]", r"'transfer.segmentation.scale_range' must be \[low, high\]"),
    ("transfer.segmentation.scale_range", "[0.5]", r"'transfer.segmentation.scale_range' must have 2 items"),
    ("transfer.segmentation.aux_weight", "-0.5", r"'transfer.segmentation.aux_weight' must be >= 0.0"),
])
def test_wrong_values_are_rejected(key, value, pattern):
    with pytest.raises(params_mod.ParamsError, match=pattern):
        params_mod.load(ROOT / "params.yaml", [f"{key}={value}"])


def test_fpn_needs_one_anchor_size_per_level():
    fpn = params_mod.load(ROOT / "params.yaml", ["transfer.detection.style=fpn"])
    assert len(fpn["transfer"]["detection"]["anchor_sizes"]) == 5
    one_per_level = r"key 'transfer.detection.anchor_sizes' must have 5 items with style fpn.*got 3"
    with pytest.raises(params_mod.ParamsError, match=one_per_level):
        params_mod.load(ROOT / "params.yaml",
                        ["transfer.detection.style=fpn", "transfer.detection.anchor_sizes=[32, 64, 128]"])
    c4 = params_mod.load(ROOT / "params.yaml", ["transfer.detection.anchor_sizes=[32, 64, 128]"])
    assert c4["transfer"]["detection"]["anchor_sizes"] == [32.0, 64.0, 128.0]


def test_set_overrides_and_is_validated():
    params = params_mod.load(ROOT / "params.yaml", ["train.epochs=3", "data.imagenet_dir=/x/y", "augment.flip=false",
                                                    "train.weight_decay=5e-5"])
    assert params["train"]["weight_decay"] == 5e-5
    assert params["train"]["epochs"] == 3
    assert params["data"]["imagenet_dir"] == "/x/y"
    assert params["augment"]["flip"] is False
    with pytest.raises(params_mod.ParamsError, match="unknown key 'train.lr'"):
        params_mod.load(ROOT / "params.yaml", ["train.lr=0.2"])
    with pytest.raises(params_mod.ParamsError, match="expected KEY=VALUE"):
        params_mod.load(ROOT / "params.yaml", ["train.epochs"])


def test_runs_stack_their_bases_tricks():
    params = params_mod.load(ROOT / "params.yaml")
    run = params_mod.resolve_run(params, "t6-label-smoothing")
    assert run["run"]["tricks"] == ["large_batch", "warmup", "zero_gamma", "no_bias_decay", "amp",
                                    "resnet_d", "cosine", "label_smoothing"]
    assert run["model"]["variant"] == "D" and run["train"]["schedule"] == "cosine"
    assert run["train"]["label_smoothing"] == pytest.approx(0.1)
    assert params_mod.resolve_run(params, "baseline")["train"] == params["train"]


def test_generated_single_trick_and_leave_one_out_runs():
    params = params_mod.load(ROOT / "params.yaml")
    names = params_mod.all_run_names(params)
    for trick in params["study"]["single_trick"]["tricks"]:
        assert f"single-{trick}" in names
    single = params_mod.resolve_run(params, "single-cosine")
    assert single["run"]["tricks"] == ["cosine"] and single["train"]["schedule"] == "cosine"
    loo = params_mod.resolve_run(params, "loo-cosine")
    assert "cosine" not in loo["run"]["tricks"] and loo["train"]["schedule"] == "step"
    assert loo["train"]["mixup_alpha"] == pytest.approx(0.2)


def test_command_line_set_wins_over_a_runs_tricks():
    params = params_mod.load(ROOT / "params.yaml", ["train.epochs=3"])
    assert params_mod.resolve_run(params, "t6-mixup")["train"]["epochs"] == 3


def test_bad_run_references_are_errors(tmp_path):
    path = _write(tmp_path, lambda raw: raw["runs"]["baseline"].__setitem__("tricks", ["cosin"]))
    with pytest.raises(params_mod.ParamsError, match="did you mean 'runs.baseline.tricks.cosine'"):
        params_mod.load(path)
    path = _write(tmp_path, lambda raw: raw["tricks"].__setitem__("bad", {"paths.data": "x"}))
    with pytest.raises(params_mod.ParamsError, match="a run may only change"):
        params_mod.load(path)
    path = _write(tmp_path, lambda raw: raw["runs"]["baseline"].__setitem__("base", "t4-amp"))
    with pytest.raises(params_mod.ParamsError, match="cycle"):
        params_mod.load(path)
    with pytest.raises(params_mod.ParamsError, match="unknown key 'runs.basline'"):
        params_mod.resolve_run(params_mod.load(ROOT / "params.yaml"), "basline")


def test_imagenet_profile_matches_the_paper():
    """configs/imagenet.yaml against ../shared/paper_tables.md (sections 2, 3 and 5)."""
    params = params_mod.load(ROOT / "configs" / "imagenet.yaml")
    aug, train, model = params["augment"], params["train"], params["model"]
    assert aug["crop_area"] == [0.08, 1.0]
    assert aug["crop_ratio"] == pytest.approx([3 / 4, 4 / 3])
    assert aug["flip"] is True
    assert [aug["brightness"], aug["contrast"], aug["saturation"]] == [0.4, 0.4, 0.4]
    assert aug["lighting_std"] == 0.1
    assert aug["mean"] == [123.68, 116.779, 103.939] and aug["std"] == [58.393, 57.12, 57.375]
    assert params["loader"]["res"] == 224 and params["loader"]["val_res"] == 224
    assert params["loader"]["val_res"] / params["loader"]["val_crop_ratio"] == pytest.approx(256)
    assert (model["arch"], model["depth"], model["variant"], model["width"], model["init"]) == \
        ("resnet", 50, "A", 1.0, "xavier")
    assert (train["epochs"], train["batch_size"], train["base_lr"], train["base_batch"]) == (120, 256, 0.1, 256)
    assert train["step_milestones"] == [30, 60, 90] and train["step_gamma"] == 0.1
    assert (train["momentum"], train["nesterov"], train["weight_decay"]) == (0.9, True, 1e-4)
    assert train["schedule"] == "step" and train["precision"] == "fp32"

    efficient = params_mod.resolve_run(params, "efficient")["train"]
    assert efficient["batch_size"] == 1024 and efficient["linear_scaling"] is True
    assert efficient["base_lr"] * efficient["batch_size"] / efficient["base_batch"] == pytest.approx(0.4)
    assert efficient["warmup_epochs"] == 5 and efficient["no_bias_decay"] and efficient["precision"] == "amp"
    assert params_mod.resolve_run(params, "efficient")["model"]["zero_gamma"] is True

    mixup = params_mod.resolve_run(params, "t6-mixup")["train"]
    assert (mixup["mixup_alpha"], mixup["epochs"], mixup["label_smoothing"]) == (0.2, 200, 0.1)
    assert mixup["schedule"] == "cosine"
    teacher = params_mod.resolve_run(params, params["teacher"]["run"])
    assert (teacher["model"]["depth"], teacher["model"]["variant"]) == (152, "D")
    assert teacher["train"]["schedule"] == "cosine" and teacher["train"]["label_smoothing"] == 0.1
    assert params["distill"]["temperature"] == 20


def test_imagenet_profile_transfer_is_common_practice():
    """Faster-RCNN on VOC as GluonCV's faster_rcnn_resnet50_v1b_voc, FCN on ADE20K as GluonCV's."""
    params = params_mod.load(ROOT / "configs" / "imagenet.yaml")
    det, seg = params["transfer"]["detection"], params["transfer"]["segmentation"]
    assert (det["min_size"], det["max_size"]) == (600, 1000)
    assert det["frozen_stages"] == ["stem", "layer1"] and det["lr_decay"] == 0.1
    assert det["anchor_sizes"] == [32, 64, 128, 256, 512] and det["aspect_ratios"] == [0.5, 1.0, 2.0]
    assert (det["rpn_batch_size_per_image"], det["rpn_positive_fraction"]) == (256, 0.5)
    assert (det["rpn_pre_nms_top_n_train"], det["rpn_post_nms_top_n_train"]) == (12000, 2000)
    assert (det["rpn_pre_nms_top_n_test"], det["rpn_post_nms_top_n_test"]) == (6000, 300)
    assert (det["box_batch_size_per_image"], det["box_positive_fraction"]) == (128, 0.25)
    assert (det["box_score_thresh"], det["box_nms_thresh"], det["box_detections_per_img"]) == (0.001, 0.3, 100)
    assert (seg["base_size"], seg["crop_size"], seg["scale_range"]) == (520, 480, [0.5, 2.0])
    assert seg["aux_loss"] is True and seg["aux_weight"] == 0.5


def test_duplicate_key_is_an_error_naming_file_and_lines(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    assert "\n  epochs: 24" in text
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("\n  epochs: 24", "\n  epochs: 3\n  epochs: 24", 1))
    first = text[:text.index("\n  epochs: 24")].count("\n") + 2
    with pytest.raises(params_mod.ParamsError) as err:
        params_mod.load(path)
    msg = str(err.value)
    assert f"{path}: line {first + 1}: key 'epochs' is given twice" in msg and f"first on line {first}" in msg


def test_synthetic_sizes_must_be_ordered():
    with pytest.raises(params_mod.ParamsError, match=r"'synthetic.min_size' \(60\) is above 'synthetic.max_size'"):
        params_mod.load(ROOT / "params.yaml", ["synthetic.min_size=60", "synthetic.max_size=40"])


@pytest.mark.parametrize("run, sets, pattern", [
    ("baseline", ["train.warmup_epochs=24"],
     r"run 'baseline': key 'train.warmup_epochs' \(24\) must be below 'train.epochs' \(24\)"),
    ("baseline", ["train.epochs=3"], r"run 'baseline': key 'train.step_milestones' \[16, 22\] has \[16, 22\] outside"),
    # a 2-epoch warmup reaches a milestone at epoch 2
    ("baseline", ["train.warmup_epochs=2", "train.step_milestones=[2, 10]"],
     r"run 'baseline': .* has \[2\] outside \(warmup_epochs, epochs\) = \(2, 24\)"),
])
def test_schedule_rules_name_the_run_and_keys(run, sets, pattern):
    params = params_mod.load(ROOT / "params.yaml", sets)
    with pytest.raises(params_mod.ParamsError, match=pattern):
        params_mod.resolve_run(params, run)


def test_cosine_runs_ignore_step_milestones():
    params = params_mod.load(ROOT / "params.yaml", ["train.schedule=cosine", "train.step_milestones=[50]"])
    assert params_mod.resolve_run(params, "baseline")["train"]["step_milestones"] == [50]


def test_malformed_set_value_is_a_params_error():
    with pytest.raises(params_mod.ParamsError, match=r"--set 'train.epochs=\[1': the value is not valid YAML"):
        params_mod.load(ROOT / "params.yaml", ["train.epochs=[1"])


def _overlay(tmp_path: Path, body: dict) -> Path:
    """An overlay of a copy of params.yaml, both in tmp_path."""
    (tmp_path / "base.yaml").write_text((ROOT / "params.yaml").read_text())
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump({"extends": "base.yaml", **body}, sort_keys=False))
    return path


OWN_PATHS = {"paths": {"data": "d2", "runs": "d2/runs", "reports": "r2"}}


def test_imagenet_profile_is_an_overlay_of_only_what_differs():
    base = params_mod.flatten({k: v for k, v in params_mod.load(ROOT / "params.yaml").items() if not k.startswith("_")})
    raw = yaml.safe_load((ROOT / "configs" / "imagenet.yaml").read_text())
    assert raw.pop("extends") == "../params.yaml"
    tricks = raw.pop("tricks")  # a trick is replaced whole: compare whole tricks
    same = [key for key, value in params_mod.flatten(raw).items() if key in base and base[key] == value]
    base_tricks = params_mod.load(ROOT / "params.yaml")["tricks"]
    same += [f"tricks.{name}" for name, sets in tricks.items() if base_tricks[name] == sets]
    assert set(same) <= {"study.seeds"}, f"configs/imagenet.yaml repeats params.yaml's value of {same}"


def test_overlay_inherits_every_base_key_and_replaces_recipes_whole(tmp_path):
    path = _overlay(tmp_path, {**OWN_PATHS, "train": {"epochs": 7},
                               "tricks": {"mixup": {"train.mixup_alpha": 0.4}},
                               "runs": {"teacher": {"set": {"model.depth": 50}}}})
    base_file = tmp_path / "base.yaml"
    base_file.write_text(base_file.read_text().replace("momentum: 0.9\n  nesterov", "momentum: 0.8\n  nesterov"))
    params = params_mod.load(path)
    assert params["train"]["epochs"] == 7 and params["train"]["momentum"] == 0.8  # a base edit reaches it
    assert params["tricks"]["mixup"] == {"train.mixup_alpha": 0.4}  # not merged with the base's epochs
    assert params["runs"]["teacher"]["set"] == {"model.depth": 50}
    assert params["runs"]["teacher"]["base"] == "t6-label-smoothing"  # the rest of the run merges


def test_overlay_errors_name_the_overlay(tmp_path):
    with pytest.raises(params_mod.ParamsError, match=r"overlay.yaml: unknown key 'train.epohcs'"):
        params_mod.load(_overlay(tmp_path, {**OWN_PATHS, "train": {"epohcs": 3}}))
    same_paths = r"overlay.yaml: key\(s\) \['paths.data', 'paths.runs', 'paths.reports'\]"
    with pytest.raises(params_mod.ParamsError, match=same_paths):
        params_mod.load(_overlay(tmp_path, {"train": {"epochs": 3}}))
    with pytest.raises(params_mod.ParamsError, match=r"overlay.yaml: key\(s\) \['paths.reports'\] are the same"):
        params_mod.load(_overlay(tmp_path, {"paths": {"data": "d2", "runs": "d2/runs"}}))
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(params_mod.ParamsError, match="cycle of profiles"):
        params_mod.load(tmp_path / "loop.yaml")
    dup = _overlay(tmp_path, OWN_PATHS)
    dup.write_text(dup.read_text() + "train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(params_mod.ParamsError, match=r"overlay.yaml: line \d+: key 'epochs' is given twice"):
        params_mod.load(dup)


def test_transfer_seeds_must_be_trained_seeds_and_seeds_not_empty():
    with pytest.raises(params_mod.ParamsError, match=r"'study.transfer_seeds' has seed\(s\) \[5\] that are not in"):
        params_mod.load(ROOT / "params.yaml", ["study.transfer_seeds=[0, 5]"])
    with pytest.raises(params_mod.ParamsError, match="'study.seeds' is empty"):
        params_mod.load(ROOT / "params.yaml", ["study.seeds=[]", "study.transfer_seeds=[]"])
    params = params_mod.load(ROOT / "params.yaml", ["study.seeds=[3]", "study.transfer_seeds=[3]"])
    assert params["study"]["seeds"] == [3]
