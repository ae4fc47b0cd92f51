"""Mask R-CNN for instance segmentation: config, Keras model and the numpy paste of masks into the image."""
from __future__ import annotations

from .config import MaskRCNNConfig
from .model import MaskRCNN
from .postprocess import paste_masks

__all__ = ["MaskRCNN", "MaskRCNNConfig", "paste_masks"]
