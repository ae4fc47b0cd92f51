"""Scores a set of predicted instance-label images against true ones: object matching, COCO AP, the files.

Used by ``evaluate.py --instance 1``. Per image, ``instance_matching.match_image`` (TP/FP/FN,
precision, recall, F1, accuracy TP/(TP+FP+FN), panoptic quality at IoU 0.5 ... 0.95 and the DSB2018
score) and, over the folder, ``instance_matching.folder_summary`` plus COCO box and mask AP
(``coco_ap.CocoEvaluator``, one class "object"). NumPy, SciPy and pycocotools only.

COCO AP needs a confidence per detection and a label image has none: predicted object ids are
taken as the ranking, the lowest id the most confident (the order ``inference.py`` numbers its
detections in, by score). For labels from other tools the ids carry no ranking and the AP is that
of an arbitrary order; the matching scores do not depend on it.

Files (``write``): ``metrics.json`` (the COCO statistics as ``inference.py --mask_folder`` writes
them for a Mask R-CNN run, plus ``instance_matching``), ``metrics.csv`` (one row per IoU threshold)
and ``metrics_per_image.csv`` (per image: object counts, DSB score, scores at IoU 0.5 and 0.75).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from enki_seg.evaluation import coco_ap, instance_matching
from enki_seg.files import atomic_path, atomic_write_text

#: Columns of metrics.csv, one row per IoU threshold of the folder's summed counts.
THRESHOLD_COLUMNS = ("threshold", "true_positives", "false_positives", "false_negatives", "precision", "recall",
                     "f1", "accuracy", "mean_matched_iou", "panoptic_quality", "per_image_mean_accuracy")
#: The thresholds reported in metrics_per_image.csv (all of them are in metrics.json).
PER_IMAGE_THRESHOLDS = (0.5, 0.75)


def label_detections(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """The objects of an (H, W) integer instance-label image (0 background) as COCO detections.

    Returns (boxes (N, 4) float64 [y0, x0, y1, x1] end exclusive, scores (N,) float64 in (0, 1]
    decreasing with the object id, classes (N,) int all 1, N RLE masks), objects in ascending id order.
    """
    height, width = labels.shape
    boxes, rles = [], []
    for index, where in enumerate(ndimage.find_objects(labels)):
        if where is None:
            continue
        crop = labels[where] == index + 1
        rles.append(coco_ap.crop_to_rle(crop, where[0].start, where[1].start, height, width))
        boxes.append([where[0].start, where[1].start, where[0].stop, where[1].stop])
    count = len(boxes)
    scores = 1.0 - np.arange(count, dtype=np.float64) / max(count, 1)
    return (np.asarray(boxes, np.float64).reshape(-1, 4), scores, np.ones(count, np.int64), rles)


class InstanceEvaluation:
    """Object matching and COCO AP over every added image, plus one row of scores per image.

    ``add`` takes (H, W) non-negative integer true and predicted instance labels of equal shape
    (ids arbitrary, 0 background); ``write`` writes the files and returns the summary.
    """

    def __init__(self):
        self.matchings: list[instance_matching.InstanceMatching] = []
        self.rows: list[dict] = []
        self.coco = coco_ap.CocoEvaluator([1], {1: "object"})

    def add(self, name: str, truth: np.ndarray, prediction: np.ndarray) -> instance_matching.InstanceMatching:
        """Score one image; ValueError when the shapes differ."""
        if truth.shape != prediction.shape:
            raise ValueError(f"true labels are {truth.shape[0]}x{truth.shape[1]} but the prediction is "
                             f"{prediction.shape[0]}x{prediction.shape[1]}")
        matching = instance_matching.match_image(truth, prediction)
        height, width = truth.shape
        true_classes = np.ones(int(truth.max()), np.int64)
        self.coco.add_image(name, height, width, truth, true_classes, *label_detections(prediction))
        self.matchings.append(matching)
        first = matching.scores[0]
        row = {"image": name, "true_objects": first.true_positives + first.false_negatives,
               "predicted_objects": first.true_positives + first.false_positives, "dsb_score": matching.dsb_score}
        for threshold in PER_IMAGE_THRESHOLDS:
            scores = matching.at(threshold)
            row.update({f"{key}@{threshold}": getattr(scores, key)
                        for key in ("true_positives", "false_positives", "false_negatives", "f1", "accuracy",
                                    "panoptic_quality")})
        self.rows.append(row)
        return matching

    def summary(self) -> dict:
        """COCO statistics (``CocoEvaluator.evaluate``) plus ``instance_matching`` (``folder_summary``)."""
        if not self.matchings:
            raise ValueError("no image was added")
        scores = self.coco.evaluate()
        scores["instance_matching"] = instance_matching.folder_summary(self.matchings)
        scores["ap_ranking"] = "predicted object ids (lowest id = highest confidence)"
        return scores

    def write(self, folder: Path) -> dict:
        """Write metrics.json, metrics.csv and metrics_per_image.csv to ``folder``; returns ``summary()``."""
        scores = self.summary()
        atomic_write_text(Path(folder) / "metrics.json", json.dumps(_json_safe(scores), indent=1))
        matching = scores["instance_matching"]
        mean_accuracy = [row["accuracy"] for row in matching["per_image_mean"]]
        threshold_rows = [{**{key: row[key] for key in THRESHOLD_COLUMNS[:-1]}, "per_image_mean_accuracy": mean}
                          for row, mean in zip(matching["thresholds"], mean_accuracy)]
        _write_csv(Path(folder) / "metrics.csv", THRESHOLD_COLUMNS, threshold_rows)
        _write_csv(Path(folder) / "metrics_per_image.csv", list(self.rows[0]), self.rows)
        return scores


def format_table(scores: dict) -> str:
    """A fixed-width text table of ``InstanceEvaluation.summary()``: one row per IoU threshold (summed
    counts and their scores, and the per-image mean accuracy), the DSB score and the COCO AP line."""
    matching = scores["instance_matching"]
    header = (f"{'IoU':>5}{'TP':>8}{'FP':>8}{'FN':>8}{'precision':>11}{'recall':>9}{'F1':>8}{'accuracy':>10}"
              f"{'PQ':>8}{'acc/image':>11}")
    lines = [header, "-" * len(header)]
    for row, mean in zip(matching["thresholds"], matching["per_image_mean"]):
        lines.append(f"{row['threshold']:>5.2f}{row['true_positives']:>8d}{row['false_positives']:>8d}"
                     f"{row['false_negatives']:>8d}{row['precision']:>11.3f}{row['recall']:>9.3f}{row['f1']:>8.3f}"
                     f"{row['accuracy']:>10.3f}{row['panoptic_quality']:>8.3f}{mean['accuracy']:>11.3f}")
    lines.append("-" * len(header))
    lines.append(f"DSB score {matching['dsb_score']:.3f} (per image: mean accuracy over IoU 0.5-0.95; mean over "
                 f"{matching['num_images']} image(s))")

    def ap(name: str) -> str:
        value = scores[name]
        return "nan" if value is None or math.isnan(value) else f"{value:.3f}"

    lines.append(f"COCO mask AP {ap('mask_AP')} (AP50 {ap('mask_AP50')}, AP75 {ap('mask_AP75')}), box AP "
                 f"{ap('box_AP')}; {scores['ground_truth']} true objects, {scores['detections']} predicted; "
                 "ranked by object id (lowest = most confident; label files carry no scores, so this AP can "
                 "differ from inference.py's, which ranks by score)"
                 + (f" — {scores['note']}" if "note" in scores else ""))
    return "\n".join(lines)


def _write_csv(path: Path, columns, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _json_safe(value):
    """NaN/inf -> None recursively (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
