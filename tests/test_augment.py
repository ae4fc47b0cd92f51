"""Tests for augment.py: config I/O, sampling determinism, image/label alignment, label preservation, boxes."""

import dataclasses
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.ndimage
import yaml

import augment
from augment import (
    AugmentConfig,
    AugmentParams,
    apply_image,
    apply_labels,
    augment_example,
    boxes_from_instances,
    sample_params,
)

HEIGHT, WIDTH = 48, 40  # non-square so row/column mix-ups show

GEOMETRIC_CONFIGS = {
    "nist_default": AugmentConfig(),
    "constant_border": AugmentConfig(border_mode="constant", jitter=0.3),
    "crop_and_resize": AugmentConfig(crop_and_resize=0.5),
    "elastic": AugmentConfig(elastic_alpha=4.0, elastic_sigma=5.0),
    "everything": AugmentConfig(
        crop_and_resize=0.3, elastic_alpha=3.0, elastic_sigma=4.0, intensity=0.1, brightness=0.2
    ),
}


def coordinate_image(height=HEIGHT, width=WIDTH):
    """(H, W, 3) float32: channel 0 is the column, 1 the row of each pixel, 2 is ones (0 = border fill)."""
    rows, columns = np.mgrid[0:height, 0:width]
    return np.stack([columns, rows, np.ones_like(rows)], axis=-1).astype(np.float32)


def coordinate_labels(height=HEIGHT, width=WIDTH, dtype=np.int32):
    """(H, W) label map whose value row * W + column identifies each pixel."""
    rows, columns = np.mgrid[0:height, 0:width]
    return (rows * width + columns).astype(dtype)


def touching_labels(height=HEIGHT, width=WIDTH):
    """Label 1 on the left, label 3 on the right, touching: bilinear warping would create 2s."""
    labels = np.ones((height, width), dtype=np.uint8)
    labels[:, width // 2 :] = 3
    return labels


def geometric_only(config):
    return dataclasses.replace(config, noise=0.0, blur_max_sigma=0.0, intensity=0.0, brightness=0.0)


def assert_params_equal(first, second):
    for field in dataclasses.fields(AugmentParams):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=field.name)
        else:
            assert a == b, field.name


# ---------------------------------------------------------------------------------- config


def test_import_does_not_import_tensorflow():
    code = "import sys, augment; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(augment.__file__))


def test_config_defaults_are_nist():
    config = AugmentConfig()
    assert config.reflection_x and config.reflection_y and config.rotation
    assert config.rotation_max_degrees == 180.0
    assert (config.jitter, config.scale, config.noise, config.blur_max_sigma) == (0.1, 0.1, 0.02, 2.0)
    assert (config.intensity, config.brightness, config.crop_and_resize, config.elastic_alpha) == (0, 0, 0, 0)
    assert config.border_mode == "reflect"
    assert config.geometric_enabled and config.photometric_enabled and not config.is_identity
    assert AugmentConfig.disabled().is_identity


@pytest.mark.parametrize("extension", [".json", ".yaml", ".yml"])
def test_config_file_round_trip(tmp_path, extension):
    config = AugmentConfig(jitter=0.2, elastic_alpha=3, border_mode="constant", reflection_y=False)
    path = tmp_path / f"augment{extension}"
    with open(path, "w") as handle:
        if extension == ".json":
            json.dump(config.to_dict(), handle)
        else:
            yaml.safe_dump(config.to_dict(), handle)
    loaded = AugmentConfig.from_file(path)
    assert loaded == config
    assert isinstance(loaded.elastic_alpha, float)


def test_config_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "augment.yaml"
    path.write_text("scale: 0.2\n")
    assert AugmentConfig.from_file(path) == AugmentConfig(scale=0.2)


def test_config_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ValueError, match="rotaton") as error:
        AugmentConfig.from_dict({"rotaton": True})
    assert "rotation_max_degrees" in str(error.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"scale": 1.0}, r"scale must be in \[0.0, 1.0\)"),
        ({"jitter": -0.1}, "jitter must be in"),
        ({"noise": 1.5}, "noise must be in"),
        ({"rotation_max_degrees": 270}, "rotation_max_degrees"),
        ({"blur_max_sigma": -1}, "blur_max_sigma must be >= 0"),
        ({"elastic_sigma": 0}, "elastic_sigma must be > 0"),
        ({"border_mode": "wrap"}, "border_mode must be one of"),
        ({"rotation": "yes"}, "rotation must be true or false"),
        ({"scale": "0.1"}, "scale must be a number"),
    ],
)
def test_config_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_dict(values)


