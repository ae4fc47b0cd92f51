"""Instance label images: the class of each object (majority vote) and painting object masks into one image.

NumPy only. An instance label image is (H, W) integer: 0 background, each object one id > 0. The
builder (build_lmdb.py) gives each object of a source its class with :func:`majority_classes`, and
instance inference gives each ground-truth object its class for scoring with the same function;
detections become an instance label image with :func:`paint_instances`.
"""
from __future__ import annotations

import numpy as np


def majority_classes(instance_labels: np.ndarray, semantic_mask: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The class of every object of an instance label image: the majority foreground class under it.

    The rule: each pixel of an object votes for its class in ``semantic_mask``; background (class
    0) pixels do not vote; the class with the most votes wins, ties going to the lower class.
    Without a semantic mask every object is class 1. **An object lying entirely on background has
    no class**: it gets 0 and is listed in ``on_background``. The record format needs a class in
    1..K-1 for every object, so the builder refuses such an object, naming it; scoring counts it
    as class 1 (``enki_seg.inference.instance.instance_classes``).

    Args:
        instance_labels: (H, W) non-negative integer ids, 0 background.
        semantic_mask: (H, W) non-negative integer classes, 0 background; or None.

    Returns:
        ``(classes, on_background)``: ``classes`` (max_id + 1,) int32, the class of id k at k (0 for
        id 0, for ids that do not occur and for objects on background); ``on_background`` (M,)
        int64, the ids of the objects whose every pixel is background in ``semantic_mask``.

    Raises:
        ValueError: the two images differ in size.
    """
    instance = np.asarray(instance_labels)
    count = int(instance.max(initial=0))
    if semantic_mask is None:
        classes = np.ones(count + 1, np.int32)
        classes[0] = 0
        return classes, np.zeros(0, np.int64)
    semantic = np.asarray(semantic_mask)
    if semantic.shape != instance.shape:
        raise ValueError(f"the semantic mask is {semantic.shape[0]}x{semantic.shape[1]} but the instance "
                         f"labels are {instance.shape[0]}x{instance.shape[1]}")
    k = int(semantic.max(initial=0)) + 1
    votes = np.bincount(instance.ravel().astype(np.int64) * k + semantic.ravel(),
                        minlength=(count + 1) * k).reshape(count + 1, k)
    foreground = votes[:, 1:] if k > 1 else np.zeros((count + 1, 1), np.int64)
    classes = np.where(foreground.max(axis=1) > 0, foreground.argmax(axis=1) + 1, 0).astype(np.int32)
    classes[0] = 0
    present = votes.sum(axis=1) > 0
    on_background = np.flatnonzero(present[1:] & (classes[1:] == 0)).astype(np.int64) + 1
    return classes, on_background


def paint_instances(scores: np.ndarray, masks, offsets: np.ndarray | None = None,
                    shape: tuple[int, int] | None = None) -> np.ndarray:
    """One instance label image from N object masks; where masks overlap the higher score wins.

    Args:
        scores: (N,) float.
        masks: (N, H, W) bool full-image masks, or N (h_i, w_i) bool crops placed at ``offsets``.
        offsets: (N, 2) int (y, x) of each crop's top-left pixel; None: every mask starts at (0, 0).
        shape: (H, W) of the label image; default the masks' (H, W) (pass it with crops).

    Returns:
        (H, W) int32: 0 background, the object of score rank r (0 = best, ties in input order)
        labelled r + 1; an object fully covered by better ones has no pixels.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(masks) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(masks)} masks")
    if shape is None:
        shape = np.shape(masks)[1:]
    offsets = np.zeros((len(scores), 2), np.int64) if offsets is None else np.asarray(offsets, np.int64).reshape(-1, 2)
    labels = np.zeros(shape, np.int32)
    order = np.argsort(-scores, kind="stable")
    for rank in range(len(order) - 1, -1, -1):  # the worst first: better detections paint over it
        index = order[rank]
        crop = np.asarray(masks[index], bool)
        y, x = offsets[index]
        labels[y : y + crop.shape[0], x : x + crop.shape[1]][crop] = rank + 1
    return labels
