"""FC-DenseNet, the "One Hundred Layers Tiramisu" (Jégou et al. 2017, arXiv:1611.09326).

Dense blocks (each layer BN-ReLU-Conv3x3-Dropout adds ``growth_rate`` feature maps and sees all
earlier ones) on a down path joined by transitions down (BN-ReLU-Conv1x1-Dropout-MaxPool2x2), a
bottleneck block, and an up path of transitions up (3x3 stride-2 transposed convolutions of only the
previous block's new feature maps) concatenated with the skip connections. Layer counts, growth
rates, He-uniform initialisation and the 48-filter first convolution follow the paper and its
reference implementation (SimJeg/FC-DenseNet). The paper's weight decay of 1e-4 belongs to the
trainer's optimizer, not to this model.
"""
from __future__ import annotations

from typing import Sequence

import keras

from .common import BN_MOMENTUM, InputSizeCheck

#: The paper's three networks: (layers per block, down path + bottleneck + up path), growth rate.
CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "56": ((4,) * 11, 12),
    "67": ((5,) * 11, 16),
    "103": ((4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4), 16),
}

_DEFAULT_NUM_POOLS = 5  # the paper's five transitions down
_INITIALIZER = "he_uniform"  # the paper's choice (He et al. 2015)


def resolve_blocks(config: str | None, layers_per_block: Sequence[int] | int | None,
                   growth_rate: int | None, num_pools: int | None) -> tuple[list[int], int]:
    """The full list of layers per dense block (length 2*num_pools+1) and the growth rate.

    Explicit ``layers_per_block`` / ``growth_rate`` override the preset ``config``; an int
    ``layers_per_block`` means that many layers in each of 2*num_pools+1 blocks (num_pools default 5).
    """
    if config is not None:
        config = str(config)
        if config not in CONFIGS:
            raise ValueError(f"unknown FC-DenseNet config {config!r}; choose one of {sorted(CONFIGS, key=int)} "
                             "or pass layers_per_block and growth_rate with config=None")
        preset_layers, preset_growth = CONFIGS[config]
        if layers_per_block is None:
            layers_per_block = list(preset_layers)
        if growth_rate is None:
            growth_rate = preset_growth
    if layers_per_block is None or growth_rate is None:
        raise ValueError("without a config, both layers_per_block and growth_rate are required")
    if isinstance(layers_per_block, int):
        pools = _DEFAULT_NUM_POOLS if num_pools is None else num_pools
        if pools < 1:
            raise ValueError(f"num_pools must be >= 1, got {pools}")
        layers = [layers_per_block] * (2 * pools + 1)
    else:
        layers = [int(n) for n in layers_per_block]
        if len(layers) < 3 or len(layers) % 2 == 0:
            raise ValueError(f"layers_per_block needs 2*num_pools+1 entries (down blocks, bottleneck, up "
                             f"blocks), got {len(layers)}: {layers}")
        if num_pools is not None and num_pools != len(layers) // 2:
            raise ValueError(f"num_pools {num_pools} does not match layers_per_block {layers}, which has "
                             f"{len(layers) // 2} pools")
    if min(layers) < 1:
        raise ValueError(f"every dense block needs >= 1 layer, got {layers}")
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
    return layers, int(growth_rate)


