"""Segmentation metrics from a confusion matrix: one implementation for training tests and inference.

NumPy only, so inference and report scripts can use it without building TensorFlow graph code. A
trainer that computes per-batch confusion matrices in TensorFlow (``tf.math.confusion_matrix``)
hands them to :meth:`ConfusionAccumulator.update_matrix`.

Definitions, per class ``k`` of a (K, K) confusion matrix ``cm`` (rows = truth, columns = prediction):
``TP = cm[k, k]``, ``FP = column sum - TP``, ``FN = row sum - TP``, ``support = row sum``;
``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1 = dice = 2 TP / (2 TP + FP + FN)``,
``iou = TP / (TP + FP + FN)``. ``dice`` equals ``f1`` on a confusion matrix; both names are kept
because TAO and users look for either.

Undefined values:

* A class **absent from both truth and prediction** (TP = FP = FN = 0) has no defined precision,
  recall, F1 or IoU: all four are NaN, and the class is EXCLUDED from macro averages, ``mean_iou``
  and ``foreground_iou`` (a tile set that contains no mitochondria says nothing about how well they
  are segmented). Its support is 0, so weighted averages give it weight 0.
* A class that occurs somewhere (TP + FP + FN > 0) has every metric defined; a 0/0 ratio there
  (precision of a class never predicted, recall of a class only predicted) is 0.0, the class was
  entirely missed or entirely hallucinated (scikit-learn's ``zero_division=0``).

Averages, as TAO's UNet evaluation reports them: ``micro`` from TP, FP and FN summed over classes
(for single-label pixels micro precision = recall = F1 = pixel accuracy); ``macro`` the unweighted
mean over the classes that occur; ``weighted`` the mean weighted by support. An empty matrix gives
NaN everywhere. No computation emits a division warning.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Per-class scores, in table/CSV column order (``support`` follows them).
SCORE_NAMES = ("precision", "recall", "f1", "iou", "dice")
AVERAGE_NAMES = ("micro", "macro", "weighted")
CSV_COLUMNS = ("kind", "name", *SCORE_NAMES, "support")


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, num_classes: int,
                     ignore_label: int | None = None) -> np.ndarray:
    """Count (truth, prediction) label pairs.

    Args:
        truth: integer labels of any shape, e.g. an (H, W) uint8 mask or a (B, H, W) batch.
        prediction: integer labels, same shape as ``truth`` (e.g. ``argmax`` of the logits).
        num_classes: K; valid labels are 0..K-1.
        ignore_label: pixels whose TRUTH equals this value are skipped (their prediction is not
            checked); None counts every pixel.

    Returns:
        (K, K) int64, rows = truth, columns = prediction.

    Raises:
        ValueError: shapes differ, or a label (other than ``ignore_label`` in truth) lies outside
            [0, K); the message names the offending value.
        TypeError: an input is not an integer (or bool) array.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    truth = np.asarray(truth)
    prediction = np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise ValueError(f"truth shape {truth.shape} differs from prediction shape {prediction.shape}")
    for name, labels in (("truth", truth), ("prediction", prediction)):
        if labels.dtype.kind not in "biu":
            raise TypeError(f"{name} labels must be integers, got dtype {labels.dtype}")
    truth = truth.ravel()
    prediction = prediction.ravel()
    if ignore_label is not None:
        keep = truth != ignore_label
        if not keep.all():
            truth = truth[keep]
            prediction = prediction[keep]
    if truth.size == 0:
        return np.zeros((num_classes, num_classes), np.int64)
    for name, labels in (("truth", truth), ("prediction", prediction)):
        low, high = labels.min(), labels.max()
        if low < 0 or high >= num_classes:
            bad = labels[(labels < 0) | (labels >= num_classes)]
            values = np.unique(bad)
            shown = ", ".join(str(v) for v in values[:5]) + (", ..." if values.size > 5 else "")
            hint = "" if ignore_label is None or name == "prediction" else \
                f" (ignore_label={ignore_label} is skipped)"
            raise ValueError(f"{name} label {values[0]} is outside [0, {num_classes}) "
                             f"({bad.size} pixels; offending values: {shown}){hint}")
    # int64 before the multiply: uint8 * K would wrap around.
    pairs = truth.astype(np.int64) * num_classes + prediction.astype(np.int64)
    counts = np.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass
