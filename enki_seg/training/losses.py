"""Segmentation losses returning one value per example, for a custom MirroredStrategy training loop.

Each loss maps ``labels`` (B, H, W) integer class ids and ``logits`` (B, H, W, K) to a (B,) float32
per-example loss. The trainer, not the loss, reduces over the batch, dividing by the GLOBAL batch
size so that summing the replicas' gradients gives the gradient of the global mean::

    loss_fn = make_loss("cross_entropy+dice", num_classes=3, class_weights=[0.2, 1.0, 1.0])
    per_example = loss_fn(semantic_mask, model(image, training=True))
    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)

Definitions (per example; sums run over that example's pixels):

* ``cross_entropy`` — sparse softmax cross-entropy from logits, averaged over pixels. With
  ``class_weights`` each pixel's loss is multiplied by ``weight[label]`` and the sum is divided by
  the sum of those weights (not by the pixel count), so the loss stays on the unweighted scale and
  multiplying all weights by a constant changes nothing (PyTorch's ``CrossEntropyLoss(weight=...)``
  convention, applied per example). Consequently an example containing one class only is unaffected
  by weighting; weights shift emphasis between classes inside an example. An example whose pixels
  all have weight 0 has loss 0.
* ``dice`` — soft multi-class Dice: ``1 - mean_k (2 sum(p_k y_k) + s) / (sum(p_k) + sum(y_k) + s)``
  with ``p = softmax(logits)``, ``y`` the one-hot labels and ``s = dice_smooth``. A class absent from
  the example's labels and predicted nowhere scores ~1 (thanks to ``s``) rather than 0/0. With
  ``class_weights`` the mean over classes is the weighted mean ``sum_k w_k d_k / sum_k w_k``.
* ``cross_entropy+dice`` — the sum of the two (same class weights in both).

Logits may be float16 or bfloat16 (mixed precision); they are cast to float32 first so the softmax
and the sums are computed at full precision. Labels may be any integer dtype, uint8 included, and a
trailing channel axis of size 1 ((B, H, W, 1)) is accepted. Labels must lie in [0, K): there is no
ignore label here.
"""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

LOSS_NAMES = ("cross_entropy", "dice", "cross_entropy+dice")


def _prepare(labels, logits, num_classes: int) -> tuple[tf.Tensor, tf.Tensor]:
    """int32 labels (B, ...) and float32 logits (B, ..., K), shapes checked where known."""
    logits = tf.convert_to_tensor(logits)
    logits = tf.cast(logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape.rank == logits.shape.rank:
        labels = tf.squeeze(labels, axis=-1)  # (B, H, W, 1) masks straight from a reader
    labels = tf.cast(labels, tf.int32)
    channels = logits.shape[-1]
    if channels is not None and channels != num_classes:
        raise ValueError(f"logits have {channels} channels but num_classes is {num_classes}")
    return labels, logits


def _spatial_axes(tensor: tf.Tensor) -> list[int]:
    """Every axis but the batch axis (the labels' layout: (B, H, W))."""
    return list(range(1, tensor.shape.rank))


def cross_entropy(labels, logits, num_classes: int, class_weights: tf.Tensor | None = None) -> tf.Tensor:
    """(B,) float32 per-example (class-weighted) mean cross-entropy; see the module docstring."""
    labels, logits = _prepare(labels, logits, num_classes)
    pixel_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    axes = _spatial_axes(pixel_loss)
    if class_weights is None:
        return tf.reduce_mean(pixel_loss, axis=axes)
    pixel_weight = tf.gather(class_weights, labels)
    return tf.math.divide_no_nan(tf.reduce_sum(pixel_weight * pixel_loss, axis=axes),
                                 tf.reduce_sum(pixel_weight, axis=axes))


def dice(labels, logits, num_classes: int, class_weights: tf.Tensor | None = None,
         smooth: float = 1.0) -> tf.Tensor:
    """(B,) float32 per-example soft Dice loss, 1 - (weighted) mean over classes of the Dice score."""
    labels, logits = _prepare(labels, logits, num_classes)
    probabilities = tf.nn.softmax(logits, axis=-1)
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    axes = _spatial_axes(labels)  # pixel axes; the class axis stays
    intersection = tf.reduce_sum(probabilities * one_hot, axis=axes)  # (B, K)
    total = tf.reduce_sum(probabilities, axis=axes) + tf.reduce_sum(one_hot, axis=axes)
    score = (2.0 * intersection + smooth) / (total + smooth)
    if class_weights is None:
        return 1.0 - tf.reduce_mean(score, axis=-1)
    return 1.0 - tf.reduce_sum(score * class_weights, axis=-1) / tf.reduce_sum(class_weights)


class SegmentationLoss:
    """A named per-example loss: ``loss(labels, logits) -> (B,) float32``. Build with :func:`make_loss`."""

    def __init__(self, name: str, num_classes: int, class_weights: Sequence[float] | None = None,
                 dice_smooth: float = 1.0):
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != num_classes:
                raise ValueError(f"class_weights has {len(class_weights)} entries but num_classes is "
                                 f"{num_classes}")
            if min(class_weights) < 0 or sum(class_weights) <= 0:
                raise ValueError(f"class_weights must be >= 0 with a positive sum, got {class_weights}")
        if dice_smooth < 0:
            raise ValueError(f"dice_smooth must be >= 0, got {dice_smooth}")
        self.name = name
        self.num_classes = num_classes
        self.class_weights = class_weights
        self.dice_smooth = float(dice_smooth)
        self._weights = None if class_weights is None else tf.constant(class_weights, tf.float32)

    def __call__(self, labels, logits) -> tf.Tensor:
        """labels (B, H, W) int, logits (B, H, W, K) float -> (B,) float32."""
        parts = []
        if self.name in ("cross_entropy", "cross_entropy+dice"):
            parts.append(cross_entropy(labels, logits, self.num_classes, self._weights))
        if self.name in ("dice", "cross_entropy+dice"):
            parts.append(dice(labels, logits, self.num_classes, self._weights, self.dice_smooth))
        return tf.add_n(parts) if len(parts) > 1 else parts[0]

    def get_config(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes,
                "class_weights": self.class_weights, "dice_smooth": self.dice_smooth}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"SegmentationLoss({args})"


def make_loss(name: str, num_classes: int, class_weights: Sequence[float] | None = None,
              dice_smooth: float = 1.0) -> SegmentationLoss:
    """Build a per-example segmentation loss.

    Args:
        name: one of :data:`LOSS_NAMES`.
        num_classes: K, the logits' channel count.
        class_weights: K non-negative weights (positive sum), or None for unweighted.
        dice_smooth: the Dice smoothing term ``s`` (pixels' worth of probability mass).

    Returns:
        A callable ``(labels (B, H, W) int, logits (B, H, W, K) float) -> (B,) float32``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), or ``class_weights`` whose
            length differs from ``num_classes`` (the message names both numbers).
    """
    return SegmentationLoss(name, num_classes, class_weights, dice_smooth)