def test_config_bad_extension(tmp_path):
    path = tmp_path / "augment.txt"
    path.write_text("{}")
    with pytest.raises(ValueError, match="extension"):
        AugmentConfig.from_file(path)


# -------------------------------------------------------------------------------- sampling


def test_disabled_draws_nothing_and_warps_nothing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("cv2 must not be called for an identity transform")

    for name in ("warpAffine", "remap", "GaussianBlur"):
        monkeypatch.setattr(cv2, name, forbidden)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    params = sample_params(rng, AugmentConfig.disabled(), (HEIGHT, WIDTH))
    assert rng.bit_generator.state == state
    assert params.affine is None and params.elastic_dx is None and params.noise_seed is None

    image = np.random.default_rng(1).random((HEIGHT, WIDTH, 3)).astype(np.float32)
    output = apply_image(image, params)
    assert output.dtype == np.float32 and output is not image
    np.testing.assert_array_equal(output, image)
    labels = touching_labels()
    np.testing.assert_array_equal(apply_labels(labels, params), labels)


def test_pure_reflection_uses_flip(monkeypatch):
    monkeypatch.setattr(cv2, "warpAffine", lambda *a, **k: pytest.fail("flip must not warp"))
    config = dataclasses.replace(AugmentConfig.disabled(), reflection_x=True, reflection_y=True)
    image = coordinate_image()
    labels = coordinate_labels()
    seen = set()
    for seed in range(12):
        params = sample_params(np.random.default_rng(seed), config, (HEIGHT, WIDTH))
        axes = params.flip_axes or ()
        seen.add(axes)
        expected = np.flip(image, axis=axes) if axes else image
        np.testing.assert_array_equal(apply_image(image, params), expected)
        np.testing.assert_array_equal(apply_labels(labels, params), np.flip(labels, axis=axes) if axes else labels)
    assert seen == {(), (0,), (1,), (0, 1)}


def test_same_seed_same_params_and_outputs():
    config = GEOMETRIC_CONFIGS["everything"]
    image = np.random.default_rng(5).random((HEIGHT, WIDTH, 2)).astype(np.float32)
    first = sample_params(np.random.default_rng([3, 1, 4]), config, (HEIGHT, WIDTH))
    second = sample_params(np.random.default_rng([3, 1, 4]), config, (HEIGHT, WIDTH))
    assert_params_equal(first, second)
    np.testing.assert_array_equal(apply_image(image, first), apply_image(image, second))
    np.testing.assert_array_equal(apply_image(image, first), apply_image(image, first))
    other = sample_params(np.random.default_rng([3, 1, 5]), config, (HEIGHT, WIDTH))
    assert not np.array_equal(apply_image(image, first), apply_image(image, other))


def test_sampled_ranges():
    config = dataclasses.replace(
        AugmentConfig.disabled(), jitter=0.1, scale=0.2, rotation=True, rotation_max_degrees=30
    )
    for seed in range(50):
        params = sample_params(np.random.default_rng(seed), config, (HEIGHT, WIDTH))
        linear = params.affine[:, :2]
        column_scales = np.linalg.norm(linear, axis=0)  # rotation preserves column norms
        assert np.all(column_scales >= 0.8 - 1e-9) and np.all(column_scales <= 1.2 + 1e-9)
        angle = np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))
        assert abs(angle) <= 30 + 1e-9
        centre = np.array([(WIDTH - 1) / 2, (HEIGHT - 1) / 2])
        shift = params.affine @ np.append(centre, 1.0) - centre  # the centre moves by the jitter only
        assert abs(shift[0]) <= 0.1 * WIDTH and abs(shift[1]) <= 0.1 * HEIGHT


def test_elastic_peak_displacement_is_alpha():
    config = dataclasses.replace(AugmentConfig.disabled(), elastic_alpha=2.5, elastic_sigma=4.0)
    params = sample_params(np.random.default_rng(0), config, (HEIGHT, WIDTH))
    assert params.affine is None
    for field in (params.elastic_dy, params.elastic_dx):
        assert field.dtype == np.float32 and field.shape == (HEIGHT, WIDTH)
        assert np.isclose(np.abs(field).max(), 2.5)


