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


def summarize(sizes: np.ndarray, record_counts=None) -> dict:
    """``{"count": N, "area": {"p5", "p25", "p50", "p75", "p95", "max"}, "box_side": {...}}`` of (N, 3)
    ``object_sizes`` rows (``box_side`` = max(height, width)); ``{}`` when there is no object (unknown).

    ``record_counts``: (objects, pixels) of every record (a tile holds the pieces of the objects its
    edges cut too); adds ``"per_record": {"max": most objects in a record, "per_megapixel_max": most
    objects per million pixels of a record}`` (the crowding the Mask R-CNN caps follow).
    """
    sizes = np.asarray(sizes).reshape(-1, 3)
    if sizes.shape[0] == 0:
        return {}
    measures = {"area": sizes[:, 0], "box_side": sizes[:, 1:].max(axis=1)}
    summary: dict = {"count": int(sizes.shape[0])}
    for name, values in measures.items():
        summary[name] = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
        summary[name]["max"] = float(values.max())
    if record_counts is not None and len(record_counts):
        counts = np.asarray(record_counts, np.float64).reshape(-1, 2)
        summary["per_record"] = {"max": int(counts[:, 0].max()),
                                 "per_megapixel_max": float((1e6 * counts[:, 0] / np.maximum(counts[:, 1], 1)).max())}
    return summary
