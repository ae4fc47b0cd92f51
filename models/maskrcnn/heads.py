"""Second-stage heads on ROIAlign features: box classification/regression and per-class mask logits."""
from __future__ import annotations

import keras


def build_box_head(channels: int, pool_size: int, fc_dim: int, num_classes: int, name: str = "box_head"
                   ) -> keras.Model:
    """Two fully connected layers, then class logits and class-specific box deltas.

    Input ``(K, pool_size, pool_size, channels)``; outputs ``(K, num_classes)`` float32 logits and
    ``(K, 4 * num_classes)`` float32 deltas (class-major: columns ``4c..4c+3`` belong to class c).
    """
    features = keras.Input((pool_size, pool_size, channels))
    x = keras.layers.Flatten(name="flatten")(features)
    x = keras.layers.Dense(fc_dim, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(fc_dim, activation="relu", name="fc2")(x)
    # Detectron's initialisation: near-zero outputs so early losses are those of uniform guesses
    logits = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                dtype="float32", name="class_logits")(x)
    deltas = keras.layers.Dense(4 * num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
                                dtype="float32", name="box_deltas")(x)
    return keras.Model(features, [logits, deltas], name=name)


def build_mask_head(channels: int, resolution: int, num_convs: int, conv_channels: int, num_classes: int,
                    name: str = "mask_head") -> keras.Model:
    """``num_convs`` 3x3 conv + ReLU, a stride-2 transposed conv + ReLU, and 1x1 conv to per-class logits.

    Input ``(K, resolution / 2, resolution / 2, channels)``; output ``(K, resolution, resolution,
    num_classes)`` float32 mask logits.
    """
    half = resolution // 2
    features = keras.Input((half, half, channels))
    x = features
    for i in range(num_convs):
        x = keras.layers.Conv2D(conv_channels, 3, padding="same", activation="relu", kernel_initializer="he_normal",
                                name=f"conv{i + 1}")(x)
    x = keras.layers.Conv2DTranspose(conv_channels, 2, strides=2, activation="relu", kernel_initializer="he_normal",
                                     name="upsample")(x)
    logits = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="mask_logits")(x)
    return keras.Model(features, logits, name=name)