# ------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("name", sorted(GEOMETRIC_CONFIGS))
@pytest.mark.parametrize("label_dtype", [np.int32, np.uint16, np.int64])
def test_image_and_labels_stay_aligned(name, label_dtype):
    config = geometric_only(GEOMETRIC_CONFIGS[name])
    image = coordinate_image()
    labels = coordinate_labels(dtype=label_dtype)
    for seed in range(8):
        params = sample_params(np.random.default_rng(seed), config, (HEIGHT, WIDTH))
        warped_image = apply_image(image, params)
        warped_labels = apply_labels(labels, params)
        assert warped_labels.dtype == label_dtype
        label_rows, label_columns = np.divmod(warped_labels.astype(np.int64), WIDTH)
        source_x, source_y, inside = warped_image[..., 0], warped_image[..., 1], warped_image[..., 2]
        # bilinear interpolation reproduces a linear ramp exactly away from the folded border and
        # from the constant fill
        interior = (source_x > 1) & (source_x < WIDTH - 2) & (source_y > 1) & (source_y < HEIGHT - 2)
        interior &= inside == 1
        assert interior.mean() > 0.3
        # nearest neighbour = the pixel centre closest to the bilinear sample point (cv2 quantises
        # sub-pixel positions to 1/32)
        assert np.abs(label_columns - source_x)[interior].max() <= 0.5 + 1 / 32
        assert np.abs(label_rows - source_y)[interior].max() <= 0.5 + 1 / 32


def test_rotation_and_scale_are_about_the_centre():
    config = dataclasses.replace(AugmentConfig(), jitter=0.0, noise=0.0, blur_max_sigma=0.0)
    size = 33  # odd, so the centre is a pixel centre
    image = coordinate_image(size, size)
    for seed in range(10):
        params = sample_params(np.random.default_rng(seed), config, (size, size))
        np.testing.assert_allclose(apply_image(image, params)[16, 16], [16, 16, 1], atol=1e-4)


def test_crop_and_resize_zooms_inside_the_image():
    config = dataclasses.replace(AugmentConfig.disabled(), crop_and_resize=0.5)
    image = coordinate_image()
    for seed in range(10):
        params = sample_params(np.random.default_rng(seed), config, (HEIGHT, WIDTH))
        source = apply_image(image, params)
        # every output pixel samples inside the input: no border is ever shown
        assert source[..., 0].min() >= -0.5 and source[..., 0].max() <= WIDTH - 0.5
        assert source[..., 1].min() >= -0.5 and source[..., 1].max() <= HEIGHT - 0.5
        assert params.affine[0, 0] >= 1.0 and params.affine[0, 0] == params.affine[1, 1]


# ------------------------------------------------------------------------- label preservation


@pytest.mark.parametrize("name", sorted(GEOMETRIC_CONFIGS))
def test_label_values_preserved(name):
    config = GEOMETRIC_CONFIGS[name]
    labels = touching_labels()
    allowed = {1, 3} | ({0} if config.border_mode == "constant" else set())
    for seed in range(10):
        params = sample_params(np.random.default_rng(seed), config, (HEIGHT, WIDTH))
        warped = apply_labels(labels, params)
        assert warped.dtype == np.uint8 and warped.shape == labels.shape
        assert set(np.unique(warped).tolist()) <= allowed


