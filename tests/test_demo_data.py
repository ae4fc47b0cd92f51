"""The synthetic demo dataset: file formats, label consistency, COCO polygons, realism, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.draw import polygon as draw_polygon

from enki_seg.data import demo as demo_data

SIZE = (160, 192)  # (height, width); not square, to catch swapped axes
COUNT = 4


def _read_set(folder: Path, count: int):
    """Lists of images, semantic masks and instance labels as read back from disk."""
    stems = [f"demo_{i:03d}" for i in range(count)]
    images = [tifffile.imread(folder / "images" / f"{stem}.tif") for stem in stems]
    masks = [np.asarray(Image.open(folder / "masks" / f"{stem}.png")) for stem in stems]
    instances = [tifffile.imread(folder / "instances" / f"{stem}.tif") for stem in stems]
    return images, masks, instances


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    assert demo_data.main(["--output_folder", str(folder), "--count", str(COUNT), "--height", str(SIZE[0]),
                           "--width", str(SIZE[1]), "--seed", "3", "--num_workers", "1"]) == 0
    return folder, _read_set(folder, COUNT)


def test_files_have_expected_dtype_and_shape(demo_set):
    folder, (images, masks, instances) = demo_set
    for image, mask, instance in zip(images, masks, instances):
        assert image.dtype == np.uint16 and image.shape == SIZE
        assert mask.dtype == np.uint8 and mask.shape == SIZE
        assert instance.dtype == np.uint16 and instance.shape == SIZE
    assert (folder / "coco.json").is_file()


def test_multichannel_image_is_hwc_with_distinct_related_channels(tmp_path):
    result = demo_data.generate(tmp_path, count=1, height=96, width=128, channels=3, seed=0)
    image = tifffile.imread(result["images"][0])
    assert image.dtype == np.uint16 and image.shape == (96, 128, 3)
    flat = image.reshape(-1, 3).astype(np.float64)
    correlation = np.corrcoef(flat.T)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(image[..., a], image[..., b])
        assert correlation[a, b] < 0.95, f"channels {a} and {b} are near copies"
    # all channels show the same cells: each is brighter on cells than on background
    mask = np.asarray(Image.open(result["masks"][0]))
    for channel in range(3):
        assert image[..., channel][mask == 1].mean() > image[..., channel][mask == 0].mean()


def test_both_foreground_classes_present(demo_set):
    _, (_, masks, _) = demo_set
    present = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert present == {0, demo_data.CELL, demo_data.DEBRIS}


def test_semantic_mask_agrees_with_instance_labels(demo_set):
    _, (_, masks, instances) = demo_set
    for mask, instance in zip(masks, instances):
        assert np.array_equal(mask == 0, instance == 0)
        ids = np.unique(instance[instance > 0])
        assert np.array_equal(ids, np.arange(1, ids.size + 1)), "instance ids must run 1..N"
        for label_id in ids:
            classes = np.unique(mask[instance == label_id])
            assert classes.size == 1 and classes[0] in (demo_data.CELL, demo_data.DEBRIS)


def test_objects_touch_and_overlap(demo_set):
    _, (_, _, instances) = demo_set
    touching = set()
    for index, instance in enumerate(instances):
        touching |= {(index, pair) for pair in demo_data.adjacent_label_pairs(instance.astype(np.int32))}
    assert touching, "no two distinct instances are 4-adjacent anywhere"

    rng = np.random.default_rng([3, 0])
    shapes = demo_data.sample_shapes(rng, *SIZE)
    _, overlapping = demo_data.paint_instances(shapes, *SIZE)
    assert overlapping, "no object was painted over another"


def test_adjacent_label_pairs_on_a_tiny_example():
    labels = np.array([[1, 1, 0, 3],
                       [1, 2, 0, 3],
                       [0, 2, 2, 0]])
    assert demo_data.adjacent_label_pairs(labels) == {(1, 2)}


def test_coco_polygons_match_instance_masks(demo_set):
    folder, (_, masks, instances) = demo_set
    coco = json.loads((folder / "coco.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]
    assert [img["id"] for img in coco["images"]] == list(range(1, COUNT + 1))
    assert [img["file_name"] for img in coco["images"]] == [f"demo_{i:03d}.tif" for i in range(COUNT)]
    assert all((img["height"], img["width"]) == SIZE for img in coco["images"])
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert len(coco["annotations"]) == sum(int(inst.max()) for inst in instances)

    ious = []
    for annotation in coco["annotations"]:
        index = annotation["image_id"] - 1
        instance = instances[index]
        drawn = np.zeros(SIZE, bool)
        for polygon in annotation["segmentation"]:
            assert len(polygon) >= 6 and len(polygon) % 2 == 0
            assert polygon[:2] == polygon[-2:], "polygon is not closed"
            rows, cols = draw_polygon(polygon[1::2], polygon[0::2], shape=SIZE)
            drawn[rows, cols] = True
        label_id = np.bincount(instance[drawn]).argmax() if drawn.any() else 0
        assert label_id > 0
        truth = instance == label_id
        ious.append((drawn & truth).sum() / (drawn | truth).sum())
        assert annotation["category_id"] == masks[index][truth][0]
        assert annotation["area"] == truth.sum()
        rows, cols = np.nonzero(truth)
        assert annotation["bbox"] == [cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1]
        assert annotation["iscrowd"] == 0
    assert np.mean(ious) > 0.8, f"mean polygon IoU {np.mean(ious):.3f}"


def test_split_object_gets_one_polygon_per_piece():
    labels = np.zeros((20, 30), np.uint16)
    labels[8:12, 2:28] = 1   # a bar...
    labels[4:16, 12:18] = 2  # ...cut in two by an object on top
    annotations = demo_data.instance_annotations(labels, np.array([2, 1], np.uint8), image_id=7,
                                                 first_annotation_id=5)
    assert [a["id"] for a in annotations] == [5, 6]
    assert [len(a["segmentation"]) for a in annotations] == [2, 1]
    assert annotations[0]["bbox"] == [2, 8, 26, 4] and annotations[0]["area"] == 2 * 4 * 10
    assert annotations[0]["category_id"] == 2 and annotations[0]["image_id"] == 7


def test_image_looks_like_a_microscope_image(demo_set):
    _, (images, masks, _) = demo_set
    for image, mask in zip(images, masks):
        values = image.astype(np.float64)
        assert 0 < image.min() and image.max() < 65535, "clipped at zero or saturated"
        assert image.max() > 20000, "uses only a small part of the uint16 range"
        background = np.where(mask == 0, values, np.nan)
        assert np.nanstd(background) > 0
        height, width = SIZE
        quarters = {
            "left/right": (background[:, : width // 4], background[:, -width // 4:]),
            "top/bottom": (background[: height // 4], background[-height // 4:]),
        }
        relative = [abs(np.nanmean(a) - np.nanmean(b)) / np.nanmean(background) for a, b in quarters.values()]
        assert max(relative) > 0.03, f"illumination looks even: {relative}"
        cells, debris = values[mask == demo_data.CELL], values[mask == demo_data.DEBRIS]
        assert cells.mean() > np.nanmean(background) and cells.std() > 0, "cells should be bright, textured"
        if debris.size:
            assert debris.mean() < cells.mean(), "debris should look different from cells"


def test_same_seed_same_bytes_any_worker_count_and_different_seed_differs(tmp_path):
    kwargs = dict(count=2, height=64, width=80, channels=2)
    first = demo_data.generate(tmp_path / "a", seed=5, num_workers=1, **kwargs)
    second = demo_data.generate(tmp_path / "b", seed=5, num_workers=2, **kwargs)
    other = demo_data.generate(tmp_path / "c", seed=6, num_workers=1, **kwargs)
    for key in ("images", "masks", "instances"):
        for a, b, c in zip(first[key], second[key], other[key]):
            assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between runs with one seed"
            assert a.read_bytes() != c.read_bytes(), f"{a.name} is the same for two seeds"
    assert first["coco"].read_bytes() == second["coco"].read_bytes()
    assert first["num_objects"] == second["num_objects"]


def test_coco_off_and_bad_arguments(tmp_path):
    assert demo_data.main(["--output_folder", str(tmp_path), "--count", "1", "--height", "48",
                           "--width", "48", "--coco", "0"]) == 0
    assert not (tmp_path / "coco.json").exists()
    assert (tmp_path / "images" / "demo_000.tif").is_file()
    with pytest.raises(ValueError, match="count"):
        demo_data.generate(tmp_path, count=0)
    with pytest.raises(SystemExit):
        demo_data.parse_args(["--output_folder", str(tmp_path), "--coco", "2"])
