"""Feature pyramid network: lateral 1x1 convs, top-down upsample-and-add, 3x3 output convs, pooled extra levels."""
from __future__ import annotations

import keras


def build_fpn(backbone_channels: dict[int, int], min_level: int, max_level: int, channels: int,
              name: str = "fpn") -> keras.Model:
    """FPN over backbone maps ``{level: channels}`` (consecutive levels from ``min_level``).

    Inputs ``[C_min, ..., C_last]`` (sides halving per level, as with inputs that are multiples of
    ``2**max_level``); outputs ``[P_min, ..., P_max]``, each ``(B, H_l, W_l, channels)``. Levels above the
    backbone's last come from stride-2 max pooling of the level below (P6 of the FPN paper).
    """
    backbone_levels = sorted(backbone_channels)
    inputs = {level: keras.Input((None, None, backbone_channels[level]), name=f"c{level}")
              for level in backbone_levels}
    laterals = {level: keras.layers.Conv2D(channels, 1, name=f"lateral{level}")(inputs[level])
                for level in backbone_levels}
    top_down = {backbone_levels[-1]: laterals[backbone_levels[-1]]}
    for level in reversed(backbone_levels[:-1]):
        upsampled = keras.layers.UpSampling2D(2, interpolation="nearest",
                                              name=f"upsample{level + 1}")(top_down[level + 1])
        top_down[level] = keras.layers.Add(name=f"merge{level}")([laterals[level], upsampled])
    outputs = {level: keras.layers.Conv2D(channels, 3, padding="same", name=f"output{level}")(top_down[level])
               for level in backbone_levels if level <= max_level}
    for level in range(backbone_levels[-1] + 1, max_level + 1):
        outputs[level] = keras.layers.MaxPooling2D(1, strides=2, name=f"pool{level}")(outputs[level - 1])
    return keras.Model([inputs[level] for level in backbone_levels],
                       [outputs[level] for level in range(min_level, max_level + 1)], name=name)
