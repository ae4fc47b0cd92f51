"""Segmentation models (Keras, channels-last, returning logits) and their builder by name; Mask R-CNN
(``models.maskrcnn``) is assembled from its parts and built by ``train_maskrcnn.py``.

Importing this package imports Keras; data code never imports it (the reader takes
``size_multiple=model.size_multiple`` instead).

    from models import build_model
    model = build_model("unet", input_channels=1, num_classes=2, depth=4)
    model.check_input(tile_size, tile_size)  # clear ValueError if the tile does not fit
"""
from __future__ import annotations

import keras

from .common import InputSizeCheck, check_input_size
from .fc_densenet import CONFIGS as FC_DENSENET_CONFIGS
from .fc_densenet import FCDenseNet
from .maskrcnn import MaskRCNN, MaskRCNNConfig
from .unet import UNet

_MODELS: dict[str, type[keras.Model]] = {
    "unet": UNet,
    "fc-densenet": FCDenseNet,
}

#: Names ``build_model`` accepts.
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)

__all__ = ["MODEL_NAMES", "FC_DENSENET_CONFIGS", "FCDenseNet", "InputSizeCheck", "MaskRCNN", "MaskRCNNConfig",
           "UNet", "build_model",
           "check_input_size"]


def build_model(name: str, input_channels: int, num_classes: int, **options) -> keras.Model:
    """Build the model ``name`` ("unet" or "fc-densenet") with the class's keyword ``options``.

    Args:
        name: one of ``MODEL_NAMES``.
        input_channels: channels of the input images.
        num_classes: logit channels of the output.
        **options: the model's other constructor arguments, e.g. ``depth=4`` for "unet" or
            ``config="103"`` for "fc-densenet".

    Returns:
        The model: input ``(batch, H, W, input_channels)``, output ``(batch, H, W, num_classes)``
        float32 logits; ``model.size_multiple`` is what H and W must be multiples of.
    """
    try:
        model_class = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    return model_class(input_channels=input_channels, num_classes=num_classes, **options)
