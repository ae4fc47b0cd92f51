"""Backbones returning the feature maps C2..C5 (stride 2**level): a small GroupNorm net or a Keras ResNet."""
from __future__ import annotations

import logging
import os

import keras

logger = logging.getLogger(__name__)

# last block of each stage in keras.applications' ResNets: C2..C5
_RESNET_OUTPUTS = {
    "resnet50": {2: "conv2_block3_out", 3: "conv3_block4_out", 4: "conv4_block6_out", 5: "conv5_block3_out"},
    "resnet101": {2: "conv2_block3_out", 3: "conv3_block4_out", 4: "conv4_block23_out", 5: "conv5_block3_out"},
}

# channels of the small backbone per level (stride 2**level)
_SMALL_CHANNELS = {1: 32, 2: 64, 3: 96, 4: 128, 5: 192}


def _group_norm_relu(x, channels: int, name: str):
    # GroupNorm, not BatchNorm: trained from scratch on batches of a few tiles, batch statistics are too
    # noisy and the moving averages left test-time detections collapsed even at low training loss
    x = keras.layers.GroupNormalization(groups=min(8, channels), name=f"{name}_gn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_small_backbone(input_channels: int, min_level: int, max_level: int) -> keras.Model:
    """A stride-2 3x3 conv per level (plus a 3x3 refinement conv from level 2 on), GroupNorm + ReLU each.

    Input ``(B, H, W, input_channels)``; outputs ``[C_min_level, ..., C_max_level]``, C_l of shape
    ``(B, ceil(H / 2**l), ceil(W / 2**l), channels_l)``.
    """
    image = keras.Input((None, None, input_channels), name="image")
    x = image
    outputs = []
    for level in range(1, max_level + 1):
        channels = _SMALL_CHANNELS[level]
        x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False, name=f"c{level}_down")(x)
        x = _group_norm_relu(x, channels, f"c{level}_down")
        if level >= 2:
            x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"c{level}_conv")(x)
            x = _group_norm_relu(x, channels, f"c{level}_conv")
        if level >= min_level:
            outputs.append(x)
    return keras.Model(image, outputs, name="small_backbone")


def build_resnet_backbone(name: str, input_channels: int, min_level: int, weights: str | None = None
                          ) -> keras.Model:
    """keras.applications ResNet-50/101 (no top) returning ``[C_min_level, ..., C5]``.

    Args:
        name: "resnet50" or "resnet101".
        input_channels: any count; with ``weights`` for 3 channels, the first conv is skipped (random).
        min_level: first returned level (2..5).
        weights: None, or the path of a local Keras weights file (.h5 / .weights.h5) of the same ResNet.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: the file does not fit this ResNet.
    """
    constructor = {"resnet50": keras.applications.ResNet50, "resnet101": keras.applications.ResNet101}[name]
    resnet = constructor(include_top=False, weights=None, input_shape=(None, None, input_channels))
    if weights is not None:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"backbone_weights {weights!r} does not exist")
        try:
            # skip_mismatch: the stem conv of a 3-channel file does not fit other channel counts
            resnet.load_weights(weights, skip_mismatch=True)
        except Exception as error:  # Keras raises several types for a file of another architecture
            raise ValueError(f"backbone_weights {weights!r} do not fit keras.applications {name}: {error}") from error
        logger.info("loaded %s backbone weights from %s", name, weights)
    outputs = [resnet.get_layer(_RESNET_OUTPUTS[name][level]).output for level in range(min_level, 6)]
    return keras.Model(resnet.input, outputs, name=f"{name}_backbone")
