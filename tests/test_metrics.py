"""Segmentation metrics against hand-computed confusion matrices; JSON/CSV output."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from enki_seg.evaluation.metrics import (CSV_COLUMNS, ConfusionAccumulator, SegmentationMetrics, confusion_matrix,
                     format_table, read_json, segmentation_metrics, write_csv, write_json)

# Rows = truth, columns = prediction. Classes 0..2 occur; class 3 ("absent") occurs nowhere.
#   class 0: TP 6, FP 1+1=2, FN 2    -> precision 6/8, recall 6/8, f1 12/16, iou 6/10
#   class 1: TP 3, FP 2+1=3, FN 1    -> precision 3/6, recall 3/4, f1 6/10,  iou 3/7
#   class 2: TP 2, FP 0,     FN 1+1  -> precision 2/2, recall 2/4, f1 4/6,   iou 2/4
#   class 3: TP = FP = FN = 0        -> NaN everywhere, excluded from macro averages
HAND_CM = np.array([[6, 2, 0, 0],
                    [1, 3, 0, 0],
                    [1, 1, 2, 0],
                    [0, 0, 0, 0]])
NAMES = ["background", "cell", "edge", "absent"]
NAN = math.nan
HAND_PER_CLASS = {
    "precision": [6 / 8, 3 / 6, 2 / 2, NAN],
    "recall": [6 / 8, 3 / 4, 2 / 4, NAN],
    "f1": [12 / 16, 6 / 10, 4 / 6, NAN],
    "iou": [6 / 10, 3 / 7, 2 / 4, NAN],
}
# Support 8, 4, 4 (total 16); trace 11.
HAND_AVERAGES = {
    # summed TP 11, FP 5, FN 5
    "micro": {"precision": 11 / 16, "recall": 11 / 16, "f1": 22 / 32, "iou": 11 / 21},
    # mean over the three classes that occur
    "macro": {"precision": (6 / 8 + 3 / 6 + 1) / 3, "recall": (6 / 8 + 3 / 4 + 2 / 4) / 3,
              "f1": (12 / 16 + 6 / 10 + 4 / 6) / 3, "iou": (6 / 10 + 3 / 7 + 2 / 4) / 3},
    # weights 8/16, 4/16, 4/16
    "weighted": {"precision": (8 * 6 / 8 + 4 * 3 / 6 + 4 * 1) / 16,
                 "recall": (8 * 6 / 8 + 4 * 3 / 4 + 4 * 2 / 4) / 16,
                 "f1": (8 * 12 / 16 + 4 * 6 / 10 + 4 * 4 / 6) / 16,
                 "iou": (8 * 6 / 10 + 4 * 3 / 7 + 4 * 2 / 4) / 16},
}


def _labels_from_matrix(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (truth, prediction) uint8 pixel lists that realise ``cm``."""
    truth, prediction = [], []
    for t, p in np.ndindex(cm.shape):
        truth += [t] * cm[t, p]
        prediction += [p] * cm[t, p]
    order = np.random.default_rng(0).permutation(len(truth))
    return np.array(truth, np.uint8)[order], np.array(prediction, np.uint8)[order]


def test_confusion_matrix_counts_pairs_any_shape():
    truth, prediction = _labels_from_matrix(HAND_CM)
    cm = confusion_matrix(truth.reshape(2, 8), prediction.reshape(2, 8), 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, HAND_CM)
    # uint8 * K must not wrap around
    big = confusion_matrix(np.array([255], np.uint8), np.array([200], np.uint8), 256)
    assert big[255, 200] == 1 and big.sum() == 1
    np.testing.assert_array_equal(confusion_matrix(np.zeros(0, int), np.zeros(0, int), 2), 0)


