"""Tests for enki_seg/evaluation/instance_matching.py on small label images counted by hand."""

import numpy as np
import pytest

from enki_seg.evaluation.instance_matching import (
    THRESHOLDS,
    InstanceMatching,
    iou_matrix,
    match_dataset,
    match_image,
    matched_pairs,
)

LOW = THRESHOLDS[:5]  # 0.5 ... 0.7
HIGH = THRESHOLDS[5:]  # 0.75 ... 0.95


def split_object():
    """One true 4x4 object predicted as a 4x3 piece (IoU 12/16 = 0.75) and a 4x1 piece (IoU 0.25)."""
    true, predicted = np.zeros((6, 8), np.int32), np.zeros((6, 8), np.int32)
    true[1:5, 1:5] = 1
    predicted[1:5, 1:4] = 7
    predicted[1:5, 4:5] = 3
    return true, predicted


def merged_objects():
    """True objects of 24 and 8 pixels predicted as one 32-pixel object (IoU 0.75 and 0.25)."""
    true, predicted = np.zeros((6, 10), np.uint16), np.zeros((6, 10), np.uint16)
    true[1:5, 1:7] = 1
    true[1:5, 7:9] = 2
    predicted[1:5, 1:9] = 5
    return true, predicted


def counts(result: InstanceMatching, threshold: float) -> tuple[int, int, int]:
    scores = result.at(threshold)
    return scores.true_positives, scores.false_positives, scores.false_negatives


def assert_scores(scores, **expected):
    for name, value in expected.items():
        assert getattr(scores, name) == pytest.approx(value), name


def test_thresholds_are_the_dsb_list():
    assert THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_split_object():
    result = match_image(*split_object())
    for threshold in LOW:  # the large piece matches, the small one is a false positive
        assert counts(result, threshold) == (1, 1, 0)
        assert_scores(result.at(threshold), precision=0.5, recall=1.0, f1=2 / 3, accuracy=0.5,
                      mean_matched_iou=0.75, panoptic_quality=0.5)
    for threshold in HIGH:  # 0.75 is exactly the IoU: not a match
        assert counts(result, threshold) == (0, 2, 1)
        assert_scores(result.at(threshold), precision=0.0, recall=0.0, f1=0.0, accuracy=0.0,
                      mean_matched_iou=0.0, panoptic_quality=0.0)
    assert result.dsb_score == pytest.approx(0.25)  # (5 x 0.5 + 5 x 0) / 10
    assert result.num_images == 1 and result.thresholds == THRESHOLDS


def test_merged_objects():
    result = match_image(*merged_objects())
    for threshold in LOW:  # the merged prediction matches the larger object; the smaller is missed
        assert counts(result, threshold) == (1, 0, 1)
        assert_scores(result.at(threshold), precision=1.0, recall=0.5, f1=2 / 3, accuracy=0.5,
                      mean_matched_iou=0.75, panoptic_quality=0.5)
    for threshold in HIGH:
        assert counts(result, threshold) == (0, 1, 2)
    assert result.dsb_score == pytest.approx(0.25)


def test_threshold_exactly_at_the_iou_is_no_match():
    true, predicted = np.zeros((4, 7), np.int32), np.zeros((4, 7), np.int32)
    true[1:3, 1:6] = 4  # 10 pixels
    predicted[1:3, 1:4] = 9  # 6 of them: IoU 0.6
    result = match_image(true, predicted, thresholds=[0.55, 0.6, 0.65])
    assert [counts(result, t) for t in (0.55, 0.6, 0.65)] == [(1, 0, 0), (0, 1, 1), (0, 1, 1)]
    assert result.dsb_score == pytest.approx(1 / 3)
    halves = np.zeros((4, 7), np.int32)
    halves[1:3, 1:3], halves[1:3, 3:5] = 1, 2
    whole = (halves > 0).astype(np.int32)  # each half has IoU 4/8 = 0.5 with the whole
    assert counts(match_image(whole, halves), 0.5) == (0, 2, 1)


def test_perfect_match_with_other_ids_and_no_background():
    true = np.repeat(np.arange(1, 5, dtype=np.int64), 4).reshape(4, 4)  # every pixel is an object
    predicted = (true * 1000 + 17).astype(np.uint32)
    result = match_image(true, predicted)
    for scores in result.scores:
        assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (4, 0, 0)
        assert_scores(scores, f1=1.0, accuracy=1.0, mean_matched_iou=1.0, panoptic_quality=1.0)
    assert result.dsb_score == 1.0