class SegmentationMetrics:
    """Everything derived from one confusion matrix (see the module docstring for definitions).

    Per-class arrays are (K,) float64 with NaN for a class absent from truth and prediction;
    ``support`` is (K,) int64. ``averages[avg][score]`` for avg in micro/macro/weighted holds floats,
    plus ``averages[avg]["support"]`` = total counted pixels.
    """

    class_names: list[str]
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    support: np.ndarray
    averages: dict[str, dict[str, float]]
    accuracy: float
    mean_iou: float
    foreground_iou: float
    present: np.ndarray = field(repr=False)  # (K,) bool: TP + FP + FN > 0, i.e. the class occurs

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_scores(self, index: int) -> dict[str, float]:
        """Scores of class ``index`` as a dict (NaN kept), support as int."""
        scores = {name: float(getattr(self, name)[index]) for name in SCORE_NAMES}
        scores["support"] = int(self.support[index])
        return scores

    def to_dict(self) -> dict:
        """Plain Python types; NaN stays float('nan') (``write_json`` turns it into null)."""
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "classes": {name: self.class_scores(k) for k, name in enumerate(self.class_names)},
            "averages": {avg: dict(values) for avg, values in self.averages.items()},
            "accuracy": self.accuracy,
            "mean_iou": self.mean_iou,
            "foreground_iou": self.foreground_iou,
            "confusion_matrix": self.confusion.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentationMetrics":
        """Rebuild from ``to_dict()``/metrics.json output: every score is recomputed from the matrix."""
        return segmentation_metrics(np.asarray(data["confusion_matrix"], np.int64), data["class_names"])


def _ratio(numerator, denominator, fill: float) -> np.ndarray:
    """numerator / denominator elementwise, ``fill`` where the denominator is 0 (never warns)."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, fill, np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _scores(tp, fp, fn) -> dict[str, np.ndarray]:
    precision = _ratio(tp, tp + fp, 0.0)
    recall = _ratio(tp, tp + fn, 0.0)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, math.nan)
    iou = _ratio(tp, tp + fp + fn, math.nan)
    absent = (np.asarray(tp) + fp + fn) == 0
    precision = np.where(absent, math.nan, precision)
    recall = np.where(absent, math.nan, recall)
    return {"precision": precision, "recall": recall, "f1": f1, "iou": iou, "dice": f1.copy()}


def _mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean over entries with weight > 0; NaN when no weight (no warning)."""
    used = weights > 0
    total = weights[used].sum()
    if total == 0:
        return math.nan
    return float((values[used] * weights[used]).sum() / total)


