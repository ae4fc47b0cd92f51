"""Mask R-CNN ops on hand-made inputs: boxes, anchors, RPN/ROI targets, ROIAlign, post-processing, config.

This file imports TensorFlow at module level (model tests only); every case runs on a few boxes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from models.maskrcnn import MaskRCNNConfig, paste_masks  # noqa: E402
from models.maskrcnn import box_ops  # noqa: E402
from models.maskrcnn.anchors import (anchor_counts, concat_anchors, generate_anchors,  # noqa: E402
                                     level_anchors_tf)
from models.maskrcnn.postprocess import detect_boxes  # noqa: E402
from models.maskrcnn.proposals import batched_nms, generate_proposals  # noqa: E402
from models.maskrcnn.roi_align import assign_levels, multilevel_roi_align  # noqa: E402
from models.maskrcnn.rpn import rpn_losses, rpn_targets  # noqa: E402
from models.maskrcnn.sampling import sample_positives_negatives  # noqa: E402
from models.maskrcnn.targets import mask_targets, sample_rois  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def boxes(*rows):
    return tf.constant(rows, tf.float32)


# ---- box_ops ----

def test_pairwise_iou_hand_made():
    a = boxes([0, 0, 10, 10], [0, 0, 0, 0])
    b = boxes([0, 0, 10, 10], [20, 20, 30, 30], [0, 5, 10, 15], [0, 0, 0, 0])
    iou = box_ops.pairwise_iou(a, b).numpy()
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [1.0, 0.0, 1.0 / 3.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(iou[1], 0.0)  # a padded zero box overlaps nothing, not even itself
    assert np.isfinite(iou).all()


def test_pairwise_iou_batched_and_gradient_finite():
    a = tf.Variable([[[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 0.0, 0.0]]])
    b = tf.constant([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])
    with tf.GradientTape() as tape:
        iou = box_ops.pairwise_iou(a, b)
        total = tf.reduce_sum(iou)
    assert iou.shape == (2, 1, 1)
    assert np.isfinite(tape.gradient(total, a).numpy()).all()


def test_encode_decode_round_trip():
    anchors = boxes([10, 20, 30, 60], [0, 0, 8, 8])
    targets = boxes([12, 18, 34, 70], [1, 2, 5, 9])
    for weights in ((1, 1, 1, 1), (10, 10, 5, 5)):
        deltas = box_ops.encode_boxes(targets, anchors, weights)
        np.testing.assert_allclose(box_ops.decode_boxes(deltas, anchors, weights).numpy(), targets.numpy(),
                                   atol=1e-4)
    # hand-computed: centre moves by 3 of a 20-high anchor, height 22 / 20
    deltas = box_ops.encode_boxes(targets[:1], anchors[:1], (10, 10, 5, 5)).numpy()[0]
    np.testing.assert_allclose(deltas, [10 * 3 / 20, 10 * 4 / 40, 5 * math.log(22 / 20), 5 * math.log(52 / 40)],
                               rtol=1e-5)


def test_encode_padded_box_is_finite():
    deltas = box_ops.encode_boxes(boxes([0, 0, 0, 0]), boxes([0, 0, 16, 16]), (10, 10, 5, 5))
    assert np.isfinite(deltas.numpy()).all()


def test_decode_clamps_scale():
    decoded = box_ops.decode_boxes(boxes([0, 0, 100, 100]), boxes([0, 0, 16, 16])).numpy()[0]
    np.testing.assert_allclose([decoded[2] - decoded[0], decoded[3] - decoded[1]], [1000.0, 1000.0], rtol=1e-4)


def test_clip_boxes():
    clipped = box_ops.clip_boxes(boxes([-5, 3, 20, 70], [10, 10, 12, 12]), 16, 64).numpy()
    np.testing.assert_array_equal(clipped, [[0, 3, 16, 64], [10, 10, 12, 12]])


# ---- anchors ----

def test_anchor_counts_and_geometry():
    anchors = generate_anchors(128, 128, 2, 4, 1, [1.0, 2.0, 0.5], 2.0)
    assert anchor_counts(anchors) == {2: 32 * 32 * 3, 3: 16 * 16 * 3, 4: 8 * 8 * 3}
    assert concat_anchors(anchors).shape == (sum(anchor_counts(anchors).values()), 4)
    first = anchors[2][:3]  # the three anchors of cell (0, 0) of P2: centre (2, 2), side 8
    centers = (first[:, :2] + first[:, 2:]) / 2
    np.testing.assert_allclose(centers, [[2, 2]] * 3)
    heights, widths = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    np.testing.assert_allclose(heights * widths, [64.0] * 3, rtol=1e-5)
    np.testing.assert_allclose(widths / heights, [1.0, 2.0, 0.5], rtol=1e-5)  # ratio = width / height
    second_cell = anchors[3][3]  # cell (0, 1) of P3: centre (4, 12), side 16
    np.testing.assert_allclose(second_cell, [-4, 4, 12, 20])


def test_anchors_tf_match_numpy():
    expected = generate_anchors(64, 96, 3, 3, 2, [1.0, 0.5], 4.0)[3]
    actual = level_anchors_tf(8, 12, 3, 2, [1.0, 0.5], 4.0).numpy()
    np.testing.assert_allclose(actual, expected)


# ---- sampling and RPN targets ----

def test_sampling_respects_fractions():
    positive = tf.constant([[True] * 20 + [False] * 100])
    negative = ~positive
    sampled_pos, sampled_neg = sample_positives_negatives(positive, negative, 16, 0.25)
    assert int(tf.reduce_sum(tf.cast(sampled_pos, tf.int32))) == 4
    assert int(tf.reduce_sum(tf.cast(sampled_neg, tf.int32))) == 12
    assert not tf.reduce_any(sampled_pos & negative) and not tf.reduce_any(sampled_neg & positive)
    # too few positives: negatives fill the sample
    positive = tf.constant([[True] * 2 + [False] * 100])
    sampled_pos, sampled_neg = sample_positives_negatives(positive, ~positive, 16, 0.25)
    assert int(tf.reduce_sum(tf.cast(sampled_pos, tf.int32))) == 2
    assert int(tf.reduce_sum(tf.cast(sampled_neg, tf.int32))) == 14


def test_sampling_is_a_function_of_the_seed():
    positive = tf.constant([[True] * 40 + [False] * 200] * 2)
    first = sample_positives_negatives(positive, ~positive, 32, 0.25, seed=(3, 7))
    again = sample_positives_negatives(positive, ~positive, 32, 0.25, seed=tf.constant([3, 7], tf.int64))
    other = sample_positives_negatives(positive, ~positive, 32, 0.25, seed=(3, 8))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(first, other):
        assert not np.array_equal(a.numpy(), b.numpy())
    # the two images of the batch draw different candidates from one seed
    assert not np.array_equal(first[1].numpy()[0], first[1].numpy()[1])


def test_sample_rois_is_a_function_of_the_seed():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, (1, 300, 2)).astype(np.float32)
    proposals = tf.constant(np.concatenate([corners, corners + rng.uniform(5, 30, (1, 300, 2))], axis=-1))
    gt = tf.constant([[[10, 10, 40, 40], [50, 50, 90, 80]]], tf.float32)
    valid = tf.ones((1, 300), tf.bool)

    def sample(seed):
        result = sample_rois(proposals, valid, gt, tf.constant([[1, 2]]), tf.constant([2]), batch_size_per_im=32,
                             fg_fraction=0.25, seed=seed)
        return {name: value.numpy() for name, value in result.items()}

    first, again, other = sample((5, 1)), sample((5, 1)), sample((5, 2))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    assert not np.array_equal(first["rois"], other["rois"])


def test_rpn_targets_hand_made():
    anchors = boxes([0, 0, 16, 16], [0, 4, 16, 20], [40, 40, 56, 56], [80, 80, 96, 96], [0, 0, 8, 8])
    gt = tf.constant([[[0, 0, 16, 16], [40, 40, 56, 56], [80, 80, 96, 96]]], tf.float32)
    # num_gt 1: gt slots 1 and 2 are padding even though they sit exactly on anchors 2 and 3
    targets = rpn_targets(anchors, gt, tf.constant([1]), batch_size_per_im=8, fg_fraction=0.5)
    labels = targets["labels"].numpy()[0]
    # anchor 1 overlaps gt 0 with IoU 12/20 = 0.6: between the thresholds, ignored;
    # anchor 4 is inside gt 0 with IoU 0.25 < 0.3: negative
    np.testing.assert_array_equal(labels, [1, -1, 0, 0, 0])
    np.testing.assert_allclose(targets["box_targets"].numpy()[0, 0], 0.0, atol=1e-6)
    assert targets["sampled_positive"].numpy()[0].tolist() == [True, False, False, False, False]
    assert targets["sampled_negative"].numpy()[0].tolist() == [False, False, True, True, True]


def test_rpn_targets_best_anchor_is_positive_and_zero_size_gt_ignored():
    anchors = boxes([0, 0, 16, 16], [40, 40, 56, 56])
    # gt 0 overlaps anchor 0 with IoU 0.5625 < 0.7: still positive as its best anchor; gt 1 is zero-size
    gt = tf.constant([[[0, 0, 12, 12], [40, 40, 40, 40]]], tf.float32)
    targets = rpn_targets(anchors, gt, tf.constant([2]))
    np.testing.assert_array_equal(targets["labels"].numpy()[0], [1, 0])


def test_rpn_losses_finite_without_objects():
    anchors = concat_anchors(generate_anchors(32, 32, 2, 3, 1, [1.0], 2.0))
    gt = tf.zeros((2, 3, 4))
    targets = rpn_targets(tf.constant(anchors), gt, tf.constant([0, 0]), batch_size_per_im=16)
    assert int(tf.reduce_sum(tf.cast(targets["sampled_positive"], tf.int32))) == 0
    logits = tf.zeros((2, anchors.shape[0]))
    score_loss, box_loss = rpn_losses(logits, tf.zeros((2, anchors.shape[0], 4)), targets)
    np.testing.assert_allclose(score_loss.numpy(), [math.log(2.0)] * 2, rtol=1e-5)
    np.testing.assert_array_equal(box_loss.numpy(), [0.0, 0.0])
    # no gt slots at all (M = 0) works too
    targets = rpn_targets(tf.constant(anchors), tf.zeros((2, 0, 4)), tf.constant([0, 0]), batch_size_per_im=16)
    assert (targets["labels"].numpy() == 0).all()
    sample = sample_rois(tf.zeros((2, 3, 4)), tf.zeros((2, 3), tf.bool), tf.zeros((2, 0, 4)),
                         tf.zeros((2, 0), tf.int32), tf.constant([0, 0]), batch_size_per_im=4)
    assert not sample["sampled"].numpy().any()


# ---- proposals ----

def test_batched_nms_removes_duplicate_per_image():
    image_boxes = tf.constant([[[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30]]] * 2, tf.float32)
    scores = tf.constant([[0.9, 0.8, 0.7], [0.1, 0.8, 0.7]])
    indices, valid = batched_nms(image_boxes, scores, 3, 0.5)
    assert valid.numpy().tolist() == [[True, True, False]] * 2
    assert indices.numpy()[:, :2].tolist() == [[0, 2], [1, 2]]


def test_generate_proposals_shapes_and_validity():
    anchors = {2: tf.constant([[0, 0, 8, 8], [0, 0, 8, 8.2], [16, 16, 24, 24]], tf.float32)}
    scores = {2: tf.constant([[3.0, 2.0, 1.0]])}
    deltas = {2: tf.zeros((1, 3, 4))}
    proposals, proposal_scores, valid = generate_proposals(scores, deltas, anchors, 32, 32, 10, 5, 0.7)
    assert proposals.shape == (1, 5, 4) and valid.numpy().tolist() == [[True, True, False, False, False]]
    np.testing.assert_allclose(proposals.numpy()[0, :2], [[0, 0, 8, 8], [16, 16, 24, 24]])
    np.testing.assert_array_equal(proposal_scores.numpy()[0, 2:], 0.0)


# ---- ROI sampling and mask targets ----

def test_sample_rois_hand_made():
    gt = tf.constant([[[10, 10, 30, 30], [0, 0, 0, 0]]], tf.float32)
    proposals = tf.constant([[[12, 10, 32, 30],     # IoU 18/22: foreground, shifted by 2 rows
                              [10, 25, 30, 45],     # IoU 100/700: background
                              [60, 60, 80, 80],     # disjoint: background (bg_thresh_lo 0)
                              [10, 10, 30, 30]]],   # invalid proposal: never sampled
                            tf.float32)
    valid = tf.constant([[True, True, True, False]])
    sample = sample_rois(proposals, valid, gt, tf.constant([[2, 0]]), tf.constant([1]), batch_size_per_im=8,
                         fg_fraction=0.5)
    rois = sample["rois"].numpy()[0]
    fg = sample["foreground"].numpy()[0]
    sampled = sample["sampled"].numpy()[0]
    assert fg.tolist() == [True, True] + [False] * 6  # the proposal and the gt box itself
    assert sampled.tolist() == [True] * 4 + [False] * 4
    assert sample["classes"].numpy()[0].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    fg_rois = {tuple(r) for r in rois[:2].tolist()}
    assert fg_rois == {(12, 10, 32, 30), (10, 10, 30, 30)}
    for roi, target in zip(rois[:2], sample["box_targets"].numpy()[0, :2]):
        expected = [-1.0, 0.0, 0.0, 0.0] if roi[0] == 12 else [0.0, 0.0, 0.0, 0.0]  # 10 * (20 - 22) / 20
        np.testing.assert_allclose(target, expected, atol=1e-5)
    assert {tuple(r) for r in rois[2:4].tolist()} == {(10, 25, 30, 45), (60, 60, 80, 80)}
    np.testing.assert_array_equal(rois[4:], 0.0)
    np.testing.assert_array_equal(sample["box_targets"].numpy()[0, 2:], 0.0)


def test_sample_rois_without_objects_is_all_background():
    proposals = tf.constant([[[0, 0, 10, 10], [5, 5, 20, 20]]], tf.float32)
    sample = sample_rois(proposals, tf.constant([[True, True]]), tf.zeros((1, 3, 4)), tf.zeros((1, 3), tf.int32),
                         tf.constant([0]), batch_size_per_im=4)
    assert sample["foreground"].numpy().sum() == 0
    assert sample["sampled"].numpy()[0].tolist() == [True, True, False, False]
    assert np.isfinite(sample["box_targets"].numpy()).all()


def test_mask_targets_crop_the_matched_instance():
    labels = np.zeros((1, 40, 60), np.int32)
    labels[0, 10:30, 10:30] = 1
    labels[0, 10:30, 30:50] = 2  # a neighbour inside the wide ROI: not the matched instance
    rois = tf.constant([[[10, 10, 30, 30], [10, 10, 30, 50], [10, 10, 30, 50]]], tf.float32)
    masks = mask_targets(tf.constant(labels), rois, tf.constant([[0, 0, 1]]), 4).numpy()[0]
    np.testing.assert_array_equal(masks[0], 1.0)
    np.testing.assert_array_equal(masks[1], [[1, 1, 0, 0]] * 4)
    np.testing.assert_array_equal(masks[2], [[0, 0, 1, 1]] * 4)


# ---- ROIAlign ----

def test_roi_align_ramp_and_constant():
    ramp = np.tile(np.arange(16, dtype=np.float32)[None, :], (16, 1))  # value = column index
    features = {2: tf.constant(np.stack([ramp, np.full_like(ramp, 7.0)], -1)[None])}  # stride 4
    pooled = multilevel_roi_align(features, tf.constant([[[8, 8, 24, 24]]], tf.float32), 2, 1e6, 2).numpy()
    # bin centres at x = 12 and 20 px, i.e. feature columns 12/4 - 0.5 = 2.5 and 4.5; bilinear is exact on a ramp
    np.testing.assert_allclose(pooled[0, 0, :, :, 0], [[2.5, 4.5], [2.5, 4.5]], rtol=1e-6)
    np.testing.assert_allclose(pooled[0, 0, :, :, 1], 7.0, rtol=1e-6)


def test_roi_level_assignment_and_routing():
    sides = [4, 8, 15, 16, 32, 64]
    level_boxes = tf.constant([[0, 0, s, s] for s in sides], tf.float32)
    levels = assign_levels(level_boxes, 2, 4, canonical_size=32.0, canonical_level=4).numpy()
    assert levels.tolist() == [2, 2, 2, 3, 4, 4]
    # features constant per level (value = level): pooled values reveal where each box went, in order
    features = {level: tf.fill((2, 64 // 2**level, 64 // 2**level, 1), float(level)) for level in (2, 3, 4)}
    batch_boxes = tf.stack([level_boxes, tf.reverse(level_boxes, [0])])
    pooled = multilevel_roi_align(features, batch_boxes, 3, 32.0, 4).numpy()
    assert pooled.shape == (2, 6, 3, 3, 1)
    np.testing.assert_allclose(pooled[0, :, 1, 1, 0], levels)
    np.testing.assert_allclose(pooled[1, :, 1, 1, 0], levels[::-1])


# ---- post-processing ----

def test_detect_boxes_nms_removes_duplicate():
    rois = tf.constant([[[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [0, 0, 0, 0]]], tf.float32)
    logits = tf.constant([[[0, 5, 0], [0, 4, 0], [0, 0, 4], [0, 9, 0]]], tf.float32)  # classes 1, 1, 2, padding
    detections = detect_boxes(rois, tf.constant([[True, True, True, False]]), logits, tf.zeros((1, 4, 12)), 32, 32,
                              detections_per_image=5)
    assert int(detections["num_detections"][0]) == 2
    assert detections["classes"].numpy()[0].tolist() == [1, 2, 0, 0, 0]
    np.testing.assert_allclose(detections["boxes"].numpy()[0, :2], [[0, 0, 10, 10], [20, 20, 30, 30]], atol=1e-4)
    np.testing.assert_array_equal(detections["scores"].numpy()[0, 2:], 0.0)


def test_paste_masks():
    mask = np.zeros((4, 4), np.float32)
    mask[:, :2] = 1.0
    pasted = paste_masks(np.array([[2, 2, 6, 6], [-2, -2, 2, 2], [2, 2, 6, 10]]),
                         np.stack([np.ones((4, 4)), np.ones((4, 4)), mask]), 8, 12)
    assert pasted.shape == (3, 8, 12) and pasted.dtype == bool
    expected = np.zeros((8, 12), bool)
    expected[2:6, 2:6] = True
    np.testing.assert_array_equal(pasted[0], expected)
    expected = np.zeros((8, 12), bool)
    expected[:2, :2] = True  # clipped to the image
    np.testing.assert_array_equal(pasted[1], expected)
    expected = np.zeros((8, 12), bool)
    expected[2:6, 2:6] = True  # left half of an 8-wide box
    np.testing.assert_array_equal(pasted[2], expected)


# ---- config ----

def test_config_round_trip_and_validation():
    config = MaskRCNNConfig.preset("small")
    assert MaskRCNNConfig.from_dict(config.to_dict()) == config
    assert config.anchors_per_location == 3
    with pytest.raises(ValueError, match="rpn_positive_overlap"):
        MaskRCNNConfig.preset("small", rpn_positive_overlap=1.5)
    with pytest.raises(ValueError, match="backbone"):
        MaskRCNNConfig(backbone="vgg")
    with pytest.raises(ValueError, match="not_a_field"):
        MaskRCNNConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError, match="backbone_weights"):
        MaskRCNNConfig.preset("small", backbone_weights="resnet.h5")
    with pytest.raises(ValueError, match="mrcnn_resolution"):
        MaskRCNNConfig(mrcnn_resolution=27)