@keras.saving.register_keras_serializable(package="enki")
class FCDenseNet(InputSizeCheck, keras.Model):
    """FC-DenseNet returning per-pixel class logits.

    Input: ``(batch, height, width, input_channels)`` float, height and width multiples of
    ``size_multiple`` (32 for the paper's networks). Output: ``(batch, height, width, num_classes)``
    float32 logits (float32 also under a mixed-precision policy).

    Args:
        input_channels: int, channels of the input image.
        num_classes: int, number of classes (logit channels), >= 2.
        config: str or None, "56", "67" or "103" (the paper's networks); explicit
            ``layers_per_block`` / ``growth_rate`` override its values; None requires both.
        layers_per_block: list of ints (2*num_pools+1 entries: down blocks, bottleneck, up blocks)
            or one int for every block.
        growth_rate: int, feature maps each dense layer adds (paper: 12 for 56, 16 for 67 and 103).
        num_pools: int or None, transitions down; only needed with an int ``layers_per_block``
            (default 5), otherwise implied by the list's length.
        first_filters: int, filters of the first 3x3 convolution (paper: 48).
        dropout: float, dropout rate after every dense-layer and transition-down convolution
            (paper: 0.2); 0 disables it.
        **kwargs: passed to ``keras.Model`` (``name``, ``trainable``).

    Example:
        model = FCDenseNet(input_channels=3, num_classes=4, config="103")
        logits = model(np.ones((2, 224, 224, 3)), training=False)  # (2, 224, 224, 4)
    """

    def __init__(self, input_channels: int, num_classes: int, config: str | None = "56",
                 layers_per_block: Sequence[int] | int | None = None, growth_rate: int | None = None,
                 num_pools: int | None = None, first_filters: int = 48, dropout: float = 0.2, **kwargs):
        if input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {input_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background counts), got {num_classes}")
        if first_filters < 1:
            raise ValueError(f"first_filters must be >= 1, got {first_filters}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers, growth_rate = resolve_blocks(config, layers_per_block, growth_rate, num_pools)
        num_pools = len(layers) // 2

        def bn_relu_conv(x, filters, kernel_size, prefix):
            # synchronized: under MirroredStrategy, batch statistics are all-reduced, so every replica holds
            # the same moving statistics (a checkpoint then restores them exactly; small per-GPU batches
            # get statistics of the global batch). Without a strategy it is plain batch norm.
            x = keras.layers.BatchNormalization(synchronized=True, momentum=BN_MOMENTUM, name=f"{prefix}_bn")(x)
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
            x = keras.layers.Conv2D(filters, kernel_size, padding="same", kernel_initializer=_INITIALIZER,
                                    name=f"{prefix}_conv")(x)
            if dropout > 0:
                x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
            return x

        def dense_block(x, num_layers, prefix):
            """Returns (input and all new maps concatenated, the new maps alone concatenated)."""
            new_maps = []
            for j in range(num_layers):
                y = bn_relu_conv(x, growth_rate, 3, f"{prefix}_layer{j + 1}")
                new_maps.append(y)
                x = keras.layers.Concatenate(name=f"{prefix}_layer{j + 1}_concat")([x, y])
            if len(new_maps) > 1:
                new = keras.layers.Concatenate(name=f"{prefix}_new_maps")(new_maps)
            else:
                new = new_maps[0]
            return x, new

        image = keras.Input(shape=(None, None, input_channels), name="image")
        x = keras.layers.Conv2D(first_filters, 3, padding="same", kernel_initializer=_INITIALIZER,
                                name="first_conv")(image)
        skips = []
        for i in range(num_pools):
            x, _ = dense_block(x, layers[i], f"down{i + 1}")
            skips.append(x)
            x = bn_relu_conv(x, x.shape[-1], 1, f"transition_down{i + 1}")
            x = keras.layers.MaxPooling2D(2, name=f"transition_down{i + 1}_pool")(x)
        # only the bottleneck's new maps go up: upsampling its input too would be too many maps
        _, to_upsample = dense_block(x, layers[num_pools], "bottleneck")
        for i in range(num_pools):
            prefix = f"up{num_pools - i}"
            x = keras.layers.Conv2DTranspose(growth_rate * layers[num_pools + i], 3, strides=2,
                                             padding="same", kernel_initializer=_INITIALIZER,
                                             name=f"{prefix}_transition_up")(to_upsample)
            x = keras.layers.Concatenate(name=f"{prefix}_skip_concat")([x, skips[num_pools - 1 - i]])
            x, to_upsample = dense_block(x, layers[num_pools + 1 + i], prefix)
        # float32 even under mixed precision: softmax/cross-entropy on float16 logits loses precision
        logits = keras.layers.Conv2D(num_classes, 1, kernel_initializer=_INITIALIZER, dtype="float32",
                                     name="logits")(x)

        kwargs.setdefault("name", f"fc_densenet_{config}" if config is not None else "fc_densenet")
        super().__init__(inputs=image, outputs=logits, **kwargs)

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.config = None if config is None else str(config)
        self.layers_per_block = layers
        self.growth_rate = growth_rate
        self.num_pools = num_pools
        self.first_filters = first_filters
        self.dropout = dropout

    @property
    def size_multiple(self) -> int:
        """Height and width of the input must be multiples of this (2**num_pools)."""
        return 2**self.num_pools

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_channels": self.input_channels,
            "num_classes": self.num_classes,
            "config": self.config,
            "layers_per_block": list(self.layers_per_block),
            "growth_rate": self.growth_rate,
            "num_pools": self.num_pools,
            "first_filters": self.first_filters,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict) -> "FCDenseNet":
        return cls(**config)
