"""Boundary targets from instance labels and the seeded watershed that inverts them."""
from __future__ import annotations

import numpy as np
import pytest

from enki_seg.data.instance_targets import BACKGROUND, BOUNDARY, INTERIOR, boundary_classes
from enki_seg.inference.watershed import WatershedConfig, instances_from_probabilities, remove_small_objects


def _two_touching_squares():
    labels = np.zeros((12, 16), np.int32)
    labels[2:10, 2:8] = 5
    labels[2:10, 8:14] = 9  # touches object 5 along a vertical seam
    return labels


def test_boundary_classes_rim_each_object_and_split_touching_ones():
    labels = _two_touching_squares()
    target = boundary_classes(labels)
    assert target.dtype == np.uint8 and target.shape == labels.shape
    assert np.all(target[labels == 0] == BACKGROUND)
    # the rim of object 5: its outer ring and the seam column 7 next to object 9
    rim = np.zeros_like(labels, bool)
    rim[2:10, 2:8] = True
    rim[3:9, 3:7] = False
    np.testing.assert_array_equal(target[2:10, 2:8] == BOUNDARY, rim[2:10, 2:8])
    assert np.all(target[2:10, 8] == BOUNDARY)  # object 9's side of the seam
    assert np.all(target[3:9, 3:7] == INTERIOR)
    # interiors of different objects never touch: they are separated by boundary pixels
    interior = target == INTERIOR
    assert not np.any(interior[:, 7]) and not np.any(interior[:, 8])


def test_objects_cut_by_the_image_edge_are_not_rimmed_there():
    labels = np.zeros((6, 6), np.int32)
    labels[:3, :3] = 1
    target = boundary_classes(labels)
    assert target[0, 0] == INTERIOR and target[2, 0] == BOUNDARY and target[0, 2] == BOUNDARY
    with pytest.raises(ValueError, match="must be"):
        boundary_classes(np.zeros((2, 2, 2)))


def test_watershed_recovers_touching_objects_from_their_targets():
    labels = _two_touching_squares()
    target = boundary_classes(labels)
    probabilities = np.eye(3, dtype=np.float32)[target]  # a perfect model
    recovered = instances_from_probabilities(probabilities, WatershedConfig(min_seed_area=1, min_object_area=1))
    assert recovered.max() == 2
    for old in (5, 9):  # each true object is exactly one recovered object, boundary included
        values = np.unique(recovered[labels == old])
        assert values.size == 1 and values[0] > 0
        np.testing.assert_array_equal(recovered == values[0], labels == old)
    assert np.all(recovered[labels == 0] == 0)


def test_watershed_drops_small_seeds_and_objects_and_handles_empty_input():
    probabilities = np.zeros((10, 10, 3), np.float32)
    probabilities[..., 0] = 1
    assert instances_from_probabilities(probabilities).max() == 0
    probabilities[1, 1] = [0, 1, 0]  # a one-pixel seed: noise
    assert instances_from_probabilities(probabilities, WatershedConfig(min_seed_area=2)).max() == 0
    labels = np.array([[1, 1, 0, 2], [1, 1, 0, 0], [0, 0, 3, 3]])
    np.testing.assert_array_equal(remove_small_objects(labels, 2), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2]])


def test_default_seeds_split_nuclei_joined_by_an_uncertain_seam_and_drop_tiny_seeds():
    # The defaults (seed threshold 0.9, seeds >= 8 px) were tuned on DSB2018 nuclei (README): seeds at
    # 0.5 merged touching nuclei whose shared rim the model is unsure of.
    labels = _two_touching_squares()
    probabilities = np.eye(3, dtype=np.float32)[boundary_classes(labels)] * 0.98 + 0.01
    probabilities[3:9, 7:9] = [0.0, 0.7, 0.3]  # the seam: interior 0.7, rim 0.3
    recovered = instances_from_probabilities(probabilities)
    assert recovered.max() == 2
    for old in (5, 9):
        values = np.unique(recovered[labels == old])
        assert values.size == 1 and values[0] > 0
    assert instances_from_probabilities(probabilities, WatershedConfig(seed_threshold=0.5)).max() == 1
    # a 20 px object whose confident interior (the seed) has only 6 px: noise under the default
    small = np.zeros((8, 8, 3), np.float32)
    small[..., 0] = 1
    small[2:6, 2:7] = [0.0, 0.0, 1.0]
    small[3:5, 3:6] = [0.0, 1.0, 0.0]
    assert instances_from_probabilities(small).max() == 0
    assert instances_from_probabilities(small, WatershedConfig(min_seed_area=4)).max() == 1