@pytest.mark.parametrize(
    "dtype, low, high",
    [
        (np.int32, 2**24 + 1, 2**30 + 3),  # float32 would merge 2**24 + 1 with 2**24
        (np.uint32, 2**31 + 1, 2**32 - 1),  # beyond int32: lookup-table path
        (np.int64, 2**40 + 1, 2**40 + 3),
        (np.uint64, 2**63 + 1, 2**63 + 3),
        (np.int8, -5, 7),
    ],
)
def test_wide_label_dtypes_are_exact(dtype, low, high):
    labels = np.full((HEIGHT, WIDTH), low, dtype=dtype)
    labels[:, WIDTH // 2 :] = high
    for border_mode in ("reflect", "constant"):
        config = geometric_only(AugmentConfig(border_mode=border_mode, jitter=0.3, elastic_alpha=2.0))
        params = sample_params(np.random.default_rng(1), config, (HEIGHT, WIDTH))
        warped = apply_labels(labels, params)
        assert warped.dtype == labels.dtype
        allowed = {low, high} | ({0} if border_mode == "constant" else set())
        assert set(np.unique(warped).tolist()) <= allowed
        assert {low, high} <= set(np.unique(warped).tolist())


@pytest.mark.parametrize("name", ["nist_default", "elastic"])
def test_label_dtypes_warp_identically(name):
    # cv2's own INTER_NEAREST warp rounds differently for uint8 and int32; ours must not
    values = coordinate_labels() % 97
    for seed in range(20):
        params = sample_params(np.random.default_rng(seed), GEOMETRIC_CONFIGS[name], (HEIGHT, WIDTH))
        reference = apply_labels(values.astype(np.int32), params)
        for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int64):
            np.testing.assert_array_equal(apply_labels(values.astype(dtype), params), reference)


def test_bool_labels():
    labels = touching_labels() == 3
    params = sample_params(np.random.default_rng(2), AugmentConfig(), (HEIGHT, WIDTH))
    warped = apply_labels(labels, params)
    assert warped.dtype == np.bool_ and warped.any() and not warped.all()


# ------------------------------------------------------------------------------------ boxes


def test_boxes_from_instances():
    labels = np.zeros((10, 12), dtype=np.int32)
    labels[1:4, 2:6] = 1
    labels[5:10, 0:3] = 3  # id 2 is absent and dropped
    boxes, classes, ids = boxes_from_instances(labels, np.array([7, 8, 9], dtype=np.int32))
    np.testing.assert_array_equal(ids, [1, 3])
    np.testing.assert_array_equal(classes, [7, 9])
    np.testing.assert_array_equal(boxes, [[1, 2, 4, 6], [5, 0, 10, 3]])
    assert boxes.dtype == np.float32 and classes.dtype == np.int32 and ids.dtype == np.int32

    empty_boxes, empty_classes, empty_ids = boxes_from_instances(np.zeros((4, 4), np.uint16), np.zeros(0, np.int32))
    assert empty_boxes.shape == (0, 4) and empty_classes.shape == (0,) and empty_ids.shape == (0,)
    with pytest.raises(ValueError, match="instance id 3 has no class"):
        boxes_from_instances(labels, np.array([7, 8], dtype=np.int32))


@pytest.mark.parametrize("name", sorted(GEOMETRIC_CONFIGS))
def test_augment_example_boxes_match_warped_labels(name):
    image = np.random.default_rng(0).random((HEIGHT, WIDTH, 3)).astype(np.float32)
    instances = np.zeros((HEIGHT, WIDTH), dtype=np.int32)
    instances[2:10, 3:12] = 1
    instances[10:30, 12:20] = 2  # touches instance 1 diagonally
    instances[40:47, 30:39] = 3  # near a corner: jitter may push it out
    classes = np.array([1, 2, 1], dtype=np.int32)
    semantic = (instances > 0).astype(np.uint8)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        example = augment_example(rng, GEOMETRIC_CONFIGS[name], image, semantic, instances, classes)
        assert example["image"].shape == image.shape and example["image"].dtype == np.float32
        warped, warped_classes = example["instance_labels"], example["instance_classes"]
        # ids above 3 are mirror copies (reflect border), each with the class of the object it mirrors
        np.testing.assert_array_equal(warped_classes[:3], classes)
        assert set(np.unique(warped).tolist()) <= set(range(len(warped_classes) + 1))
        np.testing.assert_array_equal(example["semantic_mask"] > 0, warped > 0)  # same sampled transform
        present = sorted(set(np.unique(warped).tolist()) - {0})
        np.testing.assert_array_equal(example["box_ids"], present)
        np.testing.assert_array_equal(example["box_classes"], warped_classes[np.array(present, dtype=int) - 1])
        for box, instance_id in zip(example["boxes"], example["box_ids"]):
            rows, columns = np.nonzero(warped == instance_id)
            np.testing.assert_array_equal(box, [rows.min(), columns.min(), rows.max() + 1, columns.max() + 1])


