"""Per-example segmentation losses: shapes, reference values, class weights, dtypes, gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from enki_seg.training.losses import LOSS_NAMES, make_loss

NUM_CLASSES = 3


def _batch(seed: int = 0, batch: int = 2, size: int = 8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, (batch, size, size)).astype(np.int32)
    logits = rng.normal(size=(batch, size, size, NUM_CLASSES)).astype(np.float32)
    return labels, logits


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_shape_dtype_finite_and_sum(name):
    labels, logits = _batch()
    loss = make_loss(name, NUM_CLASSES)(labels, logits)
    assert loss.shape == (2,) and loss.dtype == tf.float32
    assert np.all(np.isfinite(loss.numpy())) and np.all(loss.numpy() > 0)


def test_combined_is_sum_and_per_example_mean_reduces_with_global_batch():
    labels, logits = _batch()
    total = make_loss("cross_entropy+dice", NUM_CLASSES)(labels, logits)
    parts = make_loss("cross_entropy", NUM_CLASSES)(labels, logits) + make_loss("dice", NUM_CLASSES)(
        labels, logits)
    np.testing.assert_allclose(total, parts, rtol=1e-6)
    averaged = tf.nn.compute_average_loss(total, global_batch_size=4)  # two replicas of 2
    assert float(averaged) == pytest.approx(float(tf.reduce_sum(total)) / 4, rel=1e-6)


def test_cross_entropy_matches_keras_per_example_mean():
    labels, logits = _batch(seed=1)
    keras_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    expected = tf.reduce_mean(keras_loss(labels, logits), axis=[1, 2])
    np.testing.assert_allclose(make_loss("cross_entropy", NUM_CLASSES)(labels, logits), expected,
                               rtol=1e-5)


def test_class_weights_by_hand_on_1x1x2():
    # pixel a: logits (0, 0), label 0 -> CE ln 2; pixel b: logits (2, 0), label 1 -> CE ln(1 + e^2)
    labels = np.array([[[0, 1]]], np.int64)
    logits = np.array([[[[0.0, 0.0], [2.0, 0.0]]]], np.float32)
    ce_a, ce_b = math.log(2.0), math.log(1.0 + math.e ** 2)
    unweighted = make_loss("cross_entropy", 2)(labels, logits)
    assert float(unweighted[0]) == pytest.approx((ce_a + ce_b) / 2, rel=1e-6)
    weighted = make_loss("cross_entropy", 2, class_weights=[1.0, 3.0])(labels, logits)
    assert float(weighted[0]) == pytest.approx((1 * ce_a + 3 * ce_b) / (1 + 3), rel=1e-6)
    # normalized by the sum of pixel weights: only the ratio of the weights matters
    scaled = make_loss("cross_entropy", 2, class_weights=[2.0, 6.0])(labels, logits)
    assert float(scaled[0]) == pytest.approx(float(weighted[0]), rel=1e-6)
    # an example holding a single class is not changed by weighting
    single = np.zeros((1, 1, 2), np.int64)
    np.testing.assert_allclose(make_loss("cross_entropy", 2, [1.0, 3.0])(single, logits),
                               make_loss("cross_entropy", 2)(single, logits), rtol=1e-6)


def test_dice_by_hand_with_and_without_weights():
    # one pixel, p = (0.5, 0.5), label 0, s = 1:
    #   class 0: (2*0.5 + 1) / (0.5 + 1 + 1) = 0.8;  class 1: (0 + 1) / (0.5 + 0 + 1) = 2/3
    labels = np.zeros((1, 1, 1), np.int32)
    logits = np.zeros((1, 1, 1, 2), np.float32)
    assert float(make_loss("dice", 2)(labels, logits)[0]) == pytest.approx(1 - (0.8 + 2 / 3) / 2)
    weighted = make_loss("dice", 2, class_weights=[1.0, 3.0])(labels, logits)
    assert float(weighted[0]) == pytest.approx(1 - (1 * 0.8 + 3 * 2 / 3) / 4)


def test_dice_perfect_is_zero_and_all_wrong_is_one():
    labels = np.zeros((2, 16, 16), np.int32)
    labels[:, :, 8:] = 1
    one_hot = tf.one_hot(labels, 2)
    perfect = make_loss("dice", 2)(labels, 30.0 * one_hot)
    np.testing.assert_allclose(perfect, 0.0, atol=1e-6)
    wrong = make_loss("dice", 2)(labels, 30.0 * (1.0 - one_hot))
    # each class: (0 + 1) / (128 + 128 + 1) with smooth 1
    np.testing.assert_allclose(wrong, 1.0 - 1.0 / 257.0, atol=1e-6)
    assert np.all(wrong.numpy() > 0.99)


def test_uint8_labels_float16_logits_and_channel_axis():
    labels, logits = _batch(seed=2)
    reference = make_loss("cross_entropy+dice", NUM_CLASSES)(labels, logits)
    loss_fn = make_loss("cross_entropy+dice", NUM_CLASSES)
    from_uint8 = loss_fn(labels.astype(np.uint8), logits)
    np.testing.assert_allclose(from_uint8, reference, rtol=1e-6)
    np.testing.assert_allclose(loss_fn(labels[..., None].astype(np.uint8), logits), reference, rtol=1e-6)
    half = loss_fn(tf.constant(labels, tf.uint8), tf.constant(logits, tf.float16))
    assert half.dtype == tf.float32
    np.testing.assert_allclose(half, reference, rtol=2e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_finite_and_nonzero(name):
    labels, logits = _batch(seed=3)
    logits = tf.Variable(logits)
    loss_fn = make_loss(name, NUM_CLASSES, class_weights=[0.5, 1.0, 2.0])
    with tf.GradientTape() as tape:
        loss = tf.nn.compute_average_loss(loss_fn(labels, logits), global_batch_size=2)
    gradient = tape.gradient(loss, logits).numpy()
    assert np.all(np.isfinite(gradient)) and np.abs(gradient).max() > 0
    assert np.all(np.abs(gradient).reshape(2, -1).max(axis=1) > 0)  # every example contributes


def test_inside_tf_function():
    labels, logits = _batch()
    loss_fn = make_loss("cross_entropy+dice", NUM_CLASSES)
    graph = tf.function(loss_fn)
    np.testing.assert_allclose(graph(labels, logits), loss_fn(labels, logits), rtol=1e-6)


def test_errors_and_config():
    with pytest.raises(ValueError, match="unknown loss 'focal'.*cross_entropy, dice, cross_entropy\\+dice"):
        make_loss("focal", 3)
    with pytest.raises(ValueError, match="class_weights has 2 entries but num_classes is 3"):
        make_loss("cross_entropy", 3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        make_loss("dice", 2, class_weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="logits have 3 channels but num_classes is 2"):
        make_loss("dice", 2)(*_batch())
    loss_fn = make_loss("dice", 2, class_weights=[1, 2], dice_smooth=0.5)
    assert loss_fn.get_config() == {"name": "dice", "num_classes": 2, "class_weights": [1.0, 2.0],
                                    "dice_smooth": 0.5}
    assert "dice" in repr(loss_fn)
