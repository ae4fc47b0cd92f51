"""COCO box and mask AP of instance detections against instance-label ground truth (pycocotools, no TensorFlow)."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

#: Names of the 12 standard COCO detection statistics, in ``COCOeval.stats`` order. ``AR_max``
#: is the recall at the evaluator's largest detection count (COCO's AR@100).
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR_max", "AR_small", "AR_medium", "AR_large")


def crop_to_rle(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict:
    """Compressed COCO RLE of an (h, w) bool ``crop`` placed at (y0, x0) in a ``height`` x ``width`` image.

    Needs only ``height * w`` bytes (a full-height strip), never the whole image: COCO runs are
    column-major, so the columns left and right of the crop are single runs of zeros.
    The crop must lie inside the image.
    """
    rows, cols = crop.shape
    strip = np.zeros((height, cols), np.uint8, order="F")
    strip[y0 : y0 + rows] = crop
    flat = strip.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # runs start with zeros
    if not counts:
        counts = [0]
    counts[0] += x0 * height
    trailing = (width - x0 - cols) * height
    if len(counts) % 2:  # odd number of runs: the last one is zeros
        counts[-1] += trailing
    elif trailing:
        counts.append(trailing)
    return mask_util.frPyObjects({"counts": counts, "size": [height, width]}, height, width)


def _json_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def instances_to_coco_annotations(instance_labels: np.ndarray, classes, image_id: int) -> list[dict]:
    """COCO annotations of an (H, W) integer instance-label image (0 = background).

    ``classes``: (N,) int, the class (COCO category id) of instance id k at index k - 1, N >= the
    largest id. Each annotation has an RLE ``segmentation`` (counts as str), ``bbox`` [x, y, w, h]
    float, ``area``, ``iscrowd`` 0, ``category_id`` and ``image_id``; absent ids are skipped.
    """
    labels = np.asarray(instance_labels)
    classes = np.asarray(classes)
    height, width = labels.shape
    annotations = []
    for index, where in enumerate(ndimage.find_objects(labels)):
        if where is None:
            continue
        instance = index + 1
        if instance > classes.size:
            raise ValueError(f"instance id {instance} has no class: {classes.size} classes given")
        crop = labels[where] == instance
        rle = crop_to_rle(crop, where[0].start, where[1].start, height, width)
        annotations.append({
            "image_id": int(image_id), "category_id": int(classes[index]), "iscrowd": 0,
            "segmentation": _json_rle(rle), "area": float(crop.sum()),
            "bbox": [float(where[1].start), float(where[0].start),
                     float(where[1].stop - where[1].start), float(where[0].stop - where[0].start)],
        })
    return annotations


def detections_to_coco_results(boxes, scores, classes, masks, image_id: int) -> list[dict]:
    """COCO result entries (JSON-serializable) of one image's N detections.

    ``boxes``: (N, 4) float [y0, x0, y1, x1] pixels, end exclusive; ``scores``: (N,) float;
    ``classes``: (N,) int category ids; ``masks``: (N, H, W) bool, a sequence of N RLE dicts (e.g.
    from :func:`crop_to_rle`, for large images), or None for box-only results.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if masks is None:
        rles = [None] * len(boxes)
    elif isinstance(masks, np.ndarray):
        rles = mask_util.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8))) if len(masks) else []
    else:
        rles = list(masks)
    if not len(rles) == len(boxes) == len(scores) == len(classes):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes and {len(rles)} masks")
    results = []
    for (y0, x0, y1, x1), score, category, rle in zip(boxes, scores, classes, rles):
        entry = {"image_id": int(image_id), "category_id": int(category), "score": float(score),
                 "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
        if rle is not None:
            entry["segmentation"] = _json_rle(rle)
        results.append(entry)
    return results


def _results_coco(gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """Results as a COCO object (``loadRes`` without its crash on an empty list and with per-type areas)."""
    annotations = []
    for i, result in enumerate(results):
        entry = dict(result, id=i + 1, iscrowd=0)
        if iou_type == "bbox":
            entry.pop("segmentation", None)
            entry["area"] = entry["bbox"][2] * entry["bbox"][3]
        else:  # as detectron2: no bbox, so the area ranges use the mask area
            entry.pop("bbox", None)
            entry["area"] = float(mask_util.area(entry["segmentation"]))
        annotations.append(entry)
    coco = COCO()
    coco.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                    "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _statistics(evaluation: COCOeval) -> dict[str, float]:
    """The 12 standard statistics from an accumulated COCOeval (NaN where undefined, not -1).

    Computed here rather than by ``summarize()``, whose AP ignores any maxDets other than 100.
    """
    params, precision, recall = evaluation.params, evaluation.eval["precision"], evaluation.eval["recall"]

    def mean(values: np.ndarray, iou: float | None, area: str, max_index: int) -> float:
        if iou is not None:
            values = values[np.isclose(params.iouThrs, iou)]
        values = values[..., params.areaRngLbl.index(area), max_index]
        values = values[values > -1]
        return float(values.mean()) if values.size else math.nan

    values = [mean(precision, None, "all", -1), mean(precision, 0.5, "all", -1), mean(precision, 0.75, "all", -1)]
    values += [mean(precision, None, area, -1) for area in ("small", "medium", "large")]
    values += [mean(recall, None, "all", m) for m in (0, 1, 2)]
    values += [mean(recall, None, area, -1) for area in ("small", "medium", "large")]
    return dict(zip(STAT_NAMES, values))


class CocoEvaluator:
    """Accumulates ground truth and detections image by image; ``evaluate`` runs COCOeval for boxes and masks.

    Args:
        category_ids: the class ids that count (e.g. 1..K-1).
        category_names: optional {id: name}.
        max_detections: detections per image that count (COCO: 100); None counts every detection
            of every image (at least 100), as microscopy images can hold thousands of objects.
    """

    def __init__(self, category_ids: list[int], category_names: dict | None = None,
                 max_detections: int | None = None):
        names = category_names or {}
        self.categories = [{"id": int(c), "name": str(names.get(c, names.get(str(c), f"class_{c}")))}
                           for c in category_ids]
        self.max_detections = max_detections
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.results: list[dict] = []
        self._most_detections = 0

    def add_image(self, image_id_or_name, height: int, width: int, gt_instance_labels, gt_classes,
                  det_boxes, det_scores, det_classes, det_masks) -> int:
        """Add one image; returns its image id.

        ``gt_instance_labels``: (H, W) int (0 = background), ``gt_classes``: (N,) int class of id k at
        k - 1; detections as :func:`detections_to_coco_results` takes them. An int identifies the
        image itself; any other name gets the next free id.
        """
        if isinstance(image_id_or_name, (int, np.integer)):
            image_id = int(image_id_or_name)
        else:
            image_id = max((image["id"] for image in self.images), default=0) + 1
        if any(image["id"] == image_id for image in self.images):
            raise ValueError(f"image id {image_id} was added twice")
        self.images.append({"id": image_id, "height": int(height), "width": int(width),
                            "file_name": str(image_id_or_name)})
        for annotation in instances_to_coco_annotations(gt_instance_labels, gt_classes, image_id):
            self.annotations.append(dict(annotation, id=len(self.annotations) + 1))
        results = detections_to_coco_results(det_boxes, det_scores, det_classes, det_masks, image_id)
        self.results.extend(results)
        self._most_detections = max(self._most_detections, len(results))
        return image_id

    def results_json(self) -> list[dict]:
        """Every detection as a COCO results list (``json.dumps``-able, loads with ``COCO.loadRes``)."""
        return self.results

    def evaluate(self) -> dict:
        """``box_AP``, ``box_AP50``, ``box_AP75``, ``mask_AP``, ``mask_AP50``, ``mask_AP75`` (floats) and
        ``box_stats``/``mask_stats`` ({STAT_NAMES: float}); NaN and a ``note`` when nothing is measurable."""
        most = self.max_detections or max(100, self._most_detections)
        summary: dict = {"images": len(self.images), "ground_truth": len(self.annotations),
                         "detections": len(self.results), "max_detections": most}
        if not self.annotations:
            summary["note"] = "no ground-truth objects in any image: AP is undefined"
        gt = COCO()
        gt.dataset = {"images": self.images, "categories": self.categories, "annotations": self.annotations}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
            results = self.results if iou_type == "bbox" else [r for r in self.results if "segmentation" in r]
            if self.annotations:
                evaluation = COCOeval(gt, _results_coco(gt, results, iou_type), iou_type)
                evaluation.params.maxDets = [1, 10, most]
                with contextlib.redirect_stdout(io.StringIO()):
                    evaluation.evaluate()
                    evaluation.accumulate()
                stats = _statistics(evaluation)
            else:
                stats = dict.fromkeys(STAT_NAMES, math.nan)
            summary[f"{prefix}_stats"] = stats
            for name in ("AP", "AP50", "AP75"):
                summary[f"{prefix}_{name}"] = stats[name]
        return summary