def test_hand_example_per_class_absent_class_and_averages():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/0 for the absent class must not warn
        metrics = segmentation_metrics(HAND_CM, NAMES)
    for score, expected in HAND_PER_CLASS.items():
        np.testing.assert_allclose(getattr(metrics, score), expected, equal_nan=True)
    np.testing.assert_array_equal(metrics.dice, metrics.f1)  # dice == f1 on a confusion matrix
    np.testing.assert_array_equal(metrics.support, [8, 4, 4, 0])
    for average, expected in HAND_AVERAGES.items():
        for score, value in expected.items():
            assert metrics.averages[average][score] == pytest.approx(value), (average, score)
        assert metrics.averages[average]["dice"] == metrics.averages[average]["f1"]
        assert metrics.averages[average]["support"] == 16
    assert metrics.accuracy == pytest.approx(11 / 16)
    assert metrics.mean_iou == pytest.approx(HAND_AVERAGES["macro"]["iou"])
    assert metrics.foreground_iou == pytest.approx((3 / 7 + 2 / 4) / 2)  # class 3 excluded
    # the same numbers as a 3-class problem without the absent class: it changed no average
    three = segmentation_metrics(HAND_CM[:3, :3])
    for average in HAND_AVERAGES:
        assert three.averages[average] == pytest.approx(metrics.averages[average])


def test_class_only_predicted_or_only_in_truth_scores_zero_not_nan():
    # class 2 is predicted once but never true; class 1 is true once but never predicted
    metrics = segmentation_metrics(np.array([[5, 0, 1], [1, 0, 0], [0, 0, 0]]))
    assert metrics.precision[1] == 0 and metrics.recall[1] == 0 and metrics.iou[1] == 0
    assert metrics.precision[2] == 0 and metrics.recall[2] == 0 and metrics.iou[2] == 0
    assert metrics.averages["macro"]["iou"] == pytest.approx((5 / 7 + 0 + 0) / 3)


def test_perfect_prediction_scores_one():
    labels = np.random.default_rng(1).integers(0, 3, (2, 16, 16))
    metrics = segmentation_metrics(confusion_matrix(labels, labels, 3))
    for score in ("precision", "recall", "f1", "iou", "dice"):
        np.testing.assert_array_equal(getattr(metrics, score), 1.0)
        for average in ("micro", "macro", "weighted"):
            assert metrics.averages[average][score] == 1.0
    assert metrics.accuracy == metrics.mean_iou == metrics.foreground_iou == 1.0


def test_all_wrong_binary_scores_zero():
    truth = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    metrics = segmentation_metrics(confusion_matrix(truth, 1 - truth, 2))
    np.testing.assert_array_equal(metrics.confusion, [[0, 5], [3, 0]])
    for score in ("precision", "recall", "f1", "iou"):
        np.testing.assert_array_equal(getattr(metrics, score), 0.0)
        for average in ("micro", "macro", "weighted"):
            assert metrics.averages[average][score] == 0.0
    assert metrics.accuracy == metrics.foreground_iou == 0.0


def test_micro_macro_weighted_differ_on_imbalanced_binary():
    # 95 background pixels (90 right), 5 foreground pixels (2 right), 3 background pixels predicted fg
    #   class 0: TP 90, FP 3, FN 5 -> iou 90/98, precision 90/93; class 1: TP 2, FP 5, FN 3 -> iou 2/10
    metrics = segmentation_metrics(np.array([[90, 5], [3, 2]]))
    iou = {"micro": 92 / 108,  # summed TP 92, FP 8, FN 8
           "macro": (90 / 98 + 2 / 10) / 2,
           "weighted": (95 * 90 / 98 + 5 * 2 / 10) / 100}  # support 95 and 5
    for average, value in iou.items():
        assert metrics.averages[average]["iou"] == pytest.approx(value)
    assert len({round(metrics.averages[a]["iou"], 6) for a in iou}) == 3
    assert metrics.averages["macro"]["precision"] == pytest.approx((90 / 93 + 2 / 7) / 2)
    assert metrics.averages["weighted"]["recall"] == pytest.approx(0.92)  # == accuracy, always
    assert metrics.foreground_iou == pytest.approx(0.2)


