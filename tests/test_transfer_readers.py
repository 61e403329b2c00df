"""VOC and ADE20K readers on tiny datasets written in the real on-disk formats, and the evaluate CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_src.transfer import ade20k, evaluate, voc
from pipeline_src.transfer.metrics import GroundTruth, evaluate_detections

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]


# ---------------------------------------------------------------- writers in the released formats

def voc_xml(filename: str, width: int, height: int, objects: list[dict]) -> str:
    """A VOC annotation; an object is {name, box (raw 1-based xmin, ymin, xmax, ymax), difficult?}."""
    parts = [
        f"<annotation><folder>VOC</folder><filename>{filename}</filename>",
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for obj in objects:
        flag = "" if obj.get("difficult") is None else f"<difficult>{int(obj['difficult'])}</difficult>"
        xmin, ymin, xmax, ymax = obj["box"]
        parts.append(
            f"<object><name>{obj['name']}</name><pose>Unspecified</pose><truncated>0</truncated>{flag}"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc(devkit: Path, year: str, split: str, images: dict[str, tuple[int, int, list[dict]]]) -> None:
    base = devkit / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (width, height, objects) in images.items():
        Image.new("RGB", (width, height), (200, 40, 40)).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", width, height, objects))
    split_file = base / "ImageSets" / "Main" / f"{split}.txt"
    with split_file.open("a") as fh:
        fh.write("".join(f"{i}\n" for i in images))


def write_png(path: Path, values: list[list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(values, dtype=np.uint8), mode="L").save(path)


def write_ade(root: Path, split: str, masks: dict[str, list[list[int]]]) -> None:
    for image_id, mask in masks.items():
        h, w = len(mask), len(mask[0])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (10, 120, 30)).save(root / "images" / split / f"{image_id}.jpg")
        write_png(root / "annotations" / split / f"{image_id}.png", mask)


TEST_IMAGES = {
    "000001": (64, 48, [{"name": "cat", "box": (1, 1, 20, 20), "difficult": 0},
                        {"name": "dog", "box": (30, 10, 60, 40), "difficult": 1}]),
    "000002": (50, 40, [{"name": "dog", "box": (11, 11, 40, 30)},  # no <difficult> tag: means 0
                        {"name": "cat", "box": (5, 5, 5, 9), "difficult": 0}]),  # one pixel wide: valid
}


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    write_voc(root, "2007", "test", TEST_IMAGES)
    write_voc(root, "2007", "trainval", {"000003": (32, 32, [{"name": "cat", "box": (2, 2, 30, 30)}])})
    return root


# ---------------------------------------------------------------- VOC reader

def test_read_split_converts_boxes_to_zero_based_and_reads_flags(devkit: Path):
    records = voc.read_split(devkit, "2007", "test", CLASSES)
    assert [r.image_id for r in records] == ["000001", "000002"]
    first, second = records
    assert (first.width, first.height) == (64, 48)
    # raw (1, 1, 20, 20) -> (0, 0, 20, 20): x1 = xmin - 1, x2 = xmax
    np.testing.assert_array_equal(first.boxes, [[0, 0, 20, 20], [29, 9, 60, 40]])
    assert first.labels.tolist() == [0, 1] and first.difficult.tolist() == [False, True]
    np.testing.assert_array_equal(second.boxes, [[10, 10, 40, 30], [4, 4, 5, 9]])
    assert second.labels.tolist() == [1, 0] and second.difficult.tolist() == [False, False]
    assert first.image_path == devkit / "VOC2007" / "JPEGImages" / "000001.jpg"


def test_default_classes_are_the_twenty_voc_classes(devkit: Path):
    assert len(voc.VOC_CLASSES) == 20 and voc.VOC_CLASSES[14] == "person"
    records = voc.read_split(devkit, "2007", "test")  # cat and dog are VOC classes too
    assert records[0].labels.tolist() == [voc.VOC_CLASSES.index("cat"), voc.VOC_CLASSES.index("dog")]


def test_voc_dataset_gives_torchvision_targets(devkit: Path):
    dataset = voc.VOCDetection(voc.read_split(devkit, "2007", "test", CLASSES))
    image, target = dataset[1]
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    assert abs(image[0].mean().item() - 200 / 255) < 0.03 and image.max() <= 1.0
    assert target["labels"].tolist() == [2, 1]  # 0 is torchvision's background
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["difficult"].tolist() == [False, False] and int(target["image_id"]) == 1
    images, targets = voc.detection_collate([dataset[0], dataset[1]])
    assert len(images) == 2 and targets[0]["difficult"].tolist() == [False, True]


def test_paper_splits_and_missing_2012(devkit: Path):
    assert [r.image_id for r in voc.test_07(devkit, CLASSES)] == ["000001", "000002"]
    with pytest.raises(voc.VOCFormatError, match="VOC2012.*not found"):
        voc.trainval_0712(devkit, CLASSES)
    assert [r.image_id for r in voc.trainval_0712(devkit, CLASSES, allow_missing_2012=True)] == ["000003"]
    write_voc(devkit, "2012", "trainval", {"2008_000001": (20, 20, [{"name": "dog", "box": (1, 1, 20, 20)}])})
    records = voc.trainval_0712(devkit, CLASSES)
    assert [(r.year, r.image_id) for r in records] == [("2007", "000003"), ("2012", "2008_000001")]


def test_resolve_devkit_accepts_the_devkit_or_its_parent(devkit: Path, tmp_path: Path):
    assert voc.resolve_devkit(devkit) == devkit
    assert voc.resolve_devkit(tmp_path) == devkit
    with pytest.raises(voc.VOCFormatError, match="no VOCdevkit"):
        voc.resolve_devkit(devkit / "VOC2007" / "JPEGImages")


@pytest.mark.parametrize(
    "xml, message",
    [
        ("<annotation><size><width>10</width>", "malformed XML"),
        (voc_xml("x.jpg", 20, 20, [{"name": "cat", "box": (5, 5, 21, 10)}]), "outside the 20 x 20 image"),
        (voc_xml("x.jpg", 20, 20, [{"name": "cat", "box": (0, 5, 10, 10)}]), "outside the 20 x 20 image"),
        (voc_xml("x.jpg", 20, 20, [{"name": "cat", "box": (9, 5, 8, 10)}]), "is empty"),
        (voc_xml("x.jpg", 20, 20, [{"name": "horse", "box": (1, 1, 5, 5)}]), "unknown class 'horse'"),
        (voc_xml("x.jpg", 20, 20, [{"name": "cat", "box": (1, 1, 5, 5), "difficult": 2}]), "difficult"),
        (voc_xml("x.jpg", 20, 20, [{"name": "cat", "box": (1, 1, "five", 5)}]), "not a number"),
    ],
)
def test_bad_annotations_are_errors_naming_the_file(devkit: Path, xml: str, message: str):
    bad = devkit / "VOC2007" / "Annotations" / "000002.xml"
    bad.write_text(xml)
    with pytest.raises(voc.VOCFormatError, match=message) as info:
        voc.read_split(devkit, "2007", "test", CLASSES)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("missing", ["JPEGImages/000002.jpg", "Annotations/000002.xml"])
def test_id_without_its_files_is_an_error_naming_the_file(devkit: Path, missing: str):
    (devkit / "VOC2007" / missing).unlink()
    with pytest.raises(voc.VOCFormatError, match="missing for id '000002'") as info:
        voc.read_split(devkit, "2007", "test", CLASSES)
    assert str(devkit / "VOC2007" / missing) in str(info.value)


def test_missing_split_file_and_image_size_mismatch(devkit: Path):
    with pytest.raises(voc.VOCFormatError, match="val.txt: split file not found"):
        voc.read_split(devkit, "2007", "val", CLASSES)
    Image.new("RGB", (30, 30)).save(devkit / "VOC2007" / "JPEGImages" / "000001.jpg")
    dataset = voc.VOCDetection(voc.read_split(devkit, "2007", "test", CLASSES))
    with pytest.raises(voc.VOCFormatError, match="000001.jpg: image is 30 x 30 but .*000001.xml gives <size> 64 x 48"):
        dataset[0]


# ---------------------------------------------------------------- ADE20K reader

@pytest.fixture
def ade(tmp_path: Path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    write_ade(root, "validation", {
        "ADE_val_00000001": [[1, 1, 2, 0], [2, 3, 3, 0]],
        "ADE_val_00000002": [[1, 1]],
    })
    return root


def test_ade_pairs_images_with_masks_and_maps_labels(ade: Path, tmp_path: Path):
    assert ade20k.resolve_root(tmp_path) == ade and ade20k.resolve_root(ade) == ade
    records = ade20k.read_split(ade, "validation")
    assert [r.image_id for r in records] == ["ADE_val_00000001", "ADE_val_00000002"]
    image, mask = ade20k.ADE20KSegmentation(records, num_classes=3)[0]
    assert image.shape == (3, 2, 4) and image.dtype == torch.float32
    assert mask.dtype == torch.int64
    assert mask.tolist() == [[0, 0, 1, 255], [1, 2, 2, 255]]  # 0 -> ignore (255), c -> c - 1


def test_ade_missing_mask_or_image_is_an_error_naming_the_file(ade: Path):
    (ade / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(ade20k.ADE20KFormatError, match=r"ADE_val_00000002\.png: mask missing"):
        ade20k.read_split(ade, "validation")
    write_png(ade / "annotations" / "validation" / "ADE_val_00000002.png", [[1, 1]])
    (ade / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(ade20k.ADE20KFormatError, match=r"ADE_val_00000001\.jpg: image missing"):
        ade20k.read_split(ade, "validation")


def test_ade_bad_masks_are_errors_naming_the_file(ade: Path):
    mask_path = ade / "annotations" / "validation" / "ADE_val_00000002.png"
    dataset = ade20k.ADE20KSegmentation(ade20k.read_split(ade, "validation"), num_classes=3)
    write_png(mask_path, [[1, 1], [1, 1]])
    with pytest.raises(ade20k.ADE20KFormatError, match=r"ADE_val_00000002\.png: mask is 2 x 2 but its image .* is 2 x 1"):
        dataset[1]
    write_png(mask_path, [[1, 4]])
    with pytest.raises(ade20k.ADE20KFormatError, match=r"ADE_val_00000002\.png: holds label 4.*0\.\.3"):
        dataset[1]
    Image.new("RGB", (2, 1)).save(mask_path)
    with pytest.raises(ade20k.ADE20KFormatError, match="single-channel"):
        dataset[1]
    with pytest.raises(ValueError, match="split"):
        ade20k.read_split(ade, "train")


# ---------------------------------------------------------------- evaluate CLI, end to end

# Cat: TP (0.9), FP (0.8, wrong place), TP (0.5) over 2 cats: recall .5, .5, 1; precision 1, 1/2, 2/3
#   voc07: t = 0 .. .5 -> 1 (6 points), t = .6 .. 1 -> 2/3 (5 points): (6 + 10/3) / 11 = 28/33
#   all_point: .5 * 1 + .5 * 2/3 = 5/6
# Dog: the detection on the difficult dog is ignored, the other is a TP: AP 1 either way.
DETECTIONS = [
    {"image_id": "000001", "class": "cat", "score": 0.9, "box": [0, 0, 20, 20]},
    {"image_id": "000002", "class": "cat", "score": 0.8, "box": [20, 20, 40, 40]},
    {"image_id": "000002", "class": "cat", "score": 0.5, "box": [4, 4, 5, 9]},
    {"image_id": "000001", "class": "dog", "score": 0.95, "box": [29, 9, 60, 40]},
    {"image_id": "000002", "class": "dog", "score": 0.7, "box": [10, 10, 40, 30]},
]


def test_detection_cli_end_to_end(devkit: Path, tmp_path: Path):
    dets, out = tmp_path / "dets.json", tmp_path / "out" / "metrics.json"
    dets.write_text(json.dumps(DETECTIONS))
    cmd = [sys.executable, "-m", "pipeline_src.transfer.evaluate", "detection", "--dataset", str(devkit.parent),
           "--year", "2007", "--split", "test", "--predictions", str(dets), "--classes", "cat,dog", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed, written = json.loads(proc.stdout), json.loads(out.read_text())
    assert printed == written
    assert written["ap"]["cat"] == pytest.approx(28 / 33) and written["ap"]["dog"] == 1.0
    assert written["map"] == pytest.approx((28 / 33 + 1) / 2)
    assert written["num_positives"] == {"cat": 2, "dog": 1} and written["metric"] == "voc07"
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file
    args = ["detection", "--dataset", str(devkit), "--year", "2007", "--split", "test",
            "--predictions", str(dets), "--classes", "cat,dog", "--metric", "all_point"]
    result = evaluate.main(args)
    assert result["ap"]["cat"] == pytest.approx(5 / 6) and result["map"] == pytest.approx(11 / 12)


# DETECTIONS' boxes in GluonCV's 0-based pixel-inclusive frame (x2, y2 one less) and in the XML's
# 1-based one (x1, y1 one more): the same detections, so the same metrics.
BOXES_IN = {
    "pixel-inclusive": [[0, 0, 19, 19], [20, 20, 39, 39], [4, 4, 4, 8], [29, 9, 59, 39], [10, 10, 39, 29]],
    "voc-xml": [[1, 1, 20, 20], [21, 21, 40, 40], [5, 5, 5, 9], [30, 10, 60, 40], [11, 11, 40, 30]],
}


@pytest.mark.parametrize("convention", sorted(BOXES_IN))
def test_detection_cli_reads_boxes_in_the_given_convention(devkit: Path, tmp_path: Path, convention: str):
    dets = tmp_path / "dets.json"
    args = ["detection", "--dataset", str(devkit), "--year", "2007", "--split", "test",
            "--predictions", str(dets), "--classes", "cat,dog"]
    dets.write_text(json.dumps([{**d, "box": b} for d, b in zip(DETECTIONS, BOXES_IN[convention])]))
    result = evaluate.main(args + ["--boxes", convention])
    assert result["boxes"] == convention
    assert result["ap"]["cat"] == pytest.approx(28 / 33) and result["ap"]["dog"] == 1.0
    # Our continuous boxes misread as pixel-inclusive: the one-pixel cat's detection [4, 4, 5, 9]
    # becomes [4, 4, 6, 10], IoU 5/12 with its box, a FP: cat ranking TP, FP, FP -> recall .5 -> 6/11.
    dets.write_text(json.dumps(DETECTIONS))
    assert evaluate.main(args + ["--boxes", "pixel-inclusive"])["ap"]["cat"] == pytest.approx(6 / 11)


def test_detection_cli_tie_order(devkit: Path, tmp_path: Path):
    # Both cats' detections at one score, the FP listed first: stable keeps FP, TP, TP -> recall 0, .5,
    # 1 at precision 0, 1/2, 2/3 -> AP 2/3; gluoncv orders them as numpy's (unstable) argsort does.
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{**DETECTIONS[i], "score": 0.5} for i in (1, 0, 2)]))
    args = ["detection", "--dataset", str(devkit), "--year", "2007", "--split", "test",
            "--predictions", str(dets), "--classes", "cat,dog"]
    result = evaluate.main(args)
    assert result["ties"] == "stable" and result["ap"]["cat"] == pytest.approx(2 / 3)
    records = voc.read_split(devkit, "2007", "test", CLASSES)
    truth = {r.image_id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    loaded = evaluate.load_detections(dets, CLASSES, set(truth))
    gluoncv = evaluate.main(args + ["--ties", "gluoncv"])
    assert gluoncv["ties"] == "gluoncv"
    assert gluoncv["ap"] == evaluate_detections(loaded, truth, CLASSES, ties="gluoncv")["ap"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"image_id": "999999", "class": "cat", "score": 0.5, "box": [0, 0, 1, 1]}, "image id '999999'"),
        ({"image_id": "000001", "class": "horse", "score": 0.5, "box": [0, 0, 1, 1]}, "unknown class 'horse'"),
        ({"image_id": "000001", "class": "cat", "score": 0.5, "box": [0, 0, 1]}, r"box \[x1, y1, x2, y2\]"),
        ({"image_id": "000001", "class": "cat", "box": [0, 0, 1, 1]}, "exactly the keys"),
    ],
)
def test_detection_cli_rejects_bad_predictions(devkit: Path, tmp_path: Path, entry: dict, message: str):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([DETECTIONS[0], entry]))
    args = ["detection", "--dataset", str(devkit), "--year", "2007", "--split", "test",
            "--predictions", str(dets), "--classes", "cat,dog"]
    with pytest.raises(evaluate.PredictionError, match=message) as info:
        evaluate.main(args)
    assert f"{dets}: detection 1" in str(info.value)


def test_detection_cli_error_exits_with_a_message(devkit: Path, tmp_path: Path, capsys):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": "000001", "class": "horse", "score": 0.5, "box": [0, 0, 1, 1]}]))
    args = ["detection", "--dataset", str(devkit), "--year", "2007", "--split", "test",
            "--predictions", str(dets), "--classes", "cat,dog"]
    assert evaluate.run(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"evaluate: error: {dets}: detection 0 has unknown class 'horse'")
    assert out == ""  # nothing that looks like metrics was printed


def seg_args(ade: Path, preds: Path, out: Path | None = None) -> list[str]:
    args = ["segmentation", "--dataset", str(ade), "--split", "validation", "--predictions", str(preds),
            "--num-classes", "3"]
    return args + (["--out", str(out)] if out else [])


def test_segmentation_cli_end_to_end(ade: Path, tmp_path: Path):
    # Raw labels; after 0 -> ignore, c -> c - 1:
    #   image 1 target [[0,0,1,I],[1,2,2,I]], pred [[0,1,1,2],[1,2,0,0]]
    #   image 2 target [[0,0]], pred [[0, no class]] (a predicted 0 counts as wrong)
    # labelled 8, correct 4 + 1 -> pixel accuracy 5/8
    # class 0: I 1 + 1, target 2 + 2, pred 2 + 1 -> U 5 -> 2/5; class 1: 2/3; class 2: 1/2
    # mIoU = (2/5 + 2/3 + 1/2) / 3 = 47/90
    preds, out = tmp_path / "preds", tmp_path / "seg.json"
    write_png(preds / "ADE_val_00000001.png", [[1, 2, 2, 3], [2, 3, 1, 1]])
    write_png(preds / "ADE_val_00000002.png", [[1, 0]])
    result = evaluate.main(seg_args(ade, preds, out))
    assert json.loads(out.read_text()) == result
    assert result["pixel_accuracy"] == pytest.approx(5 / 8)
    assert result["iou"] == pytest.approx({"1": 2 / 5, "2": 2 / 3, "3": 1 / 2})
    assert result["miou"] == pytest.approx(47 / 90) and result["miou_present"] == pytest.approx(47 / 90)
    assert result["labelled_pixels"] == 8 and result["num_images"] == 2


def test_segmentation_cli_rejects_missing_mismatched_or_stray_pngs(ade: Path, tmp_path: Path):
    preds = tmp_path / "preds"
    write_png(preds / "ADE_val_00000001.png", [[1, 2, 2, 3], [2, 3, 1, 1]])
    with pytest.raises(evaluate.PredictionError, match=r"ADE_val_00000002\.png: prediction missing"):
        evaluate.main(seg_args(ade, preds))
    write_png(preds / "ADE_val_00000002.png", [[1, 0, 1]])
    with pytest.raises(evaluate.PredictionError, match=r"ADE_val_00000002\.png: prediction is 3 x 1 but the annotation"):
        evaluate.main(seg_args(ade, preds))
    write_png(preds / "ADE_val_00000002.png", [[1, 9]])
    with pytest.raises(evaluate.PredictionError, match=r"ADE_val_00000002\.png: holds label 9"):
        evaluate.main(seg_args(ade, preds))
    write_png(preds / "ADE_val_00000002.png", [[1, 1]])
    write_png(preds / "ADE_val_00000099.png", [[1, 1]])
    with pytest.raises(evaluate.PredictionError, match=r"ADE_val_00000099\.png: no image"):
        evaluate.main(seg_args(ade, preds))
