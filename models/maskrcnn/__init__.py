"""Mask R-CNN for instance segmentation: config, Keras model and numpy helpers turning detections into labels."""
from __future__ import annotations

from .config import MaskRCNNConfig
from .model import MaskRCNN
from .postprocess import detections_to_instance_labels, paste_masks

__all__ = ["MaskRCNN", "MaskRCNNConfig", "detections_to_instance_labels", "paste_masks"]
