"""Box math for Mask R-CNN: areas, pairwise IoU, delta encoding/decoding and clipping (pure TF functions).

Boxes are float32 ``[y0, x0, y1, x1]`` in pixels with the end exclusive, the convention the data reader
emits: a box covering pixel rows 3..5 is ``[3, x0, 6, x1]``, height ``y1 - y0``. A box with zero (or
negative) height or width is a padding slot and never overlaps anything.
"""
from __future__ import annotations

import math

import tensorflow as tf

# Faster R-CNN's clamp on log-scale deltas: no box grows beyond 1000/16 times its anchor in one step,
# so exp() never overflows while the heads are still random.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)

# Floor on heights/widths before log(): padded zero boxes would otherwise give log(0) = -inf and NaN
# gradients even when their loss weight is zero.
_MIN_SIZE = 1e-3


def box_area(boxes: tf.Tensor) -> tf.Tensor:
    """Areas of ``boxes`` (..., 4) float32; empty or inverted boxes give 0. Returns (...,) float32."""
    heights = tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    widths = tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return heights * widths


def pairwise_iou(boxes_a: tf.Tensor, boxes_b: tf.Tensor) -> tf.Tensor:
    """Intersection over union of every box in ``boxes_a`` with every box in ``boxes_b``.

    Args:
        boxes_a: (..., N, 4) float32.
        boxes_b: (..., M, 4) float32, the same leading (batch) dimensions as ``boxes_a``.

    Returns:
        (..., N, M) float32 in [0, 1]; pairs involving a zero-area box give 0, never NaN.
    """
    a = boxes_a[..., :, None, :]
    b = boxes_b[..., None, :, :]
    inter_h = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_w = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    intersection = inter_h * inter_w
    area_a = box_area(boxes_a)[..., :, None]
    area_b = box_area(boxes_b)[..., None, :]
    union = area_a + area_b - intersection
    iou = tf.math.divide_no_nan(intersection, union)
    # a zero-area box inside another has intersection 0 anyway; this guards degenerate unions
    return tf.where((area_a > 0.0) & (area_b > 0.0), iou, 0.0)


def _centers_sizes(boxes: tf.Tensor):
    heights = tf.maximum(boxes[..., 2] - boxes[..., 0], _MIN_SIZE)
    widths = tf.maximum(boxes[..., 3] - boxes[..., 1], _MIN_SIZE)
    center_y = boxes[..., 0] + 0.5 * (boxes[..., 2] - boxes[..., 0])
    center_x = boxes[..., 1] + 0.5 * (boxes[..., 3] - boxes[..., 1])
    return center_y, center_x, heights, widths


def encode_boxes(boxes: tf.Tensor, anchors: tf.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
    """Regression targets that turn ``anchors`` into ``boxes`` (Faster R-CNN parametrisation).

    ``[wy * dy / ha, wx * dx / wa, wh * log(h / ha), ww * log(w / wa)]`` with centre offsets dy, dx.

    Args:
        boxes: (..., 4) float32 target boxes; zero-size (padded) boxes give finite values.
        anchors: (..., 4) float32, broadcastable to ``boxes``.
        weights: 4 floats ``(wy, wx, wh, ww)``, e.g. (10, 10, 5, 5) for the box head.

    Returns:
        (..., 4) float32 deltas ``[dy, dx, dh, dw]``.
    """
    wy, wx, wh, ww = (float(w) for w in weights)
    cy, cx, h, w = _centers_sizes(boxes)
    acy, acx, ah, aw = _centers_sizes(anchors)
    return tf.stack([wy * (cy - acy) / ah, wx * (cx - acx) / aw,
                     wh * tf.math.log(h / ah), ww * tf.math.log(w / aw)], axis=-1)


def decode_boxes(deltas: tf.Tensor, anchors: tf.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
    """Boxes from ``deltas`` applied to ``anchors``; the inverse of ``encode_boxes``.

    Args:
        deltas: (..., 4) float32 ``[dy, dx, dh, dw]``.
        anchors: (..., 4) float32, broadcastable to ``deltas``.
        weights: the 4 weights the deltas were encoded with.

    Returns:
        (..., 4) float32 boxes; dh and dw are clamped at ``log(1000 / 16)`` so exp() stays finite.
    """
    wy, wx, wh, ww = (float(w) for w in weights)
    deltas = tf.cast(deltas, tf.float32)
    acy, acx, ah, aw = _centers_sizes(anchors)
    dy, dx = deltas[..., 0] / wy, deltas[..., 1] / wx
    dh = tf.minimum(deltas[..., 2] / wh, BBOX_XFORM_CLIP)
    dw = tf.minimum(deltas[..., 3] / ww, BBOX_XFORM_CLIP)
    cy, cx = acy + dy * ah, acx + dx * aw
    h, w = ah * tf.exp(dh), aw * tf.exp(dw)
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def clip_boxes(boxes: tf.Tensor, height, width) -> tf.Tensor:
    """Clip ``boxes`` (..., 4) float32 to the image ``[0, height] x [0, width]``; returns (..., 4)."""
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    y0 = tf.clip_by_value(boxes[..., 0], 0.0, height)
    x0 = tf.clip_by_value(boxes[..., 1], 0.0, width)
    y1 = tf.clip_by_value(boxes[..., 2], 0.0, height)
    x1 = tf.clip_by_value(boxes[..., 3], 0.0, width)
    return tf.stack([y0, x0, y1, x1], axis=-1)


def valid_boxes(boxes: tf.Tensor, min_size: float = 0.0) -> tf.Tensor:
    """(...,) bool: height and width both larger than ``min_size`` pixels (padding slots are False)."""
    return ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)


def smooth_l1(difference: tf.Tensor, beta: float) -> tf.Tensor:
    """Elementwise smooth-L1 (Huber divided by ``beta``): 0.5 x^2 / beta below ``beta``, |x| - 0.5 beta above."""
    absolute = tf.abs(difference)
    if beta <= 0.0:
        return absolute
    return tf.where(absolute < beta, 0.5 * tf.square(absolute) / beta, absolute - 0.5 * beta)
