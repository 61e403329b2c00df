"""Score prediction files against a dataset split and print the metrics as JSON.

    python -m pipeline_src.transfer.evaluate detection --dataset VOCDEVKIT --year 2007 --split test \\
        --predictions dets.json [--metric voc07|voc07_exact|all_point] [--ties stable|gluoncv] \\
        [--boxes continuous|pixel-inclusive|voc-xml] [--classes a,b,...] [--out FILE]
    python -m pipeline_src.transfer.evaluate segmentation --dataset ADE_DIR --split validation \\
        --predictions PNG_DIR --num-classes N [--out FILE]

Detections: a JSON list of {"image_id": VOC id, "class": name, "score": number,
"box": [x1, y1, x2, y2]} in the `--boxes` convention (`BOX_CONVENTIONS`; default ours, 0-based
continuous, see `voc.py`). Segmentation predictions: one `<image id>.png` per image of the split,
single channel, in the raw ADE label space of the annotations (1..N is a class; 0 predicts no class
and counts as wrong). Metrics are fractions in [0, 1]; the defaults (voc07 at IoU >= 0.5, mIoU over
all classes) are GluonCV's, the paper's; `metrics.py` describes every convention.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from pipeline_src.errors import InputError, run_main
from pipeline_src.io import write_json
from pipeline_src.transfer import ade20k, voc
from pipeline_src.transfer.metrics import (
    AP_METRICS,
    TIE_ORDERS,
    VOC_IOU_THRESHOLD,
    Detection,
    GroundTruth,
    SegmentationMeter,
    evaluate_detections,
)

DETECTION_KEYS = {"image_id", "class", "score", "box"}
# What each convention adds to x1, y1, x2, y2 to reach ours (0-based continuous: x1 = xmin - 1, y1 =
# ymin - 1, x2 = xmax, y2 = ymax of the 1-based XML box, as torchvision's detectors predict).
BOX_CONVENTIONS = {
    "continuous": (0, 0, 0, 0),
    "pixel-inclusive": (0, 0, 1, 1),  # 0-based pixel indices, x2 the last pixel: GluonCV, py-faster-rcnn
    "voc-xml": (-1, -1, 0, 0),  # 1-based pixel indices: the XML, the devkit's (and py-faster-rcnn's) results files
}


class PredictionError(InputError, ValueError):
    """A predictions file that does not match the format or the dataset; the message names the file."""


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_detections(
    path: Path, classes: Sequence[str], image_ids: set[str], boxes: str = "continuous"
) -> list[Detection]:
    """Read and check a detections JSON file against the class list and the split's image ids; boxes
    in the `boxes` convention (a key of `BOX_CONVENTIONS`) come back in ours."""
    shift = BOX_CONVENTIONS[boxes]
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PredictionError(f"{path}: detections file not found") from None
    except json.JSONDecodeError as exc:
        raise PredictionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise PredictionError(f"{path}: must hold a JSON list of detections")
    index = {name: i for i, name in enumerate(classes)}
    detections = []
    for i, e in enumerate(entries):
        where = f"{path}: detection {i}"
        if not isinstance(e, dict) or set(e) != DETECTION_KEYS:
            got = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise PredictionError(f"{where} must have exactly the keys {sorted(DETECTION_KEYS)}, got {got}")
        if e["image_id"] not in image_ids:
            raise PredictionError(f"{where} names image id {e['image_id']!r}, which is not in the split")
        if e["class"] not in index:
            raise PredictionError(f"{where} has unknown class {e['class']!r}; known classes: {list(classes)}")
        box, score = e["box"], e["score"]
        numbers = box if isinstance(box, list) else []
        if len(numbers) != 4 or not all(_finite(v) for v in numbers + [score]):
            raise PredictionError(
                f"{where} needs a finite score and box [x1, y1, x2, y2], got score {score!r}, box {box!r}"
            )
        if box[2] < box[0] or box[3] < box[1]:
            raise PredictionError(f"{where} has box {box} with x2 < x1 or y2 < y1")
        ours = tuple(float(v) + d for v, d in zip(box, shift))
        detections.append(Detection(e["image_id"], index[e["class"]], float(score), ours))
    return detections


def run_detection(args: argparse.Namespace) -> dict:
    classes = args.classes.split(",") if args.classes else list(voc.VOC_CLASSES)
    devkit = voc.resolve_devkit(args.dataset)
    records = voc.read_split(devkit, args.year, args.split, classes)
    ground_truth = {r.image_id: GroundTruth(r.boxes, r.labels, r.difficult) for r in records}
    detections = load_detections(args.predictions, classes, set(ground_truth), args.boxes)
    result = evaluate_detections(detections, ground_truth, classes, args.metric, VOC_IOU_THRESHOLD, args.ties)
    return {
        "task": "detection",
        "dataset": str(devkit),
        "year": args.year,
        "split": args.split,
        "num_images": len(records),
        "num_detections": len(detections),
        "boxes": args.boxes,
        **result,
    }


def run_segmentation(args: argparse.Namespace) -> dict:
    ade20k.check_num_classes(args.num_classes)
    root = ade20k.resolve_root(args.dataset)
    records = ade20k.read_split(root, args.split)
    pred_dir = Path(args.predictions)
    if not pred_dir.is_dir():
        raise PredictionError(f"{pred_dir}: predictions folder not found")
    extra = sorted({p.stem for p in pred_dir.glob("*.png")} - {r.image_id for r in records})
    if extra:
        raise PredictionError(
            f"{pred_dir / (extra[0] + '.png')}: no image {extra[0]!r} in the {args.split} split "
            f"({len(extra)} such file(s)); predictions for another split?"
        )
    meter = SegmentationMeter(args.num_classes)
    for rec in records:
        pred_path = pred_dir / f"{rec.image_id}.png"
        if not pred_path.is_file():
            raise PredictionError(f"{pred_path}: prediction missing for image {rec.image_path}")
        target = ade20k.load_mask(rec.mask_path, args.num_classes)
        try:
            pred = ade20k.load_mask(pred_path, args.num_classes)
        except ade20k.ADE20KFormatError as exc:
            raise PredictionError(str(exc)) from None
        if pred.shape != target.shape:
            raise PredictionError(
                f"{pred_path}: prediction is {pred.shape[1]} x {pred.shape[0]} but the annotation "
                f"{rec.mask_path} is {target.shape[1]} x {target.shape[0]}"
            )
        meter.update(ade20k.to_train_ids(pred), ade20k.to_train_ids(target))
    scores = meter.compute()
    return {
        "task": "segmentation",
        "dataset": str(root),
        "split": args.split,
        "num_images": len(records),
        "num_classes": args.num_classes,
        "pixel_accuracy": scores["pixel_accuracy"],
        "miou": scores["miou"],
        "miou_present": scores["miou_present"],
        "iou": {str(c + 1): v for c, v in enumerate(scores["iou"])},  # keyed by raw ADE label
        "labelled_pixels": scores["labelled_pixels"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_src.transfer.evaluate", description=__doc__.split("\n")[0]
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    det = tasks.add_parser("detection", help="VOC AP of a detections JSON")
    det.add_argument("--dataset", required=True, help="the VOCdevkit folder, or the folder holding it")
    det.add_argument("--year", required=True, choices=["2007", "2012"])
    det.add_argument("--split", required=True, help="an ImageSets/Main split, e.g. test")
    det.add_argument("--predictions", required=True, type=Path, help="detections JSON file")
    det.add_argument(
        "--metric", default="voc07", choices=AP_METRICS,
        help="voc07: 11-point at GluonCV's np.arange(0., 1.1, 0.1) (the paper's); voc07_exact: at exactly "
             "i/10; all_point: VOC2010+ (default: voc07)",
    )
    det.add_argument(
        "--ties", default="stable", choices=TIE_ORDERS,
        help="order of tied scores: stable (input order, the devkit's) or gluoncv (GluonCV's numpy "
             "argsort order) (default: stable)",
    )
    det.add_argument(
        "--boxes", default="continuous", choices=list(BOX_CONVENTIONS),
        help="coordinates of the boxes: continuous (ours, torchvision's), pixel-inclusive (0-based pixel "
             "indices, GluonCV's and py-faster-rcnn's boxes: +1 on x2, y2) or voc-xml (1-based as in the "
             "annotations and devkit results files: -1 on x1, y1) (default: continuous)",
    )
    det.add_argument("--classes", help="comma-separated class names in label order (default: 20 VOC classes)")
    seg = tasks.add_parser("segmentation", help="ADE20K pixel accuracy and mIoU of a folder of PNGs")
    seg.add_argument("--dataset", required=True, help="ADEChallengeData2016, or the folder holding it")
    seg.add_argument("--split", required=True, choices=ade20k.SPLITS)
    seg.add_argument("--predictions", required=True, type=Path, help="folder of <image id>.png predictions")
    seg.add_argument("--num-classes", required=True, type=int, help="150 for ADE20K")
    for p in (det, seg):
        p.add_argument("--out", type=Path, help="also write the metrics JSON here (atomically)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = run_detection(args) if args.task == "detection" else run_segmentation(args)
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.out is not None:
        write_json(args.out, result)
    return result


def run(argv: Sequence[str] | None = None) -> int:
    """The command-line entry: a bad dataset or predictions file exits with status 2 and its message."""
    return run_main("evaluate", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(run())
