"""Normalization choices: NIST's per-tile z-score rule, dataset statistics, min-max."""
from __future__ import annotations

import numpy as np
import pytest

from enki_seg.data.normalization import (QUANTILE_LEVELS, QUANTILE_SAMPLE, Normalization, channel_percentiles,
                                         source_image_stats)


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
        Normalization("percentil")
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalization("dataset", [0.0], [0.0])
    with pytest.raises(ValueError, match="1 channel"):
        norm.apply(np.zeros((2, 2, 3), np.float32))


def test_percentile_maps_low_and_high_percentiles_to_0_and_1():
    rng = np.random.default_rng(2)
    image = rng.integers(100, 4000, (64, 64, 2)).astype(np.uint16)
    image[0, 0, 0] = 65535  # a hot pixel does not set the range (it would for minmax)
    out = Normalization("percentile", percentiles=[1, 99.8]).apply(image)
    for c in range(2):
        lo, hi = np.percentile(image[..., c], [1, 99.8])
        np.testing.assert_allclose(out[..., c], (image[..., c] - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    assert np.mean(out[..., 0] <= 1.0) > 0.99
    np.testing.assert_array_equal(Normalization("percentile").apply(np.full((4, 4, 1), 9, np.uint16)), 0)
    with pytest.raises(ValueError, match="low < high"):
        Normalization("percentile", percentiles=[99, 1])


@pytest.mark.parametrize("method", ["zscore", "percentile", "minmax"])
def test_image_scope_tiles_give_the_whole_images_values(method):
    """One image split into tiles gives the normalized values of the whole image, whether the
    statistics come from the image at inference or from what build_lmdb.py stored for it."""
    rng = np.random.default_rng(3)
    image = (rng.gamma(2.0, 300.0, (96, 80, 2)) + np.linspace(0, 2000, 80)[None, :, None]).astype(np.uint16)
    norm = Normalization(method, scope="image", percentiles=[2, 99.5])
    whole = norm.apply(image, affine=norm.affine_from_image(image))
    from_image = norm.for_image(image)
    stored = norm.affine_from_source_stats(source_image_stats(image), "test")
    for y in range(0, 96, 32):
        for x in range(0, 80, 40):
            window = (slice(y, y + 32), slice(x, x + 40))
            np.testing.assert_allclose(from_image(image[window]), whole[window], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(norm.apply(image[window], affine=stored), whole[window], rtol=1e-5,
                                       atol=1e-5)
    tile_scope = Normalization(method, percentiles=[2, 99.5])
    assert not np.allclose(tile_scope.apply(image[:32, :40]), whole[:32, :40], atol=1e-3)


def test_stored_statistics_and_scope_round_trip():
    image = np.random.default_rng(4).integers(0, 1000, (20, 20, 1)).astype(np.uint16)
    stats = source_image_stats(image)
    assert set(stats["quantiles"]) == {f"{level:g}" for level in QUANTILE_LEVELS}
    norm = Normalization("percentile", scope="image", percentiles=[1.5, 99.8])
    with pytest.raises(ValueError, match=r"percentile\(s\) \[1.5\] were not stored"):
        norm.affine_from_source_stats(stats, "db")
    assert Normalization.from_dict(norm.to_dict()) == norm
    old = Normalization.from_dict({"method": "zscore", "mean": [], "std": []})  # a run saved before scopes
    assert old.scope == "tile" and not old.per_image and old.percentiles == [1.0, 99.8]
    assert Normalization("dataset", [1.0], [2.0], scope="image").per_image is False
    with pytest.raises(ValueError, match="scope"):
        Normalization("zscore", scope="slide")


def test_large_planes_use_a_fixed_strided_sample():
    plane = np.arange(QUANTILE_SAMPLE * 2 + 10, dtype=np.float32)
    expected = np.percentile(plane[:: 3], [1, 99])
    np.testing.assert_allclose(channel_percentiles(plane, [1, 99]), expected)