def test_mirror_copy_gets_its_own_id():
    # a shift right by 3 px: output columns 0..2 show source columns -3..-1, reflected to 3..1
    instances = np.zeros((10, 10), np.uint8)
    instances[4:7, 0:2] = 1  # touches the left edge: column 1 reflects into output column 2
    params = AugmentParams(shape=(10, 10), affine=[[1, 0, 3], [0, 1, 0]])
    warped, classes = augment.apply_instance_labels(instances, np.array([5]), params)
    expected = np.zeros((10, 10), np.int32)
    expected[4:7, 3:5] = 1
    expected[4:7, 2] = 2
    np.testing.assert_array_equal(warped, expected)
    np.testing.assert_array_equal(classes, [5, 5])
    assert warped.dtype == np.int32
    np.testing.assert_array_equal(apply_labels(instances, params) > 0, warped > 0)  # semantic agrees

    constant = dataclasses.replace(params, border_mode="constant")
    warped, classes = augment.apply_instance_labels(instances, np.array([5]), constant)
    expected[4:7, 2] = 0
    np.testing.assert_array_equal(warped, expected)
    np.testing.assert_array_equal(classes, [5])
    with pytest.raises(ValueError, match="one class each"):
        augment.apply_instance_labels(instances, np.zeros(0, np.int32), params)


def test_default_augmentation_never_mirrors_an_id():
    """Issue 13: with the "reflect" border, an id used to cover its object and the object's reflection."""
    size = 128
    instances = np.zeros((size, size), np.int32)
    instances[2:12, 50:70] = 1  # near the top edge
    rows, columns = np.mgrid[0:size, 0:size]
    instances[(rows - 64) ** 2 + (columns - 64) ** 2 <= 12**2] = 2  # in the middle
    instances[112:125, 110:124] = 3  # near a corner
    classes = np.array([1, 2, 1], np.int32)
    semantic = np.zeros((size, size), np.uint8)
    semantic[instances > 0] = classes[instances[instances > 0] - 1]
    image = np.zeros((size, size, 1), np.float32)
    config = AugmentConfig()
    draws_with_copies = 0
    for seed in range(200):
        example = augment_example(np.random.default_rng(seed), config, image, semantic, instances, classes)
        # augment_example's first draws are its transform: the same seed gives the same params
        params = sample_params(np.random.default_rng(seed), config, (size, size))
        where_originals_lie = apply_labels(instances, dataclasses.replace(params, border_mode="constant"))
        warped, warped_classes = example["instance_labels"], example["instance_classes"]
        np.testing.assert_array_equal(warped_classes[:3], classes)
        for instance_id in range(1, len(warped_classes) + 1):
            pieces = scipy.ndimage.label(warped == instance_id, structure=np.ones((3, 3)))[1]
            assert pieces <= 1, f"seed {seed}: id {instance_id} is {pieces} pieces"
            if instance_id <= 3:
                np.testing.assert_array_equal(warped == instance_id, where_originals_lie == instance_id)
            else:  # a mirror copy: where the image shows a reflection, with the class it shows
                assert pieces == 1 and not where_originals_lie[warped == instance_id].any()
                assert (example["semantic_mask"][warped == instance_id] == warped_classes[instance_id - 1]).all()
        np.testing.assert_array_equal(example["semantic_mask"] > 0, warped > 0)
        draws_with_copies += len(warped_classes) > 3
        for box, instance_id in zip(example["boxes"], example["box_ids"]):
            found_rows, found_columns = np.nonzero(warped == instance_id)
            extent = [found_rows.min(), found_columns.min(), found_rows.max() + 1, found_columns.max() + 1]
            np.testing.assert_array_equal(box, extent)
    assert draws_with_copies > 100  # the case is exercised: most draws reflect an object into view


def test_augment_example_without_instances():
    image = np.zeros((HEIGHT, WIDTH, 1), np.float32)
    example = augment_example(np.random.default_rng(0), AugmentConfig(), image, touching_labels())
    assert example["instance_labels"] is None and example["boxes"] is None and example["box_classes"] is None
    with pytest.raises(ValueError, match="instance_classes"):
        augment_example(np.random.default_rng(0), AugmentConfig(), image, None, touching_labels())


# ------------------------------------------------------------------------------ photometric


