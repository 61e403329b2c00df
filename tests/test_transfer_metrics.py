"""VOC AP and ADE20K pixel accuracy / mIoU on cases computed by hand (in the comments)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_src import params as params_mod
from pipeline_src.report.paper import load_paper_numbers
from pipeline_src.report.results import Results
from pipeline_src.report.tables import transfer_table
from pipeline_src.transfer.metrics import (
    AP_METRICS,
    Detection,
    GroundTruth,
    SegmentationMeter,
    box_iou,
    evaluate_detections,
    match_class,
    voc_ap,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]


def gt(boxes, labels, difficult=None) -> GroundTruth:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return GroundTruth(boxes, np.asarray(labels, dtype=np.int64), difficult)


def det(image_id, label, score, box) -> Detection:
    return Detection(image_id, label, score, tuple(float(v) for v in box))


# Four cats (one per image, [10, 10, 50, 50]) and one dog.
FOUR = {
    "a": gt([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1]),
    "b": gt([[10, 10, 50, 50]], [0]),
    "c": gt([[10, 10, 50, 50]], [0]),
    "d": gt([[10, 10, 50, 50]], [0]),
}


def test_box_iou_is_continuous_and_matches_the_devkit_plus_one_on_raw_coordinates():
    # Raw VOC boxes (1, 1, 10, 10) and (6, 1, 15, 10): the devkit's inclusive IoU is
    # (5 * 10) / (100 + 100 - 50) = 1/3. Converted (x1 - 1, y1 - 1, x2, y2) they are
    # [0, 0, 10, 10] and [5, 0, 15, 10]: continuous IoU 50 / 150 = 1/3, no "+1" needed.
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([5, 0, 15, 10]))[0] == pytest.approx(1 / 3)
    assert box_iou(np.array([[0, 0, 10, 10]]), np.array([20, 20, 30, 30]))[0] == 0.0


def test_perfect_detector_has_map_one():
    dets = [det(k, 0, 0.9 - 0.1 * i, [10, 10, 50, 50]) for i, k in enumerate("abcd")]
    dets.append(det("a", 1, 0.5, [60, 60, 90, 90]))
    for metric in ("voc07", "all_point"):
        result = evaluate_detections(dets, FOUR, CLASSES, metric=metric)
        assert result["ap"] == {"cat": 1.0, "dog": 1.0}
        assert result["map"] == 1.0
        assert result["num_positives"] == {"cat": 4, "dog": 1}


def test_one_false_positive_at_the_top_lowers_ap_to_four_fifths():
    # Ranking for cat: FP (0.99, empty region), then the 4 TPs.
    # cumulative (tp, fp): (0,1) (1,1) (2,1) (3,1) (4,1)
    # recall:     0   .25  .5   .75  1
    # precision:  0   1/2  2/3  3/4  4/5
    # 11-point: for every t in {0, .1, ..., 1} the best precision at recall >= t is 4/5 -> AP = 0.8,
    # i.e. 0.2 below the perfect detector; all-point: the envelope is 4/5 on (0, 1] -> 0.8 too.
    dets = [det("b", 0, 0.99, [60, 60, 90, 90])]
    dets += [det(k, 0, 0.9 - 0.1 * i, [10, 10, 50, 50]) for i, k in enumerate("abcd")]
    assert evaluate_detections(dets, FOUR, CLASSES)["ap"]["cat"] == pytest.approx(0.8)
    assert evaluate_detections(dets, FOUR, CLASSES, metric="all_point")["ap"]["cat"] == pytest.approx(0.8)
    # mAP over cat (0.8) and dog (no detections: recall never reaches any t > 0, AP 0) = 0.4
    assert evaluate_detections(dets, FOUR, CLASSES)["map"] == pytest.approx(0.4)


def test_voc07_and_all_point_differ_on_a_small_ranking():
    # 3 cats, ranking TP, FP, TP (one cat missed).
    # recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3.
    # 11-point: t = 0, .1, .2, .3 -> max precision at recall >= t is 1 (4 points);
    #   t = .4, .5, .6 -> 2/3 (3 points); t >= .7 -> 0. AP = (4 + 3 * 2/3) / 11 = 6/11.
    # all-point: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 0 after -> 1/3 + 2/9 = 5/9.
    truth = {k: gt([[0, 0, 10, 10]], [0]) for k in "xyz"}
    dets = [det("x", 0, 0.9, [0, 0, 10, 10]), det("x", 0, 0.8, [20, 20, 30, 30]), det("y", 0, 0.7, [0, 0, 10, 10])]
    assert evaluate_detections(dets, truth, ["cat"])["ap"]["cat"] == pytest.approx(6 / 11)
    assert evaluate_detections(dets, truth, ["cat"], metric="all_point")["ap"]["cat"] == pytest.approx(5 / 9)


def test_voc07_uses_gluoncvs_thresholds_and_voc07_exact_the_exact_tenths():
    # 10 positives, 3 TPs at the top: recall 0.1, 0.2, 0.3 at precision 1. voc07 thresholds are
    # np.arange(0., 1.1, 0.1), whose 0.30000000000000004 the recall 3/10 does not reach: t = 0, .1, .2
    # -> 3/11. voc07_exact's t = 3/10 is reached: 4/11.
    recall = np.array([1, 2, 3]) / 10
    assert voc_ap(recall, np.ones(3)) == pytest.approx(3 / 11)
    assert voc_ap(recall, np.ones(3), metric="voc07_exact") == pytest.approx(4 / 11)
    # The same at a top recall of 6/10 (t = 0.6000000000000001 missed: 6/11 against 7/11) and of
    # 7/10 (t = 0.7000000000000001 missed: 7/11 against 8/11).
    for top in (6, 7):
        recall = np.arange(1, top + 1) / 10
        assert voc_ap(recall, np.ones(top)) == pytest.approx(top / 11)
        assert voc_ap(recall, np.ones(top), metric="voc07_exact") == pytest.approx((top + 1) / 11)
    assert voc_ap(np.array([]), np.array([])) == 0.0
    with pytest.raises(ValueError, match="metric"):
        voc_ap(recall, np.ones(top), metric="coco")


def test_difficult_objects_are_neither_misses_nor_false_positives():
    # One image: A normal, B difficult (detected, first in the ranking), C difficult (missed).
    # Ignored correctly: ranking B (ignored), A (TP) -> recall 1 at precision 1, AP 1.
    # Were difficult boxes misses: recall 1/3 -> AP 4/11. Were the two detections on B false
    # positives: precision 1/3 at recall 1 -> AP 1/3.
    truth = {"a": gt([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 70, 70]], [0, 0, 0], [False, True, True])}
    dets = [det("a", 0, 0.9, [20, 20, 40, 40]), det("a", 0, 0.85, [21, 21, 40, 40]), det("a", 0, 0.8, [0, 0, 10, 10])]
    matches = match_class(dets, truth, 0)
    assert matches.num_positives == 1
    assert matches.tp.tolist() == [False, False, True]
    assert matches.fp.tolist() == [False, False, False]  # both detections on B (even the second) ignored
    assert evaluate_detections(dets, truth, ["cat"])["ap"]["cat"] == 1.0


def test_iou_of_exactly_one_half_is_a_match():
    # GT [0, 0, 10, 10] (area 100); detection [0, 0, 10, 5]: IoU = 50 / 100 = 0.5 exactly.
    # The devkit matches when ovmax >= 0.5 (as GluonCV does), so it is a TP and AP = 1;
    # [0, 0, 10, 4] has IoU 0.4 and is a FP (AP 0).
    truth = {"a": gt([[0, 0, 10, 10]], [0])}
    assert box_iou(truth["a"].boxes, np.array([0, 0, 10, 5]))[0] == 0.5
    at_half = match_class([det("a", 0, 0.9, [0, 0, 10, 5])], truth, 0)
    assert at_half.tp.tolist() == [True] and at_half.fp.tolist() == [False]
    assert evaluate_detections([det("a", 0, 0.9, [0, 0, 10, 5])], truth, ["cat"])["ap"]["cat"] == 1.0
    assert evaluate_detections([det("a", 0, 0.9, [0, 0, 10, 4])], truth, ["cat"])["ap"]["cat"] == 0.0


def test_duplicate_detection_is_a_false_positive():
    # GT A and B; ranking A (TP), A again (FP: A is already matched), B (TP).
    # recall .5, .5, 1; precision 1, 1/2, 2/3.
    # 11-point: t = 0 .. .5 (6 points) -> 1; t = .6 .. 1 (5 points) -> 2/3. AP = (6 + 10/3) / 11 = 28/33.
    truth = {"a": gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])}
    dets = [det("a", 0, 0.9, [0, 0, 10, 10]), det("a", 0, 0.8, [0, 0, 10, 10]), det("a", 0, 0.7, [20, 20, 30, 30])]
    matches = match_class(dets, truth, 0)
    assert matches.tp.tolist() == [True, False, True]
    assert matches.fp.tolist() == [False, True, False]
    assert evaluate_detections(dets, truth, ["cat"])["ap"]["cat"] == pytest.approx(28 / 33)


def test_ranking_is_by_descending_score_not_input_order():
    # Same detections as the duplicate test, shuffled: the result must not change.
    truth = {"a": gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])}
    dets = [det("a", 0, 0.7, [20, 20, 30, 30]), det("a", 0, 0.8, [0, 0, 10, 10]), det("a", 0, 0.9, [0, 0, 10, 10])]
    assert match_class(dets, truth, 0).scores.tolist() == [0.9, 0.8, 0.7]
    assert evaluate_detections(dets, truth, ["cat"])["ap"]["cat"] == pytest.approx(28 / 33)


def test_tied_scores_keep_their_input_order_by_default():
    # Two detections of one cat, tied at 0.9: the first listed is the TP, the second the duplicate FP.
    # Ranking TP, FP: AP 1. Listed the other way round (a FP without overlap first): FP, TP, AP 1/2.
    truth = {"a": gt([[0, 0, 10, 10]], [0])}
    hit, miss = det("a", 0, 0.9, [0, 0, 10, 10]), det("a", 0, 0.9, [20, 20, 30, 30])
    assert evaluate_detections([hit, miss], truth, ["cat"])["ap"]["cat"] == 1.0
    assert evaluate_detections([miss, hit], truth, ["cat"])["ap"]["cat"] == 0.5
    assert evaluate_detections([miss, hit], truth, ["cat"])["ties"] == "stable"
    with pytest.raises(ValueError, match="tie order"):
        evaluate_detections([hit], truth, ["cat"], ties="random")


def test_detection_on_an_image_without_that_class_is_false_positive_and_classes_without_truth_are_left_out():
    # Dog detected where only cats are: FP. Class "bird" has no ground truth: AP None, not in the mean.
    truth = {"a": gt([[0, 0, 10, 10]], [0]), "b": gt([[0, 0, 10, 10]], [1])}
    dets = [det("a", 1, 0.9, [0, 0, 10, 10]), det("b", 1, 0.8, [0, 0, 10, 10]), det("a", 0, 0.5, [0, 0, 10, 10])]
    result = evaluate_detections(dets, truth, ["cat", "dog", "bird"])
    # dog: FP then TP -> recall 1 at precision 1/2 -> AP 1/2; cat 1; mAP (1 + 1/2) / 2
    assert result["ap"] == {"cat": 1.0, "dog": 0.5, "bird": None}
    assert result["map"] == pytest.approx(0.75)


def test_unknown_image_or_label_is_an_error():
    with pytest.raises(ValueError, match="unknown image id 'zz'"):
        evaluate_detections([det("zz", 0, 0.9, [0, 0, 1, 1])], FOUR, CLASSES)
    with pytest.raises(ValueError, match="label 5"):
        evaluate_detections([det("a", 5, 0.9, [0, 0, 1, 1])], FOUR, CLASSES)


IGN = 255


def test_pixel_accuracy_and_miou_by_hand_with_ignored_pixels():
    target = np.array([[0, 0, 1, IGN],
                       [1, 2, 2, IGN]])
    pred = np.array([[0, 1, 1, 2],
                     [1, 2, 0, 0]])
    # 6 labelled pixels, 4 correct -> pixel accuracy 2/3 (the ignored column is not counted).
    # class 0: target {(0,0),(0,1)}, pred {(0,0),(1,2)}: I 1, U 3 -> 1/3
    # class 1: target {(0,2),(1,0)}, pred {(0,1),(0,2),(1,0)}: I 2, U 3 -> 2/3
    # class 2: target {(1,1),(1,2)}, pred {(1,1)} (the pred 2 at an ignored pixel is dropped): I 1, U 2 -> 1/2
    # mIoU = (1/3 + 2/3 + 1/2) / 3 = 1/2
    meter = SegmentationMeter(3)
    meter.update(torch.from_numpy(pred), torch.from_numpy(target))
    scores = meter.compute()
    assert scores["pixel_accuracy"] == pytest.approx(2 / 3)
    assert scores["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert scores["miou"] == pytest.approx(0.5) and scores["miou_present"] == pytest.approx(0.5)
    assert scores["labelled_pixels"] == 6


def test_miou_accumulates_over_the_dataset_and_counts_absent_classes_as_zero():
    # image 1: target [0, 0], pred [0, 0]; image 2: target [0, 1], pred [1, 1]; class 2 never appears.
    # summed: class 0 I 2, U 3 -> 2/3; class 1 I 1, U 2 -> 1/2; class 2 U 0.
    # GluonCV's mIoU over all 3 classes: (2/3 + 1/2 + 0) / 3 = 7/18; over the 2 present: 7/12
    # (a mean of per-image mIoUs would give (1 + 1/4) / 2 = 5/8). Pixel accuracy 3/4.
    meter = SegmentationMeter(3)
    meter.update(np.array([0, 0]), np.array([0, 0]))
    meter.update(np.array([1, 1]), np.array([0, 1]))
    scores = meter.compute()
    assert scores["iou"][:2] == pytest.approx([2 / 3, 1 / 2]) and scores["iou"][2] is None
    assert scores["miou"] == pytest.approx(7 / 18)
    assert scores["miou_present"] == pytest.approx(7 / 12)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 4)
    meter.reset()
    with pytest.raises(ValueError, match="no labelled pixels"):
        meter.compute()


def test_no_class_prediction_counts_as_wrong_and_bad_values_are_errors():
    # target [0, 0], pred [0, no class]: accuracy 1/2, class 0 I 1, U 2 -> 1/2; class 1 U 0.
    meter = SegmentationMeter(2)
    meter.update(np.array([0, IGN]), np.array([0, 0]))
    scores = meter.compute()
    assert scores["pixel_accuracy"] == 0.5
    assert scores["miou"] == 0.25 and scores["miou_present"] == 0.5
    with pytest.raises(ValueError, match="prediction holds values"):
        meter.update(np.array([2]), np.array([0]))
    with pytest.raises(ValueError, match="target holds values"):
        meter.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="shape"):
        meter.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_table9_names_the_miou_convention_it_reports(tmp_path):
    spec = load_paper_numbers()["tables"]["table9"]
    table = transfer_table(spec, Results(tmp_path, [0], {}, "params.yaml"), set())[1]
    assert "mIoU (mean over all classes) ours" in table.headers


def test_params_accept_exactly_the_ap_metrics():
    for metric in AP_METRICS:
        params = params_mod.load(REPO / "params.yaml", [f"transfer.detection.metric={metric}"])
        assert params["transfer"]["detection"]["metric"] == metric
    with pytest.raises(params_mod.ParamsError, match="transfer.detection.metric"):
        params_mod.load(REPO / "params.yaml", ["transfer.detection.metric=coco"])
