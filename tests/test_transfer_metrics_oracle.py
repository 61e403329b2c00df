"""Randomized transfer-metric cases against oracles written from the references' documented rules.

Detection: an exact (Fraction) restatement of the VOC devkit's `VOCevaldet.m` on the raw 1-based
boxes with its "+1" IoU, plus GluonCV's tie order. Segmentation: GluonCV's `SegmentationMetric`
rules (histograms of the labels shifted by one, 0 = ignored) and torchmetrics.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_jaccard_index,
)

from pipeline_src.transfer.metrics import (
    AP_METRICS,
    TIE_ORDERS,
    Detection,
    GroundTruth,
    SegmentationMeter,
    evaluate_detections,
)

CLASSES = ["c0", "c1", "c2", "c3"]  # c2 has detections but no ground truth, c3 has neither
CASES = 150
IGN = 255
# the 11-point thresholds: GluonCV's (and py-faster-rcnn's) expression, and the tenths
THRESHOLDS = {"voc07": np.arange(0., 1.1, 0.1), "voc07_exact": [i / 10 for i in range(11)]}

# ---------------------------------------------------------------- the devkit, restated exactly


def raw(box) -> tuple[Fraction, ...]:
    """Our continuous box back in the XML's 1-based inclusive pixels (voc.py's conversion, inverted)."""
    x1, y1, x2, y2 = (Fraction(v) for v in box)
    return x1 + 1, y1 + 1, x2, y2


def devkit_overlap(bb, bbgt) -> Fraction | None:
    """VOCevaldet.m's overlap of two raw boxes; None where they do not intersect (it skips those)."""
    iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1
    ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1
    if iw <= 0 or ih <= 0:
        return None
    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih
    return iw * ih / ua


def oracle_orders(dets: list[Detection], images: list[str], ties: str) -> tuple[list[int], list[int]]:
    """(match order, rank order). stable: Python's stable sort, as MATLAB's; gluoncv: each image by
    numpy argsort reversed of float32 scores (MXNet's), then the concatenation again."""
    if ties == "stable":
        order = sorted(range(len(dets)), key=lambda i: -dets[i].score)
        return order, order
    sequence = []
    for image in images:
        idx = [i for i, d in enumerate(dets) if d.image_id == image]
        scores = np.array([dets[i].score for i in idx], dtype=np.float32)
        sequence += [idx[k] for k in scores.argsort()[::-1]]
    scores = np.array([dets[i].score for i in sequence], dtype=np.float32)
    return sequence, [sequence[k] for k in scores.argsort()[::-1]]


def oracle_ap(detections, truth, label, metric, ties) -> float | None:
    """One class's AP by the devkit's rules; truth maps image -> [(raw box, label, difficult)]."""
    npos = sum(1 for objects in truth.values() for _, lab, diff in objects if lab == label and not diff)
    if npos == 0:
        return None
    dets = [d for d in detections if d.label == label]
    match_order, rank_order = oracle_orders(dets, list(truth), ties)
    taken, flag = set(), {}
    for i in match_order:
        ovmax, jmax = None, None
        for j, (bbgt, lab, _) in enumerate(truth[dets[i].image_id]):
            ov = devkit_overlap(raw(dets[i].box), bbgt) if lab == label else None
            if ov is not None and (ovmax is None or ov > ovmax):  # the first of equal maxima, as max()
                ovmax, jmax = ov, j
        if ovmax is not None and ovmax >= Fraction(1, 2):  # ovmax >= VOCopts.minoverlap
            if truth[dets[i].image_id][jmax][2]:
                flag[i] = "ignored"
            elif (dets[i].image_id, jmax) in taken:
                flag[i] = "fp"
            else:
                taken.add((dets[i].image_id, jmax))
                flag[i] = "tp"
        else:
            flag[i] = "fp"
    # cumulative tp, fp over the whole ranking, ignored detections included (precision NaN at 0 / 0)
    tp = fp = 0
    rec, prec = [], []
    for i in rank_order:
        tp, fp = tp + (flag[i] == "tp"), fp + (flag[i] == "fp")
        rec.append(Fraction(tp, npos))
        prec.append(Fraction(tp, tp + fp) if tp + fp else None)
    if metric == "all_point":
        mrec, mpre = [Fraction(0)] + rec + [Fraction(1)], [Fraction(0)] + prec + [Fraction(0)]
        for i in range(len(mpre) - 2, -1, -1):  # MATLAB's max() passes over NaN
            mpre[i] = mpre[i + 1] if mpre[i] is None else max(mpre[i], mpre[i + 1])
        ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
        return float(ap)
    ap = Fraction(0)
    for t in THRESHOLDS[metric]:  # recall meets the thresholds in double precision, as in MATLAB
        reached = [p for r, p in zip(rec, prec) if float(r) >= t and p is not None]
        ap += max(reached, default=Fraction(0)) / 11
    return float(ap)


