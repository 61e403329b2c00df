"""The paper's transfer metrics: VOC detection AP and ADE20K pixel accuracy / mIoU, by the conventions
of GluonCV, whose `VOC07MApMetric` and `SegmentationMetric` scored the paper's Tables 8 and 9.

Detection follows the VOC devkit (`VOCevaldet.m`), as GluonCV and chainercv do:
- a class's detections are ranked by descending score (ties: see below);
- each one is compared with every ground-truth box of its image and class, difficult ones included,
  and takes the one of highest IoU; it is a true positive when that IoU is at least the threshold
  (0.5: the devkit's `ovmax >= minoverlap`; only py-faster-rcnn's `voc_eval` needs more than 0.5), the
  box is not difficult and not yet matched; a second detection on a matched box is a false positive;
  a detection whose best box is difficult is ignored (neither TP nor FP);
- recall is over the non-difficult boxes, so an undetected difficult box is not a miss;
- mAP averages the classes that have a non-difficult box (GluonCV's nanmean); such a class with no
  detection scores 0.
Boxes are 0-based continuous (see `voc.py`), so IoU has no "+1": it equals the devkit's "+1" IoU on
the raw 1-based XML coordinates and GluonCV's on its 0-based pixel-inclusive ones.

AP (`AP_METRICS`):
  voc07        VOC2007's 11-point interpolation, the mean over t of the highest precision at recall
               >= t, at GluonCV's (and py-faster-rcnn's) t = `np.arange(0., 1.1, 0.1)`, the paper's:
               its floats 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001 pass over
               a recall of exactly 0.3, 0.6 or 0.7 (up to 1/11 of a class's AP on small sets);
  voc07_exact  the same at exactly t = i / 10;
  all_point    VOC2010+'s area under the monotone precision envelope.

Tied scores (`TIE_ORDERS`):
  stable   ties keep their input order, as the devkit's stable MATLAB `sort` keeps the results
           file's order;
  gluoncv  GluonCV's order: each image's detections (images in ground-truth order) sorted by
           `argsort()[::-1]` of their float32 scores and matched in that order, then all of them
           ranked by `argsort()[::-1]` of the scores so concatenated. numpy's default sort is not
           stable and how it breaks ties depends on the numpy version and the CPU (its SIMD sorts),
           so this reproduces GluonCV run with the same numpy on the same machine.
The two differ only where a class has scores tied (in float32, for gluoncv).

Segmentation accumulates one confusion matrix over the whole dataset: pixel accuracy = correct
labelled pixels / labelled pixels; IoU_c = I_c / U_c from the summed counts. Two means:
  miou          GluonCV's, the paper's: over all classes, a class absent from both ground truth and
                prediction (U_c = 0) counting 0;
  miou_present  over the classes with U_c > 0 (torchmetrics' `MulticlassJaccardIndex`): higher when
                a class is absent, equal when every class appears.
Targets equal to the ignore index are skipped; a prediction equal to it at a labelled pixel
("no class") counts as wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline_src.transfer.ade20k import IGNORE_INDEX

VOC_IOU_THRESHOLD = 0.5
AP_METRICS = ("voc07", "voc07_exact", "all_point")
TIE_ORDERS = ("stable", "gluoncv")
# the 11 recall thresholds of each 11-point metric
ELEVEN_POINTS = {"voc07": np.arange(0.0, 1.1, 0.1), "voc07_exact": np.arange(11) / 10}


@dataclass(frozen=True)
class GroundTruth:
    """The annotation of one image: boxes (N, 4) 0-based x1, y1, x2, y2; labels (N,); difficult (N,)."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass(frozen=True)
