"""Fixed-size seeded subsampling of positives and negatives, batched and static-shaped (for tf.function)."""
from __future__ import annotations

import tensorflow as tf


def sample_positives_negatives(positive: tf.Tensor, negative: tf.Tensor, sample_size: int,
                               positive_fraction: float, seed=(0, 0)) -> tuple[tf.Tensor, tf.Tensor]:
    """Pick at most ``sample_size`` candidates per row, at most ``positive_fraction`` of them positive.

    Positives are drawn first (up to ``round(sample_size * positive_fraction)``) and negatives fill the
    rest, each uniformly at random among its kind; as in Faster R-CNN, missing positives are replaced by
    negatives.

    Args:
        positive, negative: (B, N) bool, disjoint.
        sample_size: int, static.
        positive_fraction: float in [0, 1].
        seed: (2,) int32/int64 seed of the stateless random order: the same inputs and seed give the
            same sample, on any device and after a resume (the caller varies it from step to step).

    Returns:
        (sampled_positive, sampled_negative): (B, N) bool masks.
    """
    num_candidates = positive.shape[-1]
    if num_candidates is None:
        num_candidates = tf.shape(positive)[-1]
    max_positives = int(round(sample_size * positive_fraction))
    shape = tf.shape(positive)
    keys = tf.random.stateless_uniform(shape, seed, 0.0, 1.0)

    def pick(mask, quota, k):
        """The first ``quota`` (B,) of ``mask``'s candidates in a random order, as a (B, N) mask."""
        k = tf.minimum(k, num_candidates) if isinstance(num_candidates, tf.Tensor) else min(k, num_candidates)
        # random keys in (1, 2) on candidates and 0 elsewhere: the top k are candidates first, shuffled
        _, indices = tf.math.top_k(tf.where(mask, 1.0 + keys, 0.0), k=k)
        chosen = tf.gather(mask, indices, batch_dims=1) & (tf.range(tf.shape(indices)[-1])[None, :] < quota[:, None])
        batch_index = tf.broadcast_to(tf.range(shape[0])[:, None], tf.shape(indices))
        scatter_index = tf.reshape(tf.stack([batch_index, indices], axis=-1), (-1, 2))
        # top_k indices are distinct within a row, so no two updates land on one element
        return tf.scatter_nd(scatter_index, tf.reshape(tf.cast(chosen, tf.int32), (-1,)), shape) > 0

    num_positive = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=-1), max_positives)
    sampled_positive = pick(positive, num_positive, max(max_positives, 1))
    sampled_negative = pick(negative, sample_size - num_positive, sample_size)
    return sampled_positive, sampled_negative