# ---------------------------------------------------------------- random cases


def random_case(rng: np.random.Generator) -> tuple[dict[str, GroundTruth], list[Detection]]:
    """Integer ground truth (some images empty, some boxes difficult, only c0 and c1), detections on
    a half-pixel grid (so every IoU is exact in floating point): copies, halves (IoU exactly 0.5),
    jittered copies, duplicates and stray boxes, with scores from a short list (ties) or uniform."""
    truth, dets = {}, []
    few_scores = rng.random() < 0.6
    def score() -> float:
        return float(rng.choice([0.2, 0.4, 0.6, 0.8])) if few_scores else float(rng.random())
    for k in range(int(rng.integers(1, 6))):
        image = f"{k:06d}"
        boxes, labels, difficult = [], [], []
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.integers(0, 20, 2)
            w, h = rng.integers(1, 9, 2)
            boxes.append([x1, y1, x1 + w, y1 + h])
            labels.append(int(rng.integers(0, 2)))
            difficult.append(bool(rng.random() < 0.25))
        truth[image] = GroundTruth(np.array(boxes, np.float64).reshape(-1, 4), np.array(labels, np.int64),
                                   np.array(difficult, bool))
        for box, label in zip(boxes, labels):
            for _ in range(int(rng.integers(0, 3))):
                x1, y1, x2, y2 = (float(v) for v in box)
                kind = rng.integers(0, 3)
                if kind == 1:
                    x2 = x1 + (x2 - x1) / 2
                elif kind == 2:
                    x1, y1, x2, y2 = (v + rng.integers(-3, 4) / 2 for v in (x1, y1, x2, y2))
                    x2, y2 = max(x2, x1 + 0.5), max(y2, y1 + 0.5)
                dets.append(Detection(image, label if rng.random() < 0.85 else int(rng.integers(0, 3)),
                                      score(), (x1, y1, x2, y2)))
        for _ in range(int(rng.integers(0, 3))):
            x1, y1 = rng.integers(0, 40, 2) / 2
            dets.append(Detection(image, int(rng.integers(0, 3)), score(), (x1, y1, x1 + 4.5, y1 + 3.0)))
    return truth, [dets[i] for i in rng.permutation(len(dets))]


def test_detection_agrees_with_the_devkit_oracle_on_random_cases():
    rng = np.random.default_rng(0)
    seen = dict(ties=0, iou_half=0, difficult=0, empty_images=0, no_positives=0)
    for _ in range(CASES):
        truth, dets = random_case(rng)
        raw_truth = {k: [(raw(b), int(lab), bool(d)) for b, lab, d in zip(g.boxes, g.labels, g.difficult)]
                     for k, g in truth.items()}
        for metric in AP_METRICS:
            for ties in TIE_ORDERS:
                expected = {name: oracle_ap(dets, raw_truth, c, metric, ties) for c, name in enumerate(CLASSES)}
                scored = [v for v in expected.values() if v is not None]
                if not scored:
                    with pytest.raises(ValueError, match="mAP is undefined"):
                        evaluate_detections(dets, truth, CLASSES, metric, ties=ties)
                    continue
                result = evaluate_detections(dets, truth, CLASSES, metric, ties=ties)
                for name, want in expected.items():
                    got = result["ap"][name]
                    assert (got is None) == (want is None) and (want is None or abs(got - want) < 1e-9), (
                        metric, ties, name, got, want)
                assert abs(result["map"] - float(np.mean(scored))) < 1e-9
        for c in range(len(CLASSES)):
            scores = [d.score for d in dets if d.label == c]
            seen["ties"] += len(scores) != len(set(scores))
        seen["iou_half"] += sum(devkit_overlap(raw(d.box), b) == Fraction(1, 2)
                                for d in dets for b, _, _ in raw_truth[d.image_id])
        seen["difficult"] += sum(int(g.difficult.sum()) for g in truth.values())
        seen["empty_images"] += sum(len(g.labels) == 0 for g in truth.values())
        seen["no_positives"] += sum(v is None for v in expected.values())
    assert all(count >= 20 for count in seen.values()), seen  # the cases cover each rule


