"""Object matching of instance-label images: TP/FP/FN, F1, DSB2018 accuracy and panoptic quality by IoU.

What nuclei-segmentation papers and challenges report (Kaggle Data Science Bowl 2018, StarDist's
``matching`` / ``matching_dataset``, Cellpose). NumPy and SciPy only.

Matching: a true and a predicted object (0 is background in both images, ids are arbitrary) match
one-to-one, and only when their IoU is strictly greater than the threshold (the DSB2018 rule;
StarDist uses >=). Among such pairs the matching maximises the number of matches, then the summed
IoU (the Hungarian algorithm on IoU). At thresholds >= 0.5 every object has at most one candidate
(IoU > 0.5 with two disjoint objects would need more than all of its own pixels), so the greedy,
the Hungarian and the "every candidate pair" matchings coincide and no assignment is solved.

Scores at each threshold, from TP (matched pairs), FP (unmatched predictions), FN (unmatched true
objects) and the IoUs of the matched pairs:

* precision TP / (TP + FP), recall TP / (TP + FN), F1 2 TP / (2 TP + FP + FN);
* accuracy TP / (TP + FP + FN), the DSB2018 / StarDist "accuracy";
* mean matched IoU (sum of matched IoUs / TP) and panoptic quality = mean matched IoU x F1
  (= sum of matched IoUs / (TP + FP / 2 + FN / 2), Kirillov et al. 2019);
* per image, the DSB2018 score: the mean accuracy over the thresholds 0.5, 0.55, ..., 0.95.

Empty images: with no true and no predicted object every score is 1 (nothing to find, nothing
found: perfect). Otherwise a 0/0 ratio is 0: a recall without true objects, a precision without
predictions, a mean matched IoU without matches (as StarDist and ``metrics.py`` do).

Over a folder (``match_dataset``): TP, FP, FN and matched IoUs are summed over the images and the
scores computed from the sums (StarDist's ``matching_dataset(by_image=False)``), and the DSB score
is the mean of the per-image DSB scores (the DSB2018 leaderboard score).

Example:
    per_image = [match_image(true, predicted) for true, predicted in pairs]
    folder = match_dataset(per_image)
    folder.dsb_score, folder.at(0.5).f1
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize

#: The DSB2018 IoU thresholds 0.5, 0.55, ..., 0.95 (rounded: 0.5 + 0.05 * 2 is not the double 0.6).
THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))


@dataclass(frozen=True)
class MatchingScores:
    """Matching counts at one IoU threshold (one image or summed over images) and the scores they give."""

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int
    matched_iou_sum: float

    @property
    def _nothing_to_match(self) -> bool:
        return self.true_positives + self.false_positives + self.false_negatives == 0

    def _ratio(self, numerator: float, denominator: float) -> float:
        if denominator > 0:
            return float(numerator / denominator)
        return 1.0 if self._nothing_to_match else 0.0

    @property
    def precision(self) -> float:
        return self._ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> float:
        return self._ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def f1(self) -> float:
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return self._ratio(2 * tp, 2 * tp + fp + fn)

    @property
    def accuracy(self) -> float:
        """TP / (TP + FP + FN): the DSB2018 / StarDist "accuracy" (a.k.a. critical success index)."""
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return self._ratio(tp, tp + fp + fn)

    @property
    def mean_matched_iou(self) -> float:
        return self._ratio(self.matched_iou_sum, self.true_positives)

    @property
    def panoptic_quality(self) -> float:
        """Mean matched IoU x F1 (segmentation quality x recognition quality)."""
        return self.mean_matched_iou * self.f1

    def to_dict(self) -> dict[str, float | int]:
        """Counts and scores, JSON-ready."""
        row = dataclasses.asdict(self)
        for name in ("precision", "recall", "f1", "accuracy", "mean_matched_iou", "panoptic_quality"):
            row[name] = getattr(self, name)
        return row

    def __add__(self, other: MatchingScores) -> MatchingScores:
        if other.threshold != self.threshold:
            raise ValueError(f"cannot add counts at IoU thresholds {self.threshold} and {other.threshold}")
        return MatchingScores(
            self.threshold,
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
            self.matched_iou_sum + other.matched_iou_sum,
        )


@dataclass(frozen=True)
class InstanceMatching:
    """Scores of one image, or of a folder, at every threshold.

    Attributes:
        scores: one ``MatchingScores`` per threshold, in the order the thresholds were given.
        dsb_score: mean accuracy over the thresholds (one image), or the mean of the per-image DSB
            scores (a folder).
        num_images: 1 for an image, else how many were aggregated.
    """

    scores: tuple[MatchingScores, ...]
    dsb_score: float
    num_images: int = 1

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(score.threshold for score in self.scores)

    def at(self, threshold: float) -> MatchingScores:
        """The scores at ``threshold`` (one of ``thresholds``)."""
        for score in self.scores:
            if np.isclose(score.threshold, threshold, rtol=0.0, atol=1e-9):
                return score
        raise KeyError(f"no scores at IoU threshold {threshold}; thresholds are {list(self.thresholds)}")

    def to_dict(self) -> dict:
        """{"dsb_score", "num_images", "thresholds": [per-threshold counts and scores]}, JSON-ready."""
        return {"dsb_score": self.dsb_score, "num_images": self.num_images,
                "thresholds": [score.to_dict() for score in self.scores]}


def _object_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object ids (ascending, 0 excluded) and each pixel's index: 0 background, k the k-th object."""
    ids, index = np.unique(labels, return_inverse=True)
    index = index.reshape(-1)
    if ids.size and ids[0] == 0:
        return ids[1:], index
    return ids, index + 1  # no background pixel: object k still gets index k


