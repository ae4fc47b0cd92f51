"""enki_seg.data.labels: the majority-class vote of objects and painting object masks into one label image."""
from __future__ import annotations

import numpy as np
import pytest

from enki_seg.data.labels import majority_classes, paint_instances


def test_majority_classes_vote_and_objects_on_background():
    instances = np.array([[1, 1, 1, 2, 0], [0, 3, 3, 2, 5]])
    semantic = np.array([[2, 2, 1, 1, 0], [0, 0, 0, 0, 1]])
    classes, on_background = majority_classes(instances, semantic)
    # id 1: two votes for 2, one for 1; id 2: background does not vote; id 3: on background; id 4 absent
    np.testing.assert_array_equal(classes, [0, 2, 1, 0, 0, 1])
    assert classes.dtype == np.int32
    np.testing.assert_array_equal(on_background, [3])


def test_majority_classes_ties_go_to_the_lower_class_and_no_mask_gives_class_1():
    instances = np.array([[1, 1, 2, 2]])
    classes, on_background = majority_classes(instances, np.array([[2, 1, 0, 0]]))
    np.testing.assert_array_equal(classes, [0, 1, 0])  # id 1: one vote each for 2 and 1
    np.testing.assert_array_equal(on_background, [2])
    classes, on_background = majority_classes(instances, np.zeros((1, 4), np.uint8))  # background only
    np.testing.assert_array_equal(classes, [0, 0, 0])
    np.testing.assert_array_equal(on_background, [1, 2])
    classes, on_background = majority_classes(instances, None)
    np.testing.assert_array_equal(classes, [0, 1, 1])
    assert on_background.size == 0
    with pytest.raises(ValueError, match="2x2 but the instance labels are 1x4"):
        majority_classes(instances, np.zeros((2, 2), np.uint8))


def test_paint_instances_overlap_goes_to_higher_score():
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 0:4, 0:4] = True   # score 0.6
    masks[1, 2:6, 2:6] = True   # score 0.9: wins the overlap, id 1
    masks[2, 5:6, 0:1] = True   # score 0.3: id 3
    labels = paint_instances(np.array([0.6, 0.9, 0.3]), masks)
    assert labels.dtype == np.int32
    assert labels[3, 3] == 1 and labels[0, 0] == 2 and labels[5, 0] == 3 and labels[2, 2] == 1
    assert (labels == 2).sum() == 16 - 4


def test_paint_instances_from_crops_equals_full_masks():
    rng = np.random.default_rng(0)
    full = np.zeros((4, 10, 12), bool)
    crops, offsets = [], []
    for i in range(4):
        y, x, h, w = rng.integers(0, 5), rng.integers(0, 6), rng.integers(1, 6), rng.integers(1, 7)
        crop = rng.random((h, w)) < 0.7
        full[i, y : y + h, x : x + w] = crop
        crops.append(crop)
        offsets.append((y, x))
    scores = rng.random(4)
    np.testing.assert_array_equal(paint_instances(scores, crops, np.array(offsets), (10, 12)),
                                  paint_instances(scores, full))