def test_ignore_label_and_out_of_range_errors():
    truth = np.array([[0, 1, 255], [1, 255, 2]], np.uint8)
    prediction = np.array([[0, 2, 1], [1, 0, 2]], np.uint8)
    cm = confusion_matrix(truth, prediction, 3, ignore_label=255)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"truth label 255 is outside \[0, 3\)"):
        confusion_matrix(truth, prediction, 3)
    with pytest.raises(ValueError, match=r"prediction label 7 is outside"):
        confusion_matrix(np.array([0, 1]), np.array([7, 1]), 3)
    with pytest.raises(ValueError, match=r"truth label -1 "):
        confusion_matrix(np.array([-1, 1]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 3)
    with pytest.raises(TypeError, match="float"):
        confusion_matrix(np.zeros(3), np.zeros(3, int), 3)
    with pytest.raises(ValueError, match="2 class names"):
        segmentation_metrics(HAND_CM, ["a", "b"])


def test_accumulator_sums_batches_and_resets():
    truth, prediction = _labels_from_matrix(HAND_CM)
    accumulator = ConfusionAccumulator(4, class_names=NAMES)
    accumulator.update(truth[:7], prediction[:7])
    accumulator.update_matrix(confusion_matrix(truth[7:], prediction[7:], 4))
    np.testing.assert_array_equal(accumulator.matrix, HAND_CM)
    result = accumulator.result()
    assert isinstance(result, SegmentationMetrics) and result.class_names == NAMES
    assert result.accuracy == pytest.approx(11 / 16)
    with pytest.raises(ValueError, match="shape"):
        accumulator.update_matrix(np.zeros((3, 3), int))
    accumulator.reset()
    assert accumulator.matrix.sum() == 0 and math.isnan(accumulator.result().accuracy)


def test_json_round_trip_with_null(tmp_path):
    metrics = segmentation_metrics(HAND_CM, NAMES)
    path = write_json(metrics, tmp_path / "metrics.json")
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)  # strict JSON
    assert data["classes"]["absent"]["iou"] is None and data["classes"]["absent"]["support"] == 0
    assert data["classes"]["cell"]["iou"] == pytest.approx(3 / 7)
    assert data["averages"]["macro"]["iou"] == pytest.approx(HAND_AVERAGES["macro"]["iou"])
    assert data["confusion_matrix"] == HAND_CM.tolist()
    again = read_json(path)
    assert again.class_names == NAMES
    np.testing.assert_array_equal(again.iou, metrics.iou)  # NaN compares equal here
    assert again.to_dict()["averages"] == metrics.to_dict()["averages"]


def test_csv_rows_and_table(tmp_path):
    metrics = segmentation_metrics(HAND_CM, NAMES)
    with open(write_csv(metrics, tmp_path / "metrics.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["kind"], r["name"]) for r in rows] == [("class", n) for n in NAMES] + [
        ("average", "micro"), ("average", "macro"), ("average", "weighted")]
    absent = rows[3]
    assert absent["precision"] == absent["iou"] == "" and absent["support"] == "0"
    assert float(rows[1]["iou"]) == 3 / 7 and rows[0]["support"] == "8"
    assert float(rows[5]["f1"]) == pytest.approx(HAND_AVERAGES["macro"]["f1"])

    table = format_table(metrics)
    lines = table.splitlines()
    assert len({len(line) for line in lines[:-1]}) == 1  # fixed width
    assert lines[0].split() == ["class", "precision", "recall", "f1", "iou", "dice", "support"]
    assert lines[5].split()[1:] == ["nan"] * 5 + ["0"]
    assert [line.split()[0] for line in lines[7:10]] == ["micro", "macro", "weighted"]
    assert "0.6875" in lines[-1]


def test_module_imports_without_tensorflow():
    # metrics is used by inference tools that must not pay for (or need) TensorFlow.
    code = "import sys, enki_seg.evaluation.metrics; assert 'tensorflow' not in sys.modules"
    root = Path(sys.modules["enki_seg.evaluation.metrics"].__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