def segmentation_metrics(cm: np.ndarray, class_names: list[str] | None = None) -> SegmentationMetrics:
    """Per-class scores, micro/macro/weighted averages, accuracy, mean and foreground IoU.

    Args:
        cm: (K, K) non-negative integer counts, rows = truth, columns = prediction.
        class_names: K distinct names; default ``class_0`` .. ``class_{K-1}``.

    Returns:
        :class:`SegmentationMetrics`. A class absent from both truth and prediction gets NaN
        precision/recall/f1/iou/dice and is excluded from the macro averages, ``mean_iou`` (macro
        IoU) and ``foreground_iou`` (mean IoU of classes 1..K-1 that occur; for a binary problem
        simply the IoU of class 1; NaN when K == 1 or no foreground class occurs).
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
        raise ValueError(f"confusion matrix must be (K, K) with K >= 1, got shape {cm.shape}")
    if cm.dtype.kind == "f":
        if not np.all(np.isfinite(cm)) or not np.all(cm == np.round(cm)):
            raise ValueError("confusion matrix must hold whole counts")
    elif cm.dtype.kind not in "biu":
        raise TypeError(f"confusion matrix must be numeric counts, got dtype {cm.dtype}")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative counts")
    cm = cm.astype(np.int64)
    num_classes = cm.shape[0]
    if class_names is None:
        class_names = [f"class_{k}" for k in range(num_classes)]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix")
    if len(set(class_names)) != num_classes:
        raise ValueError(f"class names must be distinct, got {class_names}")

    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    support = cm.sum(axis=1)
    present = (tp + fp + fn) > 0
    per_class = _scores(tp, fp, fn)

    micro = {name: float(value) for name, value in _scores(tp.sum(), fp.sum(), fn.sum()).items()}
    total = int(support.sum())
    present_weight = present.astype(np.float64)
    macro = {name: _mean(per_class[name], present_weight) for name in SCORE_NAMES}
    weighted = {name: _mean(per_class[name], support.astype(np.float64)) for name in SCORE_NAMES}
    averages = {"micro": micro, "macro": macro, "weighted": weighted}
    for values in averages.values():
        values["support"] = total

    foreground = present.astype(np.float64)
    foreground[0] = 0.0
    return SegmentationMetrics(
        class_names=class_names,
        confusion=cm,
        support=support,
        averages=averages,
        accuracy=float(tp.sum() / total) if total else math.nan,
        mean_iou=macro["iou"],
        foreground_iou=_mean(per_class["iou"], foreground),
        present=present,
        **per_class,
    )


class ConfusionAccumulator:
    """Sums confusion matrices over batches or images; ``result()`` turns the sum into metrics.

    Example::

        accumulator = ConfusionAccumulator(num_classes=3, class_names=["bg", "cell", "edge"])
        for semantic_mask, logits in batches:
            accumulator.update(semantic_mask, logits.argmax(-1))
        print(format_table(accumulator.result()))
    """

    def __init__(self, num_classes: int, ignore_label: int | None = None,
                 class_names: list[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = None if class_names is None else list(class_names)
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        """Add integer label arrays of equal shape (see :func:`confusion_matrix`)."""
        self.matrix += confusion_matrix(truth, prediction, self.num_classes, self.ignore_label)

    def update_matrix(self, cm: np.ndarray) -> None:
        """Add a (K, K) confusion matrix computed elsewhere (e.g. ``tf.math.confusion_matrix``)."""
        cm = np.asarray(cm)
        if cm.shape != self.matrix.shape:
            raise ValueError(f"confusion matrix shape {cm.shape} != {self.matrix.shape}")
        if (cm < 0).any():
            raise ValueError("confusion matrix has negative counts")
        self.matrix += cm.astype(np.int64)

    def reset(self) -> None:
        self.matrix[...] = 0

    def result(self) -> SegmentationMetrics:
        return segmentation_metrics(self.matrix.copy(), self.class_names)


def _cell(value: float, width: int) -> str:
    return f"{'nan':>{width}}" if math.isnan(value) else f"{value:>{width}.4f}"


def format_table(metrics: SegmentationMetrics) -> str:
    """A fixed-width text table: one row per class, then micro/macro/weighted rows and a summary line.

    NaN (a class absent from truth and prediction) prints as ``nan``.
    """
    name_width = max(10, *(len(name) for name in metrics.class_names))
    support_width = max(9, len(str(metrics.averages["micro"]["support"])))
    header = f"{'class':<{name_width}}" + "".join(f"{name:>11}" for name in SCORE_NAMES) \
        + f"{'support':>{support_width + 2}}"
    lines = [header, "-" * len(header)]

    def row(name: str, scores: dict) -> str:
        cells = "".join(_cell(scores[score], 11) for score in SCORE_NAMES)
        return f"{name:<{name_width}}{cells}{scores['support']:>{support_width + 2}d}"

    for k, name in enumerate(metrics.class_names):
        lines.append(row(name, metrics.class_scores(k)))
    lines.append("-" * len(header))
    for average in AVERAGE_NAMES:
        lines.append(row(average, metrics.averages[average]))
    lines.append(f"pixel accuracy {_cell(metrics.accuracy, 0).strip()}   "
                 f"mean IoU {_cell(metrics.mean_iou, 0).strip()}   "
                 f"foreground IoU {_cell(metrics.foreground_iou, 0).strip()}")
    return "\n".join(lines)


def _json_safe(value):
    """Replace float NaN/inf by None recursively: JSON has no NaN, and json.dump would write `NaN`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(metrics: SegmentationMetrics, path: str | Path) -> Path:
    """Write ``metrics.to_dict()`` as strict JSON (NaN -> null); returns the path."""
    path = Path(path)
    with open(path, "w") as handle:
        json.dump(_json_safe(metrics.to_dict()), handle, indent=2, allow_nan=False)
        handle.write("\n")
    return path


def read_json(path: str | Path) -> SegmentationMetrics:
    """Read a metrics.json written by :func:`write_json` (scores recomputed from its matrix)."""
    with open(path) as handle:
        return SegmentationMetrics.from_dict(json.load(handle))


def write_csv(metrics: SegmentationMetrics, path: str | Path) -> Path:
    """Write one row per class (kind ``class``), then micro/macro/weighted rows (kind ``average``).

    Columns: ``kind,name,precision,recall,f1,iou,dice,support``. NaN is written as an empty cell
    (read back as NaN by pandas and spreadsheets); other floats at full precision.
    """
    path = Path(path)

    def cells(scores: dict) -> list[str]:
        return ["" if math.isnan(scores[name]) else repr(float(scores[name])) for name in SCORE_NAMES] \
            + [str(int(scores["support"]))]

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for k, name in enumerate(metrics.class_names):
            writer.writerow(["class", name, *cells(metrics.class_scores(k))])
        for average in AVERAGE_NAMES:
            writer.writerow(["average", average, *cells(metrics.averages[average])])
    return path
