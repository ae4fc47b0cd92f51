"""evaluate.py --instance 1: object matching and COCO AP of instance-label folders, counted by hand; exit codes."""

import csv
import json
import logging

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import evaluate
from enki_seg.data import image_io
from enki_seg.evaluation.instance_evaluation import InstanceEvaluation, label_detections

LOW = (0.5, 0.55, 0.6, 0.65)  # both objects of image "a" match
HIGH = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # only the exact one does


def image_a():
    """True: A 4x4 (id 1), B 4x3 (id 2). Predicted: A exactly (id 5), B as 4x2 (id 9, IoU 8/12), a 1x2
    false positive (id 3)."""
    true, predicted = np.zeros((8, 10), np.uint16), np.zeros((8, 10), np.uint16)
    true[1:5, 1:5] = 1
    true[1:5, 6:9] = 2
    predicted[1:5, 1:5] = 5
    predicted[1:5, 6:8] = 9
    predicted[6, 0:2] = 3
    return true, predicted


def image_b():
    """One true object, nothing predicted."""
    true = np.zeros((6, 6), np.uint16)
    true[2:4, 2:4] = 4
    return true, np.zeros_like(true)


@pytest.fixture
def folders(tmp_path):
    truth, predictions = tmp_path / "truth", tmp_path / "predictions"
    truth.mkdir()
    predictions.mkdir()
    for name, (true, predicted) in (("a", image_a()), ("b", image_b())):
        tifffile.imwrite(truth / f"{name}.tif", true)
        tifffile.imwrite(predictions / f"{name}.tif", predicted)
    return truth, predictions


def by_threshold(rows):
    return {round(row["threshold"], 2): row for row in rows}


def test_hand_counted_folder(folders, capsys):
    truth, predictions = folders
    assert evaluate.main(["--prediction_folder", str(predictions), "--mask_folder", str(truth), "--instance", "1"]) == 0
    scores = json.loads((predictions / "metrics.json").read_text())
    matching = scores["instance_matching"]
    summed, mean = by_threshold(matching["thresholds"]), by_threshold(matching["per_image_mean"])
    for t in LOW:  # a: TP 2, FP 1, FN 0; b: FN 1
        row = summed[t]
        assert (row["true_positives"], row["false_positives"], row["false_negatives"]) == (2, 1, 1)
        assert row["precision"] == pytest.approx(2 / 3) and row["recall"] == pytest.approx(2 / 3)
        assert row["f1"] == pytest.approx(2 / 3) and row["accuracy"] == pytest.approx(2 / 4)
        # matched IoUs 1 and 8/12: mean 5/6, times F1 2/3
        assert row["panoptic_quality"] == pytest.approx(5 / 9)
        assert mean[t]["accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    for t in HIGH:  # a: TP 1, FP 2, FN 1; b: FN 1
        row = summed[t]
        assert (row["true_positives"], row["false_positives"], row["false_negatives"]) == (1, 2, 2)
        assert row["accuracy"] == pytest.approx(1 / 5) and row["panoptic_quality"] == pytest.approx(1 / 3)
        assert mean[t]["accuracy"] == pytest.approx((1 / 4 + 0) / 2)
    dsb_a = (4 * 2 / 3 + 6 * 1 / 4) / 10
    assert matching["dsb_score"] == pytest.approx(dsb_a / 2) and matching["num_images"] == 2
    assert scores["ground_truth"] == 3 and scores["detections"] == 3 and 0 < scores["mask_AP"] < 1

    with open(predictions / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["threshold"]) for r in rows] == list(LOW + HIGH)
    assert float(rows[0]["accuracy"]) == pytest.approx(0.5)
    with open(predictions / "metrics_per_image.csv") as handle:
        per_image = {r["image"]: r for r in csv.DictReader(handle)}
    assert float(per_image["a.tif"]["dsb_score"]) == pytest.approx(dsb_a)
    assert per_image["a.tif"]["true_objects"] == "2" and per_image["a.tif"]["predicted_objects"] == "3"
    assert per_image["b.tif"]["false_negatives@0.5"] == "1" and float(per_image["b.tif"]["dsb_score"]) == 0.0

    table = capsys.readouterr().out
    assert "precision" in table and f"DSB score {dsb_a / 2:.3f}" in table and "COCO mask AP" in table
    assert " 0.50       2       1       1" in table


def test_perfect_prediction_with_other_ids_scores_one():
    true, _ = image_a()
    predicted = np.where(true == 1, 40, np.where(true == 2, 7, 0)).astype(np.int32)
    evaluation = InstanceEvaluation()
    evaluation.add("a", true, predicted)
    scores = evaluation.summary()
    assert scores["instance_matching"]["dsb_score"] == 1.0
    assert scores["mask_AP"] == pytest.approx(1.0) and scores["box_AP"] == pytest.approx(1.0)