# ---------------------------------------------------------------- segmentation


def gluoncv_segmentation(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[float, float]:
    """pixAcc and mIoU by GluonCV's SegmentationMetric rules: labels shifted by one (ignored and no
    class become 0), per-class areas from histograms over 1..C, IoU = I / (eps + U) averaged over all."""
    correct = labelled = 0
    inter = union = np.zeros(num_classes)
    for pred, target in pairs:
        t = np.where(target == IGN, 0, target + 1)
        p = np.where(pred == IGN, 0, pred + 1)
        labelled += np.sum(t > 0)
        correct += np.sum((p == t) * (t > 0))
        p = p * (t > 0)
        area_inter = np.histogram(p * (p == t), bins=num_classes, range=(1, num_classes))[0]
        area_pred = np.histogram(p, bins=num_classes, range=(1, num_classes))[0]
        area_lab = np.histogram(t, bins=num_classes, range=(1, num_classes))[0]
        inter, union = inter + area_inter, union + area_pred + area_lab - area_inter
    iou = inter / (np.spacing(1) + union)
    return correct / (np.spacing(1) + labelled), float(iou.mean())


def random_maps(rng: np.random.Generator, num_classes: int, no_class: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """A few (pred, target) pairs; some classes never appear; ignored targets; "no class" predictions."""
    classes = rng.permutation(num_classes)[: int(rng.integers(1, num_classes + 1))]
    pairs = []
    for _ in range(int(rng.integers(1, 4))):
        shape = tuple(rng.integers(1, 7, 2))
        target = rng.choice(classes, size=shape)
        target[rng.random(shape) < 0.15] = IGN
        pred = np.where(rng.random(shape) < 0.5, target, rng.choice(classes, size=shape))
        pred[target == IGN] = rng.integers(0, num_classes, size=int((target == IGN).sum()))
        if no_class:
            pred[rng.random(shape) < 0.15] = IGN
        pairs.append((pred, target))
    return pairs


def test_segmentation_agrees_with_gluoncv_rules_and_torchmetrics_on_random_cases():
    rng = np.random.default_rng(1)
    absent = 0
    for case in range(CASES):
        c = int(rng.integers(2, 7))
        no_class = case % 2 == 1
        pairs = random_maps(rng, c, no_class)
        if all((t == IGN).all() for _, t in pairs):
            continue
        meter = SegmentationMeter(c)
        for pred, target in pairs:
            meter.update(pred, target)
        ours = meter.compute()
        absent += any(v is None for v in ours["iou"])

        pix_acc, miou = gluoncv_segmentation(pairs, c)
        assert abs(ours["pixel_accuracy"] - pix_acc) < 1e-9 and abs(ours["miou"] - miou) < 1e-9

        # torchmetrics: a "no class" prediction is an extra class C that no target has
        preds = torch.cat([torch.from_numpy(np.where(p == IGN, c, p)).flatten() for p, _ in pairs])
        targets = torch.cat([torch.from_numpy(t).flatten() for _, t in pairs])
        confusion = multiclass_confusion_matrix(preds, targets, c + 1, ignore_index=IGN).numpy()
        assert (confusion[:c] == meter.confusion).all() and not confusion[c].any()
        # the reductions in float64 on its exact counts: IoU_c, the mean over classes with a union
        # (torchmetrics' macro weights) and the pixel accuracy
        counts = confusion[:c].astype(np.float64)
        inter = np.diag(counts[:, :c])
        union = counts.sum(1) + counts[:, :c].sum(0) - inter
        assert abs(ours["miou_present"] - np.mean(inter[union > 0] / union[union > 0])) < 1e-9
        assert abs(ours["pixel_accuracy"] - inter.sum() / counts.sum()) < 1e-9
        if not no_class:  # torchmetrics' own reductions, which it computes in float32
            assert ours["miou_present"] == pytest.approx(
                multiclass_jaccard_index(preds, targets, c, average="macro", ignore_index=IGN).item(), abs=1e-6)
            assert ours["pixel_accuracy"] == pytest.approx(
                multiclass_accuracy(preds, targets, c, average="micro", ignore_index=IGN).item(), abs=1e-6)
            per_class = multiclass_jaccard_index(preds, targets, c, average="none", ignore_index=IGN)
            assert [0.0 if v is None else v for v in ours["iou"]] == pytest.approx(per_class.tolist(), abs=1e-6)
    assert absent >= 20  # cases where the two mIoU conventions differ
