"""Detections from box-head outputs (TF, fixed size) and masks pasted into the image (numpy).

Detections become one instance label image with ``enki_seg.data.labels.paint_instances``.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import box_ops


def detect_boxes(rois: tf.Tensor, roi_valid: tf.Tensor, class_logits: tf.Tensor, box_deltas: tf.Tensor,
                 image_height, image_width, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                 detections_per_image: int = 100, nms_threshold: float = 0.5, score_threshold: float = 0.05
                 ) -> dict[str, tf.Tensor]:
    """Class-specific decoding, clipping, score threshold and per-class NMS, a fixed number per image.

    Args:
        rois: (B, K, 4) float32 pixels; roi_valid (B, K) bool (invalid ROIs never become detections).
        class_logits: (B, K, num_classes) float, class 0 background.
        box_deltas: (B, K, 4 * num_classes) float, class-major.
        detections_per_image: D, also the per-class cap.

    Returns:
        dict: "boxes" (B, D, 4) float32, "scores" (B, D) float32, "classes" (B, D) int32 in
        1..num_classes-1, "num_detections" (B,) int32; rows beyond num_detections are zero.
    """
    num_classes = class_logits.shape[-1]
    probabilities = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[..., 1:]
    probabilities = tf.where(roi_valid[..., None], probabilities, 0.0)
    batch, num_rois = tf.shape(rois)[0], tf.shape(rois)[1]
    deltas = tf.reshape(tf.cast(box_deltas, tf.float32), (batch, num_rois, num_classes, 4))[:, :, 1:]
    boxes = box_ops.decode_boxes(deltas, rois[:, :, None, :], bbox_reg_weights)
    boxes = box_ops.clip_boxes(boxes, image_height, image_width)
    # combined NMS thresholds with ">"; an empty box would survive a zero threshold, so mask it
    probabilities = tf.where(box_ops.valid_boxes(boxes), probabilities, 0.0)
    nmsed_boxes, nmsed_scores, nmsed_classes, num_detections = tf.image.combined_non_max_suppression(
        boxes, probabilities, max_output_size_per_class=detections_per_image, max_total_size=detections_per_image,
        iou_threshold=nms_threshold, score_threshold=score_threshold, pad_per_class=False, clip_boxes=False)
    valid = tf.range(detections_per_image)[None, :] < num_detections[:, None]
    return {
        "boxes": tf.where(valid[..., None], nmsed_boxes, 0.0),
        "scores": tf.where(valid, nmsed_scores, 0.0),
        # combined NMS numbers the classes it was given from 0; ours start at 1 (0 is background)
        "classes": tf.where(valid, tf.cast(nmsed_classes, tf.int32) + 1, 0),
        "num_detections": tf.cast(num_detections, tf.int32),
    }


def paste_masks(boxes: np.ndarray, masks: np.ndarray, height: int, width: int, threshold: float = 0.5
                ) -> np.ndarray:
    """Resize box-relative mask probabilities to their boxes and place them in the image.

    Mask bin j of R spans ``[y0 + j h / R, y0 + (j + 1) h / R)``; a pixel takes the bilinear value of the
    mask at its centre (clamped to the mask's edge bins) when the centre lies inside the box, 0 otherwise.
    Boxes partly outside the image are clipped.

    Args:
        boxes: (N, 4) float ``[y0, x0, y1, x1]`` pixels.
        masks: (N, R, R) float probabilities.
        height, width: image size.
        threshold: probability at or above which a pixel belongs to the object.

    Returns:
        (N, height, width) bool.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    masks = np.asarray(masks, np.float32)
    pasted = np.zeros((len(boxes), height, width), bool)
    for i, (box, mask) in enumerate(zip(boxes, masks)):
        y0, x0, y1, x1 = box
        if y1 <= y0 or x1 <= x0:
            continue
        rows = np.arange(max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height))
        cols = np.arange(max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width))
        if rows.size == 0 or cols.size == 0:
            continue
        rows = rows[(rows + 0.5 >= y0) & (rows + 0.5 < y1)]
        cols = cols[(cols + 0.5 >= x0) & (cols + 0.5 < x1)]
        if rows.size == 0 or cols.size == 0:
            continue
        weight_rows = _interpolation_matrix((rows + 0.5 - y0) / (y1 - y0) * mask.shape[0] - 0.5, mask.shape[0])
        weight_cols = _interpolation_matrix((cols + 0.5 - x0) / (x1 - x0) * mask.shape[1] - 0.5, mask.shape[1])
        values = weight_rows @ mask @ weight_cols.T
        pasted[i, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = values >= threshold
    return pasted


def _interpolation_matrix(positions: np.ndarray, size: int) -> np.ndarray:
    """(len(positions), size) linear interpolation weights at fractional ``positions``, edge-clamped."""
    positions = np.clip(positions, 0.0, size - 1.0)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, size - 1)
    fraction = positions - low
    weights = np.zeros((len(positions), size), np.float32)
    weights[np.arange(len(positions)), low] += 1.0 - fraction
    weights[np.arange(len(positions)), high] += fraction
    return weights

