"""Second-stage training targets: ROI sampling, class and box targets, and mask targets cropped from labels."""
from __future__ import annotations

import tensorflow as tf

from . import box_ops
from .roi_align import normalized_sample_boxes
from .rpn import valid_gt_mask
from .sampling import sample_positives_negatives


def sample_rois(proposals: tf.Tensor, proposal_valid: tf.Tensor, gt_boxes: tf.Tensor, gt_classes: tf.Tensor,
                num_gt: tf.Tensor, batch_size_per_im: int = 512, fg_fraction: float = 0.25,
                fg_thresh: float = 0.5, bg_thresh_hi: float = 0.5, bg_thresh_lo: float = 0.0,
                bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), seed=(0, 0)) -> dict[str, tf.Tensor]:
    """Sample a fixed number of ROIs per image and their targets (batched).

    The gt boxes join the proposals as candidates (so every object has a perfect ROI early in training).
    A candidate is foreground if its best IoU with a valid gt is >= ``fg_thresh``, background if it lies in
    ``[bg_thresh_lo, bg_thresh_hi)``; at most ``fg_fraction`` of the ``batch_size_per_im`` sampled ROIs are
    foreground. Sampled foreground ROIs come first, then background, then padding rows (weight 0).

    Args:
        proposals: (B, P, 4) float32 pixels; proposal_valid (B, P) bool.
        gt_boxes: (B, M, 4) float32 pixels; gt_classes (B, M) int32 in 1..num_classes-1; num_gt (B,) int32.
        seed: (2,) int stateless seed of the sampling and of the order of the sampled ROIs: the same
            inputs and seed give the same sample.

    Returns:
        dict of (B, S = batch_size_per_im, ...) tensors: "rois" (.., 4) float32, "classes" int32 (gt class
        of fg ROIs, 0 for background and padding), "box_targets" (.., 4) float32 (encoded with
        ``bbox_reg_weights``; zero off foreground), "matched_gt" int32 (gt index, meaningful on fg),
        "foreground" bool and "sampled" bool (fg or bg, i.e. weight of the classification loss).
    """
    proposals = tf.cast(proposals, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    batch = tf.shape(gt_boxes)[0]
    valid_gt = valid_gt_mask(gt_boxes, num_gt)
    # padding candidates guarantee at least S of them, so top_k(k=S) is valid for any proposal count
    padding = tf.zeros((batch, batch_size_per_im, 4), tf.float32)
    candidates = tf.concat([proposals, tf.where(valid_gt[..., None], gt_boxes, 0.0), padding], axis=1)
    candidate_valid = tf.concat([proposal_valid, valid_gt, tf.zeros((batch, batch_size_per_im), tf.bool)], axis=1)
    candidate_valid &= box_ops.valid_boxes(candidates)

    iou = tf.where(valid_gt[:, None, :], box_ops.pairwise_iou(candidates, gt_boxes), -1.0)  # (B, N, M)
    # a column of -1 keeps max/argmax defined when M = 0
    iou = tf.concat([iou, -tf.ones(tf.concat([tf.shape(iou)[:2], [1]], axis=0))], axis=-1)
    max_iou = tf.reduce_max(iou, axis=-1)
    matched = tf.argmax(iou, axis=-1, output_type=tf.int32)
    foreground = candidate_valid & (max_iou >= fg_thresh)
    # no valid gt (max_iou = -1): every valid proposal is background
    max_iou_bg = tf.maximum(max_iou, 0.0)
    background = candidate_valid & ~foreground & (max_iou_bg < bg_thresh_hi) & (max_iou_bg >= bg_thresh_lo)
    sampling_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    sampled_fg, sampled_bg = sample_positives_negatives(foreground, background, batch_size_per_im, fg_fraction,
                                                        seed=sampling_seed)
    # order the sample: foreground (key 2..3), background (1..2), unsampled (0); ties broken at random
    keys = tf.random.stateless_uniform(tf.shape(max_iou), order_seed)
    keys = tf.where(sampled_fg, 2.0 + keys, tf.where(sampled_bg, 1.0 + keys, 0.0))
    order_keys, order = tf.math.top_k(keys, k=batch_size_per_im)
    rois = tf.gather(candidates, order, batch_dims=1)
    is_fg = order_keys >= 2.0
    is_sampled = order_keys >= 1.0
    matched = tf.where(is_fg, tf.gather(matched, order, batch_dims=1), 0)
    gt_count = tf.shape(gt_boxes)[1]
    safe_classes = tf.concat([tf.cast(gt_classes, tf.int32), tf.zeros((batch, 1), tf.int32)], axis=1)
    safe_boxes = tf.concat([gt_boxes, tf.zeros((batch, 1, 4), tf.float32)], axis=1)
    gather_index = tf.where(is_fg, matched, gt_count)  # background reads the zero row appended above
    classes = tf.gather(safe_classes, gather_index, batch_dims=1)
    matched_boxes = tf.gather(safe_boxes, gather_index, batch_dims=1)
    box_targets = box_ops.encode_boxes(matched_boxes, rois, bbox_reg_weights)
    box_targets = tf.where(is_fg[..., None], box_targets, 0.0)
    rois = tf.where(is_sampled[..., None], rois, 0.0)
    return {"rois": tf.stop_gradient(rois), "classes": classes, "box_targets": tf.stop_gradient(box_targets),
            "matched_gt": matched, "foreground": is_fg, "sampled": is_sampled}


def mask_targets(instance_labels: tf.Tensor, rois: tf.Tensor, matched_gt: tf.Tensor, resolution: int
                 ) -> tf.Tensor:
    """Binary mask targets: the matched instance cropped to each ROI at ``resolution x resolution``.

    Instance id ``k`` in ``instance_labels`` is gt box ``k - 1``. Each output bin holds 2x2 samples of the
    instance map (nearest pixel at each sample point, so labels are never interpolated), set where at least
    half of them belong to the instance: the bilinear 0.5 threshold up to sampling, at the memory of one
    label map instead of one binary map per instance.

    Args:
        instance_labels: (B, H, W) int32, 0 background.
        rois: (B, K, 4) float32 pixels.
        matched_gt: (B, K) int32 gt index per ROI.

    Returns:
        (B, K, resolution, resolution) float32 in {0, 1}.
    """
    labels = tf.cast(instance_labels, tf.float32)[..., None]
    shape = tf.shape(labels)
    batch, num_rois = tf.shape(rois)[0], tf.shape(rois)[1]
    flat_rois = tf.reshape(tf.cast(rois, tf.float32), (-1, 4))
    crop_boxes = normalized_sample_boxes(flat_rois, 1.0, shape[1], shape[2], 2 * resolution)
    box_indices = tf.repeat(tf.range(batch), num_rois)
    crops = tf.image.crop_and_resize(labels, crop_boxes, box_indices, (2 * resolution, 2 * resolution),
                                     method="nearest")
    instance_id = tf.cast(tf.reshape(matched_gt, (-1,)) + 1, tf.float32)
    inside = tf.cast(tf.equal(crops, instance_id[:, None, None, None]), tf.float32)
    votes = tf.nn.avg_pool2d(inside, 2, 2, "VALID")
    masks = tf.cast(votes >= 0.5, tf.float32)
    return tf.stop_gradient(tf.reshape(masks, (batch, num_rois, resolution, resolution)))