def test_empty_images():
    empty = np.zeros((5, 5), np.int32)
    objects = np.zeros((5, 5), np.int32)
    objects[0:2, 0:2], objects[3:5, 3:5] = 1, 2

    both_empty = match_image(empty, empty)  # nothing to find, nothing found: perfect
    for scores in both_empty.scores:
        assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (0, 0, 0)
        assert_scores(scores, precision=1.0, recall=1.0, f1=1.0, accuracy=1.0, mean_matched_iou=1.0,
                      panoptic_quality=1.0)
    assert both_empty.dsb_score == 1.0

    nothing_predicted = match_image(objects, empty)
    assert counts(nothing_predicted, 0.5) == (0, 0, 2)
    assert_scores(nothing_predicted.at(0.5), precision=0.0, recall=0.0, f1=0.0, accuracy=0.0,
                  mean_matched_iou=0.0, panoptic_quality=0.0)
    assert nothing_predicted.dsb_score == 0.0

    nothing_true = match_image(empty, objects)
    assert counts(nothing_true, 0.5) == (0, 2, 0)
    assert_scores(nothing_true.at(0.5), precision=0.0, recall=0.0, accuracy=0.0)
    assert nothing_true.dsb_score == 0.0


def test_dataset_sums_counts_and_averages_dsb_scores():
    empty = np.zeros((3, 3), np.int32)
    images = [match_image(*split_object()), match_image(*merged_objects()), match_image(empty, empty)]
    folder = match_dataset(images)
    assert folder.num_images == 3
    assert counts(folder, 0.5) == (2, 1, 1)  # (1, 1, 0) + (1, 0, 1) + (0, 0, 0)
    assert_scores(folder.at(0.5), precision=2 / 3, recall=2 / 3, accuracy=0.5, mean_matched_iou=0.75,
                  panoptic_quality=0.5)
    assert counts(folder, 0.9) == (0, 3, 3)
    assert folder.dsb_score == pytest.approx((0.25 + 0.25 + 1.0) / 3)  # the mean of per-image scores
    assert match_dataset([folder, images[0]]).num_images == 4
    row = folder.to_dict()
    assert row["dsb_score"] == folder.dsb_score and len(row["thresholds"]) == 10
    assert row["thresholds"][0]["true_positives"] == 2 and row["thresholds"][0]["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="different thresholds"):
        match_dataset([images[0], match_image(*split_object(), thresholds=[0.5])])
    with pytest.raises(ValueError, match="at least one"):
        match_dataset([])


def test_iou_matrix_equals_mask_by_mask_iou():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 6, (30, 40)) * 3  # ids 0, 3, ..., 15 scattered: many overlapping pairs
    predicted = rng.integers(0, 5, (30, 40)) + 10 * (rng.random((30, 40)) < 0.5)
    iou, true_ids, predicted_ids = iou_matrix(true, predicted)
    np.testing.assert_array_equal(true_ids, [3, 6, 9, 12, 15])
    np.testing.assert_array_equal(predicted_ids, [1, 2, 3, 4, 10, 11, 12, 13, 14])
    for row, true_id in enumerate(true_ids):
        for column, predicted_id in enumerate(predicted_ids):
            a, b = true == true_id, predicted == predicted_id
            assert iou[row, column] == pytest.approx((a & b).sum() / (a | b).sum())


def test_hungarian_matching_below_one_half():
    # greedy by IoU would take (0, 0) and leave true object 1 without a partner: the optimum has two
    iou = np.array([[0.45, 0.4], [0.4, 0.0]])
    rows, columns = matched_pairs(iou, 0.3)
    assert sorted(zip(rows.tolist(), columns.tolist())) == [(0, 1), (1, 0)]
    rows, columns = matched_pairs(iou, 0.42)  # only one candidate left
    assert list(zip(rows.tolist(), columns.tolist())) == [(0, 0)]
    # equal counts: the larger summed IoU wins
    rows, columns = matched_pairs(np.array([[0.35, 0.45], [0.45, 0.35]]), 0.3)
    assert sorted(zip(rows.tolist(), columns.tolist())) == [(0, 1), (1, 0)]
    rows, columns = matched_pairs(np.zeros((0, 3)), 0.3)
    assert rows.size == columns.size == 0


def test_four_hundred_objects():
    true = np.zeros((240, 241), np.int32)
    ids = np.random.default_rng(1).permutation(400) * 7 + 5  # arbitrary, non-consecutive ids
    for k in range(400):
        row, column = divmod(k, 20)
        true[12 * row : 12 * row + 8, 12 * column : 12 * column + 8] = ids[k]
    predicted = np.roll(true, 1, axis=1)  # shifted one column: IoU 56 / 72 = 0.78 for every object
    result = match_image(true, predicted)
    assert all(counts(result, t) == (400, 0, 0) for t in THRESHOLDS[:6])
    assert all(counts(result, t) == (0, 400, 400) for t in THRESHOLDS[6:])
    assert result.at(0.5).mean_matched_iou == pytest.approx(56 / 72)
    assert result.dsb_score == pytest.approx(0.6)


def test_bad_inputs():
    labels = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="shape"):
        match_image(labels, np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match=">= 0"):
        match_image(labels - 1, labels)
    with pytest.raises(TypeError, match="integer"):
        match_image(labels.astype(np.float32), labels)
    with pytest.raises(ValueError, match="thresholds"):
        match_image(labels, labels, thresholds=[1.0])
    with pytest.raises(KeyError, match="0.42"):
        match_image(labels, labels).at(0.42)
