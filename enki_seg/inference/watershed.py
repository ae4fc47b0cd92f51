"""Instances from a boundary-target model's probabilities: seeded watershed (see
``enki_seg.data.instance_targets``).

Seeds are the connected regions where the interior probability is high; each seed grows over the
foreground (interior + boundary probability) down the interior-probability landscape, so touching
objects split along their predicted shared boundary. Small seeds and small objects are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from enki_seg.data.instance_targets import BOUNDARY_CLASSES, INTERIOR
from enki_seg.inference.instance import Detections


@dataclass(frozen=True)
class WatershedConfig:
    """Post-processing settings; recorded with the inference outputs.

    The defaults were chosen on DSB2018 fluorescence nuclei by a sweep on the build's internal test
    images (never on the validation images; README, "Instance segmentation with a UNet"): a high seed
    threshold keeps the seeds of touching nuclei apart (seeds at 0.5 merge them through their shared
    rim), and seeds under 8 px are mostly noise. The accuracy plateaus for seed thresholds 0.8-0.97.
    """

    seed_threshold: float = 0.9          # interior probability of a seed pixel
    foreground_threshold: float = 0.5    # interior + boundary probability of an object pixel
    min_seed_area: int = 8               # pixels; smaller seeds are noise
    min_object_area: int = 8             # pixels; smaller objects are removed


def instances_from_probabilities(probabilities: np.ndarray, config: WatershedConfig = WatershedConfig()
                                 ) -> np.ndarray:
    """(H, W, 3) softmax probabilities (background, interior, boundary) -> (H, W) int32 instance labels
    numbered 1..N in raster order of their seeds (0 = background)."""
    from skimage.segmentation import watershed

    if probabilities.ndim != 3 or probabilities.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) probabilities, got shape {probabilities.shape}")
    interior = np.asarray(probabilities[..., 1], np.float32)
    foreground = (interior + np.asarray(probabilities[..., 2], np.float32)) > config.foreground_threshold
    seeds, count = ndimage.label((interior > config.seed_threshold) & foreground)
    if count == 0:
        return np.zeros(interior.shape, np.int32)
    if config.min_seed_area > 1:
        areas = np.bincount(seeds.ravel(), minlength=count + 1)
        keep = areas >= config.min_seed_area
        keep[0] = False
        lut = np.zeros(count + 1, np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        seeds = lut[seeds]
    labels = watershed(-interior, markers=seeds, mask=foreground).astype(np.int32)
    return remove_small_objects(labels, config.min_object_area)


def remove_small_objects(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop objects smaller than ``min_area`` pixels and renumber the rest 1..N (order kept)."""
    count = int(labels.max()) if labels.size else 0
    if count == 0:
        return labels
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= max(min_area, 1)
    keep[0] = False
    lut = np.zeros(count + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def detections_from_labels(labels: np.ndarray, interior: np.ndarray) -> Detections:
    """(H, W) instance labels + (H, W) interior probability -> ``Detections`` (sorted by descending
    score; an object's score is its mean interior probability, class 1), so the Mask R-CNN outputs,
    COCO results and metrics serve both methods."""
    boxes, scores, masks, offsets = [], [], [], []
    for k, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None:
            continue
        crop = labels[window] == k
        boxes.append([window[0].start, window[1].start, window[0].stop, window[1].stop])
        scores.append(float(interior[window][crop].mean()))
        masks.append(crop)
        offsets.append([window[0].start, window[1].start])
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    return Detections(boxes=np.asarray(boxes, np.float32).reshape(-1, 4)[order],
                      scores=np.asarray(scores, np.float32)[order],
                      classes=np.ones(len(scores), np.int32),
                      masks=[masks[i] for i in order],
                      offsets=np.asarray(offsets, np.int64).reshape(-1, 2)[order])


def detections_from_probabilities(probabilities: np.ndarray, config: WatershedConfig = WatershedConfig()
                                  ) -> Detections:
    """Instances of stitched (H, W, 3) float32 probabilities: :func:`instances_from_probabilities`, then
    :func:`detections_from_labels` (scored by the interior probability)."""
    labels = instances_from_probabilities(probabilities, config)
    return detections_from_labels(labels, probabilities[..., INTERIOR])


class BoundaryDetector:
    """A boundary-target model ready for whole images, with the Mask R-CNN ``Detector``'s interface:
    the ``Segmenter`` tiles and stitches the probabilities, the seeded watershed makes instances."""

    def __init__(self, segmenter, config: WatershedConfig = WatershedConfig()):
        if segmenter.num_classes != BOUNDARY_CLASSES:
            raise ValueError(f"a boundary-target model has {BOUNDARY_CLASSES} classes, this one "
                             f"{segmenter.num_classes}")
        self.segmenter, self.config = segmenter, config

    def for_image(self, path) -> "BoundaryDetector":
        """The detector of the image at ``path``: this one (``blocks.AssembledDetector`` answers per image)."""
        return self

    def detect(self, image: np.ndarray) -> Detections:
        return detections_from_probabilities(self.segmenter.probabilities(image), self.config)
