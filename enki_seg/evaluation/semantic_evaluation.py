"""Scores a set of predicted label images against their masks: one confusion total, one row per image, the files.

Used by ``inference.py --mask_folder`` and ``evaluate.py``, so both write the same ``metrics.json``,
``metrics.csv`` (``metrics.py``: per class precision/recall/F1/IoU/Dice and micro/macro/weighted
averages over all pixels of all images) and ``metrics_per_image.csv``. NumPy only.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from enki_seg.evaluation import metrics as seg_metrics
from enki_seg.files import atomic_path

#: Evaluation counts at most this many pixels at a time (int64 pair codes: 8 bytes each).
EVAL_CHUNK_PIXELS = 1 << 22
#: Columns of metrics_per_image.csv when no image was added (then ``iou_<class>`` columns follow).
PER_IMAGE_COLUMNS = ("image", "pixels", "accuracy", "mean_iou", "foreground_iou")


class Evaluation:
    """Confusion counts over every evaluated image, plus one row of scores per image.

    ``add`` takes (H, W) integer truth and prediction of equal shape; ``write`` writes
    ``metrics.json``, ``metrics.csv`` and ``metrics_per_image.csv`` and returns the totals.
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        self.total = seg_metrics.ConfusionAccumulator(num_classes, class_names=class_names)
        self.num_classes = num_classes
        self.class_names = class_names
        self.rows: list[dict] = []

    def add(self, name: str, truth: np.ndarray, prediction: np.ndarray) -> seg_metrics.SegmentationMetrics:
        if truth.shape != prediction.shape:
            raise ValueError(f"mask is {truth.shape[0]}x{truth.shape[1]} but the image is "
                             f"{prediction.shape[0]}x{prediction.shape[1]}")
        image = seg_metrics.ConfusionAccumulator(self.num_classes, class_names=self.class_names)
        rows_per_chunk = max(1, EVAL_CHUNK_PIXELS // max(1, truth.shape[1]))
        for start in range(0, truth.shape[0], rows_per_chunk):
            image.update(truth[start : start + rows_per_chunk], prediction[start : start + rows_per_chunk])
        return self.add_accumulated(name, image, int(truth.size))

    def add_accumulated(self, name: str, image: seg_metrics.ConfusionAccumulator,
                        pixels: int) -> seg_metrics.SegmentationMetrics:
        """Add one image whose confusion matrix was accumulated by the caller (a slide, band by band)."""
        self.total.update_matrix(image.matrix)
        scores = image.result()
        row = {"image": name, "pixels": pixels, "accuracy": scores.accuracy,
               "mean_iou": scores.mean_iou, "foreground_iou": scores.foreground_iou}
        row.update({f"iou_{n}": float(v) for n, v in zip(scores.class_names, scores.iou)})
        self.rows.append(row)
        return scores

    def write(self, folder: Path) -> seg_metrics.SegmentationMetrics:
        scores = self.total.result()
        for name, writer in (("metrics.json", seg_metrics.write_json), ("metrics.csv", seg_metrics.write_csv)):
            with atomic_path(folder / name) as tmp:
                writer(scores, tmp)
        with atomic_path(folder / "metrics_per_image.csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                columns = list(dict.fromkeys(k for row in self.rows for k in row)) or list(PER_IMAGE_COLUMNS)
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        return scores
