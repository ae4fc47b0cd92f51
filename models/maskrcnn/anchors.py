"""Multilevel anchor boxes for the RPN (numpy; they depend only on the image size and the config)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def anchor_sizes(level: int, num_scales: int, aspect_ratios: Sequence[float], anchor_scale: float) -> np.ndarray:
    """(A, 2) float32 ``(height, width)`` of the anchors at one location of ``level``.

    Order: scale-major, then ratio (``A = num_scales * len(aspect_ratios)``). Side
    ``anchor_scale * 2**level * 2**(s / num_scales)``; a ratio r is width / height (TAO / Model Garden
    convention), the area kept: height = side / sqrt(r), width = side * sqrt(r).
    """
    sizes = []
    for scale in range(num_scales):
        side = anchor_scale * 2.0**level * 2.0 ** (scale / num_scales)
        for ratio in aspect_ratios:
            sizes.append((side / np.sqrt(ratio), side * np.sqrt(ratio)))
    return np.asarray(sizes, np.float32)


def generate_anchors(image_height: int, image_width: int, min_level: int, max_level: int, num_scales: int,
                     aspect_ratios: Sequence[float], anchor_scale: float) -> dict[int, np.ndarray]:
    """Anchors of every pyramid level for one image size.

    Level l has stride ``2**l`` and a feature map of ``ceil(H / 2**l) x ceil(W / 2**l)``; anchors are
    centred on the feature cells, at ``((i + 0.5) * stride, (j + 0.5) * stride)`` in pixels.

    Returns:
        {level: (H_l * W_l * A, 4) float32 ``[y0, x0, y1, x1]``}, ordered row, column, then anchor, which
        is the order of a channels-last head output reshaped to ``(B, H_l * W_l * A, ...)``.
    """
    anchors = {}
    for level in range(min_level, max_level + 1):
        stride = 2**level
        rows, cols = -(-image_height // stride), -(-image_width // stride)
        center_y = (np.arange(rows, dtype=np.float32) + 0.5) * stride
        center_x = (np.arange(cols, dtype=np.float32) + 0.5) * stride
        center_y, center_x = np.meshgrid(center_y, center_x, indexing="ij")
        centers = np.stack([center_y, center_x], axis=-1).reshape(-1, 1, 2)
        half = anchor_sizes(level, num_scales, aspect_ratios, anchor_scale)[None] / 2.0
        boxes = np.concatenate([centers - half, centers + half], axis=-1)  # (H_l*W_l, A, 4)
        anchors[level] = boxes.reshape(-1, 4).astype(np.float32)
    return anchors


def anchor_counts(anchors: dict[int, np.ndarray]) -> dict[int, int]:
    """{level: number of anchors} of ``generate_anchors``' output."""
    return {level: int(boxes.shape[0]) for level, boxes in sorted(anchors.items())}


def concat_anchors(anchors: dict[int, np.ndarray]) -> np.ndarray:
    """(sum of counts, 4) float32: all levels, lowest level first (the order ``concat_levels`` uses)."""
    return np.concatenate([anchors[level] for level in sorted(anchors)], axis=0)


def level_anchors_tf(rows, cols, level: int, num_scales: int, aspect_ratios: Sequence[float],
                     anchor_scale: float):
    """TF twin of one level of ``generate_anchors`` for a feature map of ``rows x cols`` (may be tensors).

    The model builds anchors from the feature maps' dynamic shapes, so a SavedModel serves any tile size.
    Returns (rows * cols * A, 4) float32 in the same order as ``generate_anchors``.
    """
    import tensorflow as tf

    stride = float(2**level)
    center_y = (tf.cast(tf.range(rows), tf.float32) + 0.5) * stride
    center_x = (tf.cast(tf.range(cols), tf.float32) + 0.5) * stride
    center_y, center_x = tf.meshgrid(center_y, center_x, indexing="ij")
    centers = tf.reshape(tf.stack([center_y, center_x], axis=-1), (-1, 1, 2))
    half = tf.constant(anchor_sizes(level, num_scales, aspect_ratios, anchor_scale)[None] / 2.0)
    boxes = tf.concat([centers - half, centers + half], axis=-1)
    return tf.reshape(boxes, (-1, 4))
