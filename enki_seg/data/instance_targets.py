"""Per-pixel targets derived from instance labels, for instance segmentation with a semantic model.

The "boundary" target (the three-class scheme that carried the 2018 Data Science Bowl: a UNet that
tells object interiors from object boundaries separates touching nuclei, and a seeded watershed turns
its output back into instances, see ``enki_seg.inference.watershed``):

* 0 background,
* 1 interior: object pixels whose 4-neighbours all carry the same id,
* 2 boundary: object pixels next to background or to another object (the object's inner rim).

Numpy only (data code): the reader derives the target after augmentation, so the rim follows the warp.
"""
from __future__ import annotations

import numpy as np

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
#: the class count of a model trained on boundary targets
BOUNDARY_CLASSES = 3
TARGETS = ("boundary",)


def boundary_classes(instance_labels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W) integer instance labels (0 = background) -> (H, W) uint8 background/interior/boundary.

    A pixel is boundary when one of its 4-neighbours has a different id; pixels on the image edge
    keep their class from their in-image neighbours only (an object cut by the edge is not rimmed
    there: the edge is not a place where two objects touch)."""
    labels = np.asarray(instance_labels)
    if labels.ndim != 2:
        raise ValueError(f"instance labels must be (H, W), got shape {labels.shape}")
    edge = np.zeros(labels.shape, bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    if out is None:
        out = np.empty(labels.shape, np.uint8)
    foreground = labels > 0
    out[...] = BACKGROUND
    out[foreground] = INTERIOR
    out[foreground & edge] = BOUNDARY
    return out