def iou_matrix(
    true_labels: np.ndarray, predicted_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (true, predicted) object pair, from one joint histogram of the label pairs.

    Args:
        true_labels, predicted_labels: (H, W) (or any equal shape) non-negative integer label images;
            0 is background, any other value an object id.

    Returns:
        iou: (T, P) float64, rows in the order of ``true_ids``, columns of ``predicted_ids``.
        true_ids: (T,) the ids of the true objects, ascending.
        predicted_ids: (P,) the ids of the predicted objects, ascending.

    Memory is one (T + 1) x (P + 1) histogram: 300 x 300 objects take under 1 MB.
    """
    true_labels, predicted_labels = np.asarray(true_labels), np.asarray(predicted_labels)
    if true_labels.shape != predicted_labels.shape:
        raise ValueError(
            f"label images differ in shape: true {true_labels.shape}, predicted {predicted_labels.shape}"
        )
    for name, labels in (("true", true_labels), ("predicted", predicted_labels)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name} labels must have an integer dtype, got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{name} labels must be >= 0 (0 is background), found {labels.min()}")
    true_ids, true_index = _object_index(true_labels)
    predicted_ids, predicted_index = _object_index(predicted_labels)
    columns = predicted_ids.size + 1
    joint = np.bincount(true_index * columns + predicted_index, minlength=(true_ids.size + 1) * columns)
    joint = joint.reshape(true_ids.size + 1, columns)
    intersection = joint[1:, 1:]
    true_area = joint[1:].sum(axis=1)
    predicted_area = joint[:, 1:].sum(axis=0)
    union = true_area[:, None] + predicted_area[None, :] - intersection  # > 0: every object has a pixel
    return intersection / union, true_ids, predicted_ids


def matched_pairs(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches with IoU > ``threshold``: the most matches, then the largest summed IoU.

    Args:
        iou: (T, P) float IoU of true (rows) and predicted (columns) objects.
        threshold: in [0, 1).

    Returns:
        (rows, columns): int arrays of equal length, the matched (true, predicted) index pairs.
    """
    candidates = iou > threshold
    if threshold >= 0.5:
        # each object has at most one candidate (module docstring): the candidates are the matching
        return np.nonzero(candidates)
    rows = np.flatnonzero(candidates.any(axis=1))
    columns = np.flatnonzero(candidates.any(axis=0))
    if rows.size == 0:
        return rows, columns
    sub_candidates = candidates[np.ix_(rows, columns)]
    # a candidate pair is worth 1 + IoU / (2 n): all n possible matches add less than 1 / 2 in IoU,
    # so the count of matches comes first; pairs that are no candidates are worth nothing
    weight = sub_candidates * (1.0 + iou[np.ix_(rows, columns)] / (2 * min(rows.size, columns.size)))
    row_index, column_index = scipy.optimize.linear_sum_assignment(weight, maximize=True)
    keep = sub_candidates[row_index, column_index]
    return rows[row_index[keep]], columns[column_index[keep]]


def match_image(
    true_labels: np.ndarray, predicted_labels: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> InstanceMatching:
    """Match the objects of one image at each IoU threshold.

    Args:
        true_labels, predicted_labels: (H, W) non-negative integer label images, 0 background; ids
            need not be consecutive or shared between the two.
        thresholds: IoU thresholds in [0, 1); the default is the DSB2018 list, 0.5 ... 0.95.

    Returns:
        ``InstanceMatching`` with one ``MatchingScores`` per threshold and ``dsb_score`` = the mean
        accuracy over ``thresholds``.
    """
    thresholds = [float(threshold) for threshold in thresholds]
    if not thresholds or any(not 0.0 <= threshold < 1.0 for threshold in thresholds):
        raise ValueError(f"IoU thresholds must be a non-empty list of values in [0, 1), got {thresholds}")
    iou, true_ids, predicted_ids = iou_matrix(true_labels, predicted_labels)
    scores = []
    for threshold in thresholds:
        rows, columns = matched_pairs(iou, threshold)
        matches = int(rows.size)
        scores.append(MatchingScores(threshold, matches, int(predicted_ids.size) - matches,
                                     int(true_ids.size) - matches, float(iou[rows, columns].sum())))
    return InstanceMatching(tuple(scores), float(np.mean([score.accuracy for score in scores])))


def match_dataset(images: Iterable[InstanceMatching]) -> InstanceMatching:
    """Aggregate per-image results (all at the same thresholds) over a folder.

    Returns:
        ``InstanceMatching`` whose scores come from TP, FP, FN and matched IoUs summed over the
        images, whose ``dsb_score`` is the mean of the per-image DSB scores and whose
        ``num_images`` counts them. An empty folder raises ValueError.
    """
    images = list(images)
    if not images:
        raise ValueError("match_dataset needs at least one image")
    thresholds = images[0].thresholds
    for image in images[1:]:
        if image.thresholds != thresholds:
            raise ValueError(f"images were matched at different thresholds: {thresholds}, {image.thresholds}")
    totals = list(images[0].scores)
    for image in images[1:]:
        totals = [total + score for total, score in zip(totals, image.scores)]
    return InstanceMatching(
        tuple(totals),
        float(np.mean([image.dsb_score for image in images])),
        sum(image.num_images for image in images),
    )


def folder_summary(images: Sequence[InstanceMatching]) -> dict:
    """JSON-ready summary of a folder: the summed counts and scores at every threshold
    (``match_dataset``), the DSB score, and ``per_image_mean``: accuracy, precision, recall, F1 and
    panoptic quality averaged over images at every threshold (the Kaggle DSB2018 way of averaging)."""
    summary = match_dataset(images).to_dict()
    summary["per_image_mean"] = [
        {"threshold": threshold,
         **{name: float(np.mean([getattr(image.at(threshold), name) for image in images]))
            for name in ("accuracy", "precision", "recall", "f1", "panoptic_quality")}}
        for threshold in images[0].thresholds]
    return summary


def format_summary(summary: dict) -> str:
    """One line for the console: accuracy at 0.5 and 0.75 (summed and per-image mean) and the DSB score."""
    summed = {round(row["threshold"], 2): row for row in summary["thresholds"]}
    mean = {round(row["threshold"], 2): row for row in summary["per_image_mean"]}
    parts = [f"IoU {t}: accuracy {summed[t]['accuracy']:.3f} (per-image mean {mean[t]['accuracy']:.3f}), "
             f"precision {summed[t]['precision']:.3f}, recall {summed[t]['recall']:.3f}"
             for t in (0.5, 0.75) if t in summed]
    return (f"object matching over {summary['num_images']} image(s): " + "; ".join(parts)
            + f"; DSB score {summary['dsb_score']:.3f}")
