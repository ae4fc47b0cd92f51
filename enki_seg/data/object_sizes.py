"""Object size statistics of instance labels: per-object area and box sides, summarised for the metadata.

The builder measures the objects of each whole source image (before tiling: an object cut by a tile
edge would count as a smaller one) and stores the summary as ``DatasetMetadata.object_stats``; the
Mask R-CNN trainer sizes its anchors and the inference overlap from it. NumPy and SciPy only.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Percentiles stored for every measure, plus its max (``"max"``).
PERCENTILES = (5, 25, 50, 75, 95)


def object_sizes(instance_labels: np.ndarray) -> np.ndarray:
    """(N, 3) int64 rows (area in pixels, box height, box width), one per object id present.

    ``instance_labels``: (H, W) non-negative integer image, 0 background; ids in ascending order.
    """
    labels = np.asarray(instance_labels)
    if labels.size == 0 or labels.max() == 0:
        return np.zeros((0, 3), np.int64)
    # renumber 1..N first: ids may be sparse (up to 2**31), and find_objects allocates one slot per id
    ids, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape) + (0 if ids[0] == 0 else 1)
    areas = np.bincount(compact.ravel())
    rows = [(areas[index + 1], where[0].stop - where[0].start, where[1].stop - where[1].start)
            for index, where in enumerate(ndimage.find_objects(compact)) if where is not None]
    return np.asarray(rows, np.int64).reshape(-1, 3)


def summarize(sizes: np.ndarray, densities=None) -> dict:
    """``{"count": N, "area": {"p5", "p25", "p50", "p75", "p95", "max"}, "box_side": {...}}`` of (N, 3)
    ``object_sizes`` rows (``box_side`` = max(height, width)); ``{}`` when there is no object (unknown).

    ``densities``: objects per megapixel of each source image (:func:`per_megapixel`); adds
    ``"per_megapixel": {percentiles, "max"}`` (the crowding the Mask R-CNN caps follow).
    """
    sizes = np.asarray(sizes).reshape(-1, 3)
    if sizes.shape[0] == 0:
        return {}
    measures = {"area": sizes[:, 0], "box_side": sizes[:, 1:].max(axis=1)}
    if densities is not None and len(densities):
        measures["per_megapixel"] = np.asarray(densities, np.float64)
    summary: dict = {"count": int(sizes.shape[0])}
    for name, values in measures.items():
        summary[name] = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
        summary[name]["max"] = float(values.max())
    return summary


def per_megapixel(count: int, height: int, width: int) -> float:
    """Objects per million pixels of an image of ``height`` x ``width`` holding ``count`` objects."""
    return 1e6 * count / max(1, height * width)