class Detection:
    image_id: str
    label: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class ClassMatches:
    """One class's detections in ranking order: true and false positive flags (both False = ignored)."""

    scores: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    num_positives: int


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of `boxes` (N, 4) with one `box` (4,), continuous coordinates (no "+1")."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box = np.asarray(box, dtype=np.float64)
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0.0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0.0, None)
    inter = iw * ih
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = areas + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """AP from a ranked list's cumulative recall and precision; `metric` is one of `AP_METRICS`."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.shape != precision.shape or recall.ndim != 1:
        raise ValueError(
            f"recall and precision must be 1-D of equal length, got {recall.shape} and {precision.shape}"
        )
    if metric in ELEVEN_POINTS:
        total = 0.0
        for t in ELEVEN_POINTS[metric]:
            reached = precision[recall >= t]
            total += reached.max() if reached.size else 0.0
        return float(total / 11)
    if metric == "all_point":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        steps = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    raise ValueError(f"AP metric must be one of {list(AP_METRICS)}, got {metric!r}")


def ranking(
    image_ids: Sequence[str], scores: np.ndarray, image_order: Sequence[str], ties: str = "stable"
) -> tuple[np.ndarray, np.ndarray]:
    """(the order one class's detections are matched in, the order they are ranked in); `ties` is one
    of `TIE_ORDERS`. Matching only competes within an image, so the two orders may differ."""
    if ties == "stable":
        order = np.argsort(-scores, kind="stable")
        return order, order
    if ties != "gluoncv":
        raise ValueError(f"tie order must be one of {list(TIE_ORDERS)}, got {ties!r}")
    scores = np.asarray(scores, dtype=np.float32)  # GluonCV's (MXNet's) scores are float32
    by_image: dict[str, list[int]] = {}
    for i, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(i)
    per_image = [np.asarray(by_image[k], dtype=np.intp) for k in image_order if k in by_image]
    matched = np.concatenate([idx[scores[idx].argsort()[::-1]] for idx in per_image] or [np.zeros(0, np.intp)])
    return matched, matched[scores[matched].argsort()[::-1]]


def match_class(
    detections: Sequence[Detection],
    ground_truth: Mapping[str, GroundTruth],
    label: int,
    iou_threshold: float = VOC_IOU_THRESHOLD,
    ties: str = "stable",
) -> ClassMatches:
    """Rank one class's detections and flag each TP, FP or ignored, as the VOC devkit does."""
    gts = {}
    num_positives = 0
    for image_id, gt in ground_truth.items():
        keep = np.asarray(gt.labels) == label
        difficult = np.asarray(gt.difficult, dtype=bool)[keep]
        boxes = np.asarray(gt.boxes).reshape(-1, 4)[keep]
        gts[image_id] = (boxes, difficult, np.zeros(len(boxes), dtype=bool))
        num_positives += int((~difficult).sum())
    dets = [d for d in detections if d.label == label]
    scores = np.array([d.score for d in dets], dtype=np.float64)
    for d in dets:
        if d.image_id not in gts:
            raise ValueError(f"a detection of class {label} names unknown image id {d.image_id!r}")
    match_order, rank_order = ranking([d.image_id for d in dets], scores, list(ground_truth), ties)
    tp = np.zeros(len(dets), dtype=bool)
    fp = np.zeros(len(dets), dtype=bool)
    for i in match_order:
        boxes, difficult, matched = gts[dets[i].image_id]
        overlaps = box_iou(boxes, np.asarray(dets[i].box))
        best = int(np.argmax(overlaps)) if len(boxes) else -1
        if best < 0 or overlaps[best] < iou_threshold:
            fp[i] = True
        elif not difficult[best]:
            if matched[best]:
                fp[i] = True
            else:
                tp[i] = matched[best] = True
    return ClassMatches(scores[rank_order], tp[rank_order], fp[rank_order], num_positives)


def class_ap(matches: ClassMatches, metric: str = "voc07") -> float | None:
    """AP of one class; None when it has no non-difficult ground truth (recall is undefined)."""
    if matches.num_positives == 0:
        return None
    counted = matches.tp | matches.fp
    tp = np.cumsum(matches.tp[counted])
    fp = np.cumsum(matches.fp[counted])
    recall = tp / matches.num_positives
    precision = tp / np.maximum(tp + fp, 1)
    return voc_ap(recall, precision, metric)


def evaluate_detections(
    detections: Sequence[Detection],
    ground_truth: Mapping[str, GroundTruth],
    classes: Sequence[str],
    metric: str = "voc07",
    iou_threshold: float = VOC_IOU_THRESHOLD,
    ties: str = "stable",
) -> dict:
    """Per-class AP and mAP; labels index `classes`. mAP averages the classes that have ground truth."""
    if metric not in AP_METRICS:
        raise ValueError(f"AP metric must be one of {list(AP_METRICS)}, got {metric!r}")
    for i, d in enumerate(detections):
        if not 0 <= d.label < len(classes):
            raise ValueError(f"detection {i} has label {d.label}, outside 0..{len(classes) - 1}")
        if d.image_id not in ground_truth:
            raise ValueError(f"detection {i} names unknown image id {d.image_id!r}")
    ap, positives = {}, {}
    for label, name in enumerate(classes):
        matches = match_class(detections, ground_truth, label, iou_threshold, ties)
        ap[name] = class_ap(matches, metric)
        positives[name] = matches.num_positives
    scored = [v for v in ap.values() if v is not None]
    if not scored:
        raise ValueError("no class has a non-difficult ground-truth box; mAP is undefined")
    return {
        "metric": metric,
        "iou_threshold": iou_threshold,
        "ties": ties,
        "ap": ap,
        "num_positives": positives,
        "map": float(np.mean(scored)),
    }


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class SegmentationMeter:
    """Running confusion matrix over a dataset; rows are targets, columns predictions, plus one
    last column for "no class" predictions (the ignore index at a labelled pixel)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1 or 0 <= ignore_index < num_classes:
            raise ValueError(
                "need num_classes >= 1 and ignore_index outside 0..num_classes-1, "
                f"got {num_classes} and {ignore_index}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch of class-id maps of equal shape (training ids, see `ade20k.to_train_ids`).

        Counting runs in numpy on the CPU: torch.bincount is some 30x slower there."""
        pred, target = _numpy(pred), _numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
        c = self.num_classes
        valid = target != self.ignore_index
        target, pred = target[valid].astype(np.int64), pred[valid].astype(np.int64)
        allowed = f"0..{c - 1} or the ignore index {self.ignore_index}"
        if target.size and (target.min() < 0 or target.max() >= c):
            raise ValueError(f"target holds values outside {allowed}")
        none = pred == self.ignore_index
        if ((pred < 0) | (pred >= c))[~none].any():
            raise ValueError(f"prediction holds values outside {allowed}")
        pred[none] = c
        self.confusion += np.bincount(target * (c + 1) + pred, minlength=c * (c + 1)).reshape(c, c + 1)

    def compute(self) -> dict:
        """pixel_accuracy, miou and miou_present (fractions in [0, 1], see the module docstring) and the
        per-class iou (None where U_c = 0)."""
        conf = self.confusion.astype(np.float64)
        labelled = conf.sum()
        if labelled == 0:
            raise ValueError("no labelled pixels were seen; pixel accuracy and mIoU are undefined")
        inter = conf[:, : self.num_classes].diagonal()
        union = conf.sum(axis=1) + conf[:, : self.num_classes].sum(axis=0) - inter
        iou = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
        present = [v for v in iou if v is not None]
        return {
            "pixel_accuracy": float(inter.sum() / labelled),
            "miou": float(np.mean([0.0 if v is None else v for v in iou])),
            "miou_present": float(np.mean(present)),
            "iou": iou,
            "labelled_pixels": int(labelled),
        }
