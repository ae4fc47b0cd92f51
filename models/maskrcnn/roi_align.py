"""Multilevel ROIAlign: route each box to one pyramid level and bilinearly pool a fixed grid from it."""
from __future__ import annotations

import math

import tensorflow as tf


def assign_levels(boxes: tf.Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                  canonical_level: int = 4) -> tf.Tensor:
    """Pyramid level of each box: ``floor(canonical_level + log2(sqrt(area) / canonical_size))``, clamped.

    The FPN paper's rule (224 px on P4 for ImageNet-sized objects). For small objects choose the canonical
    size so that a box is pooled from the level whose anchors match it: with anchors of
    ``anchor_scale * 2**l`` px, ``canonical_size = anchor_scale * 2**canonical_level``.

    Args:
        boxes: (...,4) float32 pixels.

    Returns:
        (...,) int32 in [min_level, max_level]; empty boxes go to ``min_level``.
    """
    heights = tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    widths = tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    side = tf.sqrt(heights * widths)
    # 1e-6 keeps log2 finite for empty (padding) boxes; they clamp to min_level
    # small epsilon: log of an exact power of two may land a hair below the integer
    level = tf.floor(canonical_level + tf.math.log(tf.maximum(side, 1e-6) / canonical_size) / math.log(2.0)
                     + 1e-5)
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


def normalized_sample_boxes(boxes: tf.Tensor, stride: float, feature_height, feature_width,
                            output_size: int) -> tf.Tensor:
    """Boxes in the normalized coordinates of ``tf.image.crop_and_resize`` that sample bin centres.

    ``crop_and_resize`` puts its first and last samples at the crop box's corners, in units of
    ``(size - 1)`` of the pixel-index grid (pixel i's centre at i). ROIAlign wants sample j of
    ``output_size`` at ``y0 + (j + 0.5) * h / output_size`` in continuous image coordinates, which is
    feature index ``that / stride - 0.5``.

    Args:
        boxes: (K, 4) float32 pixels.
        stride: the feature map's stride in pixels.
        feature_height, feature_width: the feature map's size (ints or scalar tensors).

    Returns:
        (K, 4) float32 for ``crop_and_resize``.
    """
    height = tf.cast(feature_height, tf.float32)
    width = tf.cast(feature_width, tf.float32)
    y0, x0, y1, x1 = tf.unstack(boxes / stride, axis=-1)
    bin_h = (y1 - y0) / output_size
    bin_w = (x1 - x0) / output_size
    first_y = y0 + 0.5 * bin_h - 0.5
    last_y = y0 + (output_size - 0.5) * bin_h - 0.5
    first_x = x0 + 0.5 * bin_w - 0.5
    last_x = x0 + (output_size - 0.5) * bin_w - 0.5
    # a 1-pixel-high map would divide by zero; its only sample row is 0 anyway
    scale_y = tf.maximum(height - 1.0, 1.0)
    scale_x = tf.maximum(width - 1.0, 1.0)
    return tf.stack([first_y / scale_y, first_x / scale_x, last_y / scale_y, last_x / scale_x], axis=-1)


def roi_align_single_level(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor, stride: float,
                           output_size: int) -> tf.Tensor:
    """ROIAlign of ``boxes`` from one feature map: 2x2 samples per bin, averaged.

    Args:
        features: (B, H, W, C) float.
        boxes: (K, 4) float32 pixels.
        box_indices: (K,) int32, the image of each box.
        stride: pixels per feature cell.
        output_size: bins per side.

    Returns:
        (K, output_size, output_size, C) float32.
    """
    # One replicated cell around the map: samples up to a cell outside (boxes at the image border put
    # them in [-0.5, 0)) read the border value, as in Detectron2's ROIAlign, instead of the zeros
    # crop_and_resize extrapolates with.
    features = tf.pad(tf.cast(features, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    shape = tf.shape(features)
    # sampling 2x the bins and 2x2 average pooling = Mask R-CNN's sampling_ratio 2
    crop_boxes = normalized_sample_boxes(boxes + stride, stride, shape[1], shape[2], 2 * output_size)
    crops = tf.image.crop_and_resize(features, tf.stop_gradient(crop_boxes), box_indices,
                                     (2 * output_size, 2 * output_size), method="bilinear")
    return tf.nn.avg_pool2d(crops, 2, 2, "VALID")


def multilevel_roi_align(features: dict[int, tf.Tensor], boxes: tf.Tensor, output_size: int,
                         canonical_size: float = 224.0, canonical_level: int = 4) -> tf.Tensor:
    """ROIAlign from a feature pyramid, each box from the level ``assign_levels`` picks.

    Args:
        features: {level: (B, H_l, W_l, C) float}, stride ``2**level``.
        boxes: (B, K, 4) float32 pixels.
        output_size: bins per side.

    Returns:
        (B, K, output_size, output_size, C) float32.
    """
    levels = sorted(features)
    min_level, max_level = levels[0], levels[-1]
    batch = tf.shape(boxes)[0]
    num_boxes = tf.shape(boxes)[1]
    flat_boxes = tf.reshape(tf.cast(boxes, tf.float32), (-1, 4))
    box_indices = tf.repeat(tf.range(batch), num_boxes)
    box_levels = assign_levels(flat_boxes, min_level, max_level, canonical_size, canonical_level)
    # route each box to its level: partition, pool per level, stitch back into the original order
    partition = box_levels - min_level
    positions = tf.dynamic_partition(tf.range(tf.shape(flat_boxes)[0]), partition, len(levels))
    level_boxes = tf.dynamic_partition(flat_boxes, partition, len(levels))
    level_indices = tf.dynamic_partition(box_indices, partition, len(levels))
    pooled = [roi_align_single_level(features[level], level_boxes[i], level_indices[i], 2.0**level, output_size)
              for i, level in enumerate(levels)]
    merged = tf.dynamic_stitch(positions, pooled)
    channels = features[levels[0]].shape[-1]
    return tf.reshape(merged, (batch, num_boxes, output_size, output_size,
                               channels if channels is not None else tf.shape(merged)[-1]))
