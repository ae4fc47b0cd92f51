"""Normalization choices: NIST's per-tile z-score rule, dataset statistics, min-max."""
from __future__ import annotations

import numpy as np
import pytest

from enki_seg.data.normalization import Normalization


def test_zscore_per_channel_and_nist_constant_rule():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(500, 40, (16, 16)), np.full((16, 16), 7.0),
                      7.0 + 0.5 * rng.standard_normal((16, 16))], axis=-1).astype(np.uint16)
    out = Normalization("zscore").apply(image)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert abs(out[..., 0].mean()) < 1e-4 and abs(out[..., 0].std() - 1) < 1e-4
    np.testing.assert_allclose(out[..., 1], 0.0)  # constant channel: mean removed, no division
    plane = image[..., 2].astype(np.float64)
    assert plane.std() <= 1.0  # NIST: std <= 1 means "near constant", only subtract the mean
    np.testing.assert_allclose(out[..., 2], plane - plane.mean(), atol=1e-5)


def test_dataset_statistics_and_minmax_and_none():
    image = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    norm = Normalization("dataset", mean=[1.0, 2.0], std=[2.0, 4.0])
    np.testing.assert_allclose(norm.apply(image), (image - [1.0, 2.0]) / [2.0, 4.0])
    mm = Normalization("minmax").apply(image)
    assert mm[..., 0].min() == 0 and mm[..., 0].max() == 1 and mm[..., 1].max() == 1
    np.testing.assert_array_equal(Normalization("minmax").apply(np.full((2, 2, 1), 5, np.uint8)), 0)
    np.testing.assert_array_equal(Normalization("none").apply(image.astype(np.uint16)), image)


def test_in_place_and_round_trip_and_errors():
    image = np.random.default_rng(1).normal(10, 3, (8, 8, 1)).astype(np.float32)
    expected = Normalization("zscore").apply(image)
    same = Normalization("zscore").apply(image, out=image)
    assert same is image
    np.testing.assert_allclose(image, expected)
    norm = Normalization("dataset", [1.0], [2.0])
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="not one of"):
        Normalization("percentile")
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalization("dataset", [0.0], [0.0])
    with pytest.raises(ValueError, match="1 channel"):
        norm.apply(np.zeros((2, 2, 3), np.float32))
