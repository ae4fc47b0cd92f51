"""Region proposal network: the shared head, anchor target assignment and its losses."""
from __future__ import annotations

import keras
import tensorflow as tf

from . import box_ops
from .sampling import sample_positives_negatives


def build_rpn_head(channels: int, anchors_per_location: int, name: str = "rpn_head") -> keras.Model:
    """Head shared by all pyramid levels: 3x3 conv + ReLU, then objectness logits and box deltas.

    Input ``(B, H_l, W_l, channels)``; outputs ``(B, H_l, W_l, A)`` logits and ``(B, H_l, W_l, 4A)``
    deltas (anchor-major: channel ``4a + k`` is coordinate k of anchor a), both float32.
    """
    features = keras.Input((None, None, channels))
    # small initial weights (Detectron: std 0.01) so the first proposals are the anchors themselves
    init = keras.initializers.RandomNormal(stddev=0.01)
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", kernel_initializer=init,
                            name="conv")(features)
    scores = keras.layers.Conv2D(anchors_per_location, 1, kernel_initializer=init, dtype="float32",
                                 name="objectness")(x)
    deltas = keras.layers.Conv2D(4 * anchors_per_location, 1, kernel_initializer=init, dtype="float32",
                                 name="deltas")(x)
    return keras.Model(features, [scores, deltas], name=name)


def flatten_level_outputs(scores: tf.Tensor, deltas: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, H, W, A) and (B, H, W, 4A) to (B, H*W*A) and (B, H*W*A, 4), the anchor order of ``anchors.py``."""
    batch = tf.shape(scores)[0]
    return tf.reshape(scores, (batch, -1)), tf.reshape(deltas, (batch, -1, 4))


def valid_gt_mask(gt_boxes: tf.Tensor, num_gt: tf.Tensor) -> tf.Tensor:
    """(B, M) bool: slot index below ``num_gt`` (B,) and a box of positive size (padding never matches)."""
    index = tf.range(tf.shape(gt_boxes)[1])[None, :]
    return (index < tf.cast(num_gt, tf.int32)[:, None]) & box_ops.valid_boxes(gt_boxes)


def rpn_targets(anchors: tf.Tensor, gt_boxes: tf.Tensor, num_gt: tf.Tensor, positive_overlap: float = 0.7,
                negative_overlap: float = 0.3, batch_size_per_im: int = 256, fg_fraction: float = 0.5,
                seed=(0, 0)) -> dict[str, tf.Tensor]:
    """Label and sample anchors for the RPN loss (batched over images).

    Positive: IoU >= ``positive_overlap`` with a valid gt, or among the anchors of highest IoU with some
    valid gt (ties included, so every gt gets an anchor). Negative: best IoU < ``negative_overlap`` and not
    positive. Then at most ``batch_size_per_im`` are sampled, at most ``fg_fraction`` of them positive.

    Args:
        anchors: (N, 4) float32 pixels, all levels concatenated.
        gt_boxes: (B, M, 4) float32 pixels; slots at or beyond ``num_gt`` or of zero size are padding.
        num_gt: (B,) int32.
        seed: (2,) int stateless seed of the sampling (see ``sample_positives_negatives``).

    Returns:
        dict with "labels" (B, N) int32 (1 positive, 0 negative, -1 ignored, before sampling),
        "sampled_positive" / "sampled_negative" (B, N) bool, and "box_targets" (B, N, 4) float32
        (deltas to the matched gt, weights 1; meaningful on positives only).
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    batch = tf.shape(gt_boxes)[0]
    valid_gt = valid_gt_mask(gt_boxes, num_gt)
    anchors_b = tf.broadcast_to(anchors[None], (batch, tf.shape(anchors)[0], 4))
    # padded gts get IoU -1 so that they are never any anchor's best match
    iou = tf.where(valid_gt[:, None, :], box_ops.pairwise_iou(anchors_b, gt_boxes), -1.0)  # (B, N, M)
    # an extra column of -1 keeps max/argmax defined when M = 0 (it never wins against a valid gt)
    column = tf.concat([tf.shape(iou)[:2], [1]], axis=0)
    padded_iou = tf.concat([iou, -tf.ones(column)], axis=-1)
    max_iou = tf.reduce_max(padded_iou, axis=-1)
    matched = tf.argmax(padded_iou, axis=-1, output_type=tf.int32)
    best_per_gt = tf.reduce_max(iou, axis=1, keepdims=True)  # (B, 1, M)
    # an anchor tying a valid gt's best IoU (> 0) is positive, matched to that gt
    is_best = (iou >= best_per_gt) & (best_per_gt > 0.0) & valid_gt[:, None, :]
    best_any = tf.reduce_any(is_best, axis=-1)
    best_index = tf.argmax(tf.cast(tf.concat([is_best, tf.zeros(column, tf.bool)], axis=-1), tf.int32),
                           axis=-1, output_type=tf.int32)
    matched = tf.where(best_any, best_index, matched)

    positive = (max_iou >= positive_overlap) | best_any
    negative = (max_iou < negative_overlap) & ~positive
    labels = tf.where(positive, 1, tf.where(negative, 0, -1))
    sampled_positive, sampled_negative = sample_positives_negatives(
        positive, negative, batch_size_per_im, fg_fraction, seed=seed)
    # the zero row appended here is what unmatched anchors (index M) read
    matched_boxes = tf.gather(tf.concat([gt_boxes, tf.zeros((batch, 1, 4))], axis=1), matched, batch_dims=1)
    box_targets = box_ops.encode_boxes(matched_boxes, anchors_b)
    box_targets = tf.where(positive[..., None], box_targets, 0.0)
    return {"labels": labels, "sampled_positive": sampled_positive, "sampled_negative": sampled_negative,
            "box_targets": box_targets}


def rpn_losses(score_logits: tf.Tensor, box_deltas: tf.Tensor, targets: dict[str, tf.Tensor],
               box_beta: float = 1.0 / 9.0) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image RPN losses.

    Args:
        score_logits: (B, N) float objectness logits.
        box_deltas: (B, N, 4) float predicted deltas.
        targets: ``rpn_targets``' output.
        box_beta: smooth-L1 transition (Detectron's 1/9: deltas of well-placed anchors are small).

    Returns:
        (score_loss, box_loss), each (B,) float32: sigmoid cross-entropy over the sampled anchors and
        smooth-L1 over the sampled positives, both divided by the number sampled (at least 1, so an image
        without objects gives finite losses).
    """
    score_logits = tf.cast(score_logits, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)
    positive = tf.cast(targets["sampled_positive"], tf.float32)
    sampled = positive + tf.cast(targets["sampled_negative"], tf.float32)
    normalizer = tf.maximum(tf.reduce_sum(sampled, axis=-1), 1.0)
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=score_logits)
    score_loss = tf.reduce_sum(cross_entropy * sampled, axis=-1) / normalizer
    box_error = tf.reduce_sum(box_ops.smooth_l1(box_deltas - targets["box_targets"], box_beta), axis=-1)
    box_loss = tf.reduce_sum(box_error * positive, axis=-1) / normalizer
    return score_loss, box_loss