@pytest.mark.parametrize("channels, delta_channel", [(2, 1), (5, 4), (6, 1)])
def test_blur_does_not_mix_channels(channels, delta_channel):
    image = np.zeros((HEIGHT, WIDTH, channels), dtype=np.float32)
    image[20, 20, delta_channel] = 1.0
    params = AugmentParams(shape=(HEIGHT, WIDTH), blur_sigma=1.5)
    blurred = apply_image(image, params)
    others = [c for c in range(channels) if c != delta_channel]
    assert np.all(blurred[..., others] == 0)
    assert np.isclose(blurred[..., delta_channel].sum(), 1.0, atol=1e-4)
    assert blurred[20, 20, delta_channel] < 0.2 and blurred[20, 22, delta_channel] > 0.01


def test_noise_is_float32_and_scaled_by_range():
    image = np.zeros((128, 128, 2), dtype=np.float64)
    params = AugmentParams(shape=(128, 128), noise_fraction=0.1, noise_seed=3, image_range=[[0, 1], [0, 10]])
    noisy = apply_image(image, params)
    assert noisy.dtype == np.float32
    np.testing.assert_allclose(noisy.std(axis=(0, 1)), [0.1, 1.0], rtol=0.05)
    np.testing.assert_array_equal(noisy, apply_image(image, params))
    # without a given range the measured range of the image is used: a flat image gets no noise
    flat = apply_image(np.ones((8, 8, 1), np.float32), AugmentParams(shape=(8, 8), noise_fraction=0.1, noise_seed=3))
    np.testing.assert_array_equal(flat, 1.0)


def test_default_config_noise_and_blur_keep_float32():
    image = np.random.default_rng(0).random((HEIGHT, WIDTH, 1)).astype(np.float32)
    params = sample_params(np.random.default_rng(0), AugmentConfig(), (HEIGHT, WIDTH))
    assert params.noise_seed is not None and 0 <= params.noise_fraction <= 0.02
    output = apply_image(image, params)
    assert output.dtype == np.float32 and output.shape == image.shape and np.isfinite(output).all()


def test_intensity_and_brightness():
    image = np.stack([np.zeros((4, 4)), np.full((4, 4), 2.0)], axis=-1).astype(np.float32)
    image[0, 0] = [1.0, 6.0]  # ranges: 1 and 4
    params = AugmentParams(shape=(4, 4), intensity_fraction=0.5, brightness_factor=2.0)
    expected = (image + np.array([0.5, 2.0], np.float32)) * 2.0
    np.testing.assert_allclose(apply_image(image, params), expected)


# ------------------------------------------------------------------------------- interfaces


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_multichannel_equals_per_channel(channels):
    config = dataclasses.replace(GEOMETRIC_CONFIGS["everything"], noise=0.0)
    image = np.random.default_rng(channels).random((HEIGHT, WIDTH, channels)).astype(np.float32)
    params = sample_params(np.random.default_rng(9), config, (HEIGHT, WIDTH))
    output = apply_image(image, params)
    assert output.shape == image.shape and output.dtype == np.float32
    for channel in range(channels):
        single = apply_image(image[..., channel : channel + 1], params)
        np.testing.assert_allclose(output[..., channel : channel + 1], single, rtol=1e-6, atol=1e-6)


def test_two_dimensional_image_and_no_in_place_changes():
    image = np.random.default_rng(0).random((HEIGHT, WIDTH)).astype(np.float32)
    labels = touching_labels()
    image_copy, labels_copy = image.copy(), labels.copy()
    params = sample_params(np.random.default_rng(0), GEOMETRIC_CONFIGS["everything"], (HEIGHT, WIDTH))
    assert apply_image(image, params).shape == (HEIGHT, WIDTH)
    apply_labels(labels, params)
    np.testing.assert_array_equal(image, image_copy)
    np.testing.assert_array_equal(labels, labels_copy)


def test_shape_mismatch_is_an_error():
    params = sample_params(np.random.default_rng(0), AugmentConfig(), (HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="sampled for"):
        apply_image(np.zeros((WIDTH, HEIGHT, 1), np.float32), params)
    with pytest.raises(ValueError, match="sampled for"):
        apply_labels(np.zeros((HEIGHT + 1, WIDTH), np.uint8), params)