def test_lower_ids_rank_higher_for_coco_ap():
    labels = np.zeros((5, 9), np.int32)
    labels[1:3, 1:3], labels[1:4, 5:8] = 2, 6
    boxes, scores, classes, rles = label_detections(labels)
    assert boxes.tolist() == [[1, 1, 3, 3], [1, 5, 4, 8]] and classes.tolist() == [1, 1] and len(rles) == 2
    assert scores[0] > scores[1] > 0


def test_ranking_changes_ap_but_not_matching():
    """The false positive ranked first (id 3 < 5, 9) lowers AP; renumbered to rank last, AP rises."""
    true, predicted = image_a()
    last = np.where(predicted == 3, 99, predicted)
    first, second = InstanceEvaluation(), InstanceEvaluation()
    first.add("a", true, predicted)
    second.add("a", true, last)
    first_scores, second_scores = first.summary(), second.summary()
    assert first_scores["instance_matching"] == second_scores["instance_matching"]
    assert second_scores["mask_AP50"] > first_scores["mask_AP50"]


def test_missing_counterpart_and_size_mismatch_are_reported_and_skipped(folders, caplog):
    truth, predictions = folders
    tifffile.imwrite(predictions / "c.tif", np.zeros((6, 6), np.uint16))  # no true labels named c
    tifffile.imwrite(truth / "d.tif", np.zeros((6, 6), np.uint16))
    tifffile.imwrite(predictions / "d.tif", np.zeros((5, 6), np.uint16))  # wrong size
    tifffile.imwrite(truth / "e.tif", np.zeros((6, 6), np.uint16))  # no prediction: a warning only
    with caplog.at_level(logging.INFO):
        code = evaluate.main(["--prediction_folder", str(predictions), "--mask_folder", str(truth),
                              "--instance", "1"])
    assert code == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("c.tif" in m and "no mask named c" in m for m in messages)
    assert any("d.tif" in m and "5x6" in m and "6x6" in m for m in messages)
    assert any("no prediction" in m and "e.tif" in m for m in messages)
    scores = json.loads((predictions / "metrics.json").read_text())
    assert scores["instance_matching"]["num_images"] == 2  # a and b


def test_bad_arguments_exit_2(folders, tmp_path, caplog):
    truth, predictions = folders
    with caplog.at_level(logging.ERROR):
        assert evaluate.main(["--prediction_folder", str(predictions), "--mask_folder", str(truth), "--instance", "1",
                              "--number_classes", "2"]) == 2
        assert "--number_classes and --class_names are for semantic masks" in caplog.text
        assert evaluate.main(["--prediction_folder", str(predictions), "--mask_folder", str(truth)]) == 2
        assert "--number_classes is required" in caplog.text
        assert evaluate.main(["--prediction_folder", str(tmp_path / "none"), "--mask_folder", str(truth),
                              "--instance", "1"]) == 2
        only_unmatched = tmp_path / "unmatched"
        only_unmatched.mkdir()
        tifffile.imwrite(only_unmatched / "z.tif", np.zeros((6, 6), np.uint16))
        assert evaluate.main(["--prediction_folder", str(only_unmatched), "--mask_folder", str(truth),
                              "--instance", "1"]) == 2
    assert not (only_unmatched / "metrics.json").exists()


def test_real_nuclei_against_eroded_copies(dsb2018, tmp_path):
    """Real DSB2018 labels against themselves renumbered (score 1) and eroded by a pixel (lower, matched)."""
    masks = sorted((dsb2018 / "masks").glob("*.png"))[:3]
    truth, exact, eroded = tmp_path / "truth", tmp_path / "exact", tmp_path / "eroded"
    for folder in (truth, exact, eroded):
        folder.mkdir()
    for path in masks:
        labels = image_io.read_labels(path).astype(np.int32)
        tifffile.imwrite(truth / f"{path.stem}.tif", labels)
        renumbered = np.where(labels > 0, labels.max() + 1 - labels, 0).astype(np.int32)
        tifffile.imwrite(exact / f"{path.stem}.tif", renumbered)
        inside = ndimage.grey_erosion(labels, size=3) == ndimage.grey_dilation(labels, size=3)
        tifffile.imwrite(eroded / f"{path.stem}.tif", np.where(inside, labels, 0).astype(np.int32))
    assert evaluate.main(["--prediction_folder", str(exact), "--mask_folder", str(truth), "--instance", "1"]) == 0
    scores = json.loads((exact / "metrics.json").read_text())
    assert scores["instance_matching"]["dsb_score"] == 1.0 and scores["mask_AP"] == pytest.approx(1.0)
    assert evaluate.main(["--prediction_folder", str(eroded), "--mask_folder", str(truth), "--instance", "1"]) == 0
    matching = json.loads((eroded / "metrics.json").read_text())["instance_matching"]
    at_half = by_threshold(matching["thresholds"])[0.5]
    # a one-pixel rim is most of a small nucleus: they drop out at the high thresholds first
    assert at_half["false_positives"] == at_half["false_negatives"] and at_half["recall"] > 0.85
    assert by_threshold(matching["thresholds"])[0.95]["true_positives"] == 0
    assert 0.2 < matching["dsb_score"] < 0.5
