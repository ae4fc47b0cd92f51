"""Overlays: an image with class labels tinted, for TensorBoard, the trainers' test images and inference."""
from __future__ import annotations

import numpy as np

#: tints of classes 1, 2, ... (class 0, the background, stays untinted), cycling past the end
PALETTE = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 1, 0.2], [1, 0.3, 1],
                    [0.2, 1, 1]], np.float32)


def overlay(image, mask, num_classes: int) -> np.ndarray:
    """(H, W) float image + (H, W) labels -> (H, W, 3) uint8 with classes tinted (class 0 untinted);
    the image is stretched between its 1st and 99th percentiles."""
    img = np.asarray(image, np.float32)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for c in range(1, num_classes):
        where = np.asarray(mask) == c
        rgb[where] = 0.55 * rgb[where] + 0.45 * PALETTE[1 + (c - 1) % (len(PALETTE) - 1)]
    return (rgb * 255).astype(np.uint8)
