"""U-Net (Ronneberger et al. 2015) with NIST's choices: same-padding, batch norm, dropout at the bottom.

The topology follows NIST's ``semantic-segmentation-unet`` (``UNet/model.py``): per level two 3x3
convolutions, each ReLU-activated and then batch-normalized; 2x2 max pooling; dropout on the
deepest encoder level and on the bottleneck; a 2x2 stride-2 transposed convolution (batch-normalized,
linear) up, concatenated with the skip; a final 1x1 convolution to class logits. Differences from
NIST: channels-last instead of channels-first, and the output is raw logits (NIST applied ReLU, batch
norm and a softmax to them; loss and softmax belong to the trainer here).
"""
from __future__ import annotations

import keras

from .common import BN_MOMENTUM, InputSizeCheck


@keras.saving.register_keras_serializable(package="enki")
class UNet(InputSizeCheck, keras.Model):
    """U-Net returning per-pixel class logits.

    Input: ``(batch, height, width, input_channels)`` float, height and width multiples of
    ``size_multiple``. Output: ``(batch, height, width, num_classes)`` float32 logits (float32 also
    under a mixed-precision policy).

    Args:
        input_channels: int, channels of the input image.
        num_classes: int, number of classes (logit channels), >= 2.
        depth: int, number of 2x2 poolings; the bottleneck runs at 1/2**depth resolution. NIST: 4.
        base_filters: int, filters of the first level; each level below doubles them. NIST: 64.
        dropout: float, dropout rate on the deepest encoder level (also fed to its skip connection,
            as NIST does) and on the bottleneck; 0 disables it. NIST: 0.5.
        batch_norm: bool, batch normalization after every convolution (and up-convolution).
        **kwargs: passed to ``keras.Model`` (``name``, ``trainable``).

    Example:
        model = UNet(input_channels=1, num_classes=2)
        logits = model(np.ones((2, 256, 256, 1)), training=False)  # (2, 256, 256, 2)
    """

    def __init__(self, input_channels: int, num_classes: int, depth: int = 4, base_filters: int = 64,
                 dropout: float = 0.5, batch_norm: bool = True, **kwargs):
        if input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {input_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background counts), got {num_classes}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if base_filters < 1:
            raise ValueError(f"base_filters must be >= 1, got {base_filters}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        def conv_block(x, filters, prefix):
            for i in (1, 2):
                # NIST's order: the ReLU sits inside the convolution and batch norm follows it
                x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                        name=f"{prefix}_conv{i}")(x)
                # synchronized: under MirroredStrategy, batch statistics are all-reduced, so every replica holds
                # the same moving statistics (a checkpoint then restores them exactly; small per-GPU batches
                # get statistics of the global batch). Without a strategy it is plain batch norm.
                if batch_norm:
                    x = keras.layers.BatchNormalization(synchronized=True, momentum=BN_MOMENTUM, name=f"{prefix}_bn{i}")(x)
            return x

        def maybe_dropout(x, prefix):
            return keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(x) if dropout > 0 else x

        image = keras.Input(shape=(None, None, input_channels), name="image")
        x = image
        skips = []
        for level in range(depth):
            x = conv_block(x, base_filters * 2**level, f"down{level + 1}")
            if level == depth - 1:
                x = maybe_dropout(x, f"down{level + 1}")
            skips.append(x)
            x = keras.layers.MaxPooling2D(2, name=f"down{level + 1}_pool")(x)
        x = conv_block(x, base_filters * 2**depth, "bottleneck")
        x = maybe_dropout(x, "bottleneck")
        for level in reversed(range(depth)):
            prefix = f"up{level + 1}"
            x = keras.layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, padding="same",
                                             name=f"{prefix}_upconv")(x)
            if batch_norm:
                x = keras.layers.BatchNormalization(synchronized=True, momentum=BN_MOMENTUM, name=f"{prefix}_upconv_bn")(x)
            x = keras.layers.Concatenate(name=f"{prefix}_concat")([skips[level], x])
            x = conv_block(x, base_filters * 2**level, prefix)
        # float32 even under mixed precision: softmax/cross-entropy on float16 logits loses precision
        logits = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)

        kwargs.setdefault("name", "unet")
        super().__init__(inputs=image, outputs=logits, **kwargs)

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.depth = depth
        self.base_filters = base_filters
        self.dropout = dropout
        self.batch_norm = batch_norm

    @property
    def size_multiple(self) -> int:
        """Height and width of the input must be multiples of this (2**depth)."""
        return 2**self.depth

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_channels": self.input_channels,
            "num_classes": self.num_classes,
            "depth": self.depth,
            "base_filters": self.base_filters,
            "dropout": self.dropout,
            "batch_norm": self.batch_norm,
        }

    @classmethod
    def from_config(cls, config: dict) -> "UNet":
        return cls(**config)

