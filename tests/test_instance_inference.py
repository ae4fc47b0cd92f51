"""instance_inference.py and inference.py's maskrcnn path: tiling, merging across seams, outputs, CLI.

The model is faked: connected components of the thresholded tile, each reported as a box, a score
growing with its area, class 1 and its mask resized to R x R, cut-off pieces at tile edges
included, as a real model reports them. The paste function is a reference written here.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import tifffile
from pycocotools.coco import COCO
from scipy import ndimage

from enki_seg.evaluation import coco_ap as coco_eval
import inference
from enki_seg.data import tiling
from enki_seg.inference import core
from enki_seg.inference import instance as instance_inference
from enki_seg.inference.instance import Detections, Detector, instance_labels
from enki_seg.data.normalization import Normalization

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),  # pycocotools
]

MASK_SIZE = 32  # R; the fake's nearest-neighbour resize round-trips exactly for objects up to R px
FOREGROUND = 100  # the fake detects pixels above this (raw intensities: normalization "none")
MAX_DETECTIONS = 64


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = ((np.arange(height) + 0.5) * array.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * array.shape[1] / width).astype(int)
    return array[np.ix_(rows, cols)]


def fake_predict(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Every connected component of each tile above FOREGROUND, as Mask R-CNN's outputs."""
    size = len(batch)
    out = {"boxes": np.zeros((size, MAX_DETECTIONS, 4), np.float32),
           "scores": np.zeros((size, MAX_DETECTIONS), np.float32),
           "classes": np.zeros((size, MAX_DETECTIONS), np.int32),
           "num_detections": np.zeros(size, np.int32),
           "masks": np.zeros((size, MAX_DETECTIONS, MASK_SIZE, MASK_SIZE), np.float32)}
    for b, tile in enumerate(batch):
        components, _ = ndimage.label(tile[..., 0] > FOREGROUND)
        for k, where in enumerate(ndimage.find_objects(components)):
            crop = components[where] == k + 1
            out["boxes"][b, k] = [where[0].start, where[1].start, where[0].stop, where[1].stop]
            out["scores"][b, k] = 0.5 + 0.5 * crop.sum() / (crop.sum() + 100.0)
            out["classes"][b, k] = 1
            out["masks"][b, k] = _resize_nearest(crop.astype(np.float32), MASK_SIZE, MASK_SIZE)
        out["num_detections"][b] = len(ndimage.find_objects(components))
    return out


def reference_paste(boxes, masks, height, width, threshold=0.5) -> np.ndarray:
    """(N, height, width) bool: each R x R mask resized (nearest) into its integer box."""
    pasted = np.zeros((len(boxes), height, width), bool)
    for i, (box, mask) in enumerate(zip(np.round(boxes).astype(int), masks)):
        y0, x0, y1, x1 = box
        resized = _resize_nearest(mask, y1 - y0, x1 - x0) >= threshold
        pasted[i, y0:y1, x0:x1] = resized[: height - y0, : width - x0]
    return pasted


def _detector(tile=128, overlap=32, normalization="none", predict=fake_predict, **kwargs) -> Detector:
    return Detector(predict, reference_paste, Normalization(normalization).apply, tile, overlap=overlap,
                    batch_size=3, size_multiple=16, **kwargs)


def _discs(seed=0, count=30, size=300):
    """(size, size, 1) uint16 image of non-touching discs, several centred on the seams and tile edges
    of a 128 px / 32 px overlap plan (tile starts 0, 96, 176; cores split at 112 and 200), one cut by the
    image border; and the (size, size) int32 truth instance labels."""
    rng = np.random.default_rng(seed)
    discs = [(112, 112, 9), (200, 200, 9), (112, 200, 8), (200, 112, 8), (128, 40, 9), (40, 176, 9),
             (224, 260, 7), (260, 96, 9), (150, 224, 6), (96, 150, 9), (296, 150, 7)]
    while len(discs) < count:
        radius = int(rng.integers(5, 10))
        y, x = rng.integers(radius + 1, size - radius - 1, 2)
        if all((y - cy) ** 2 + (x - cx) ** 2 > (radius + r + 3) ** 2 for cy, cx, r in discs):
            discs.append((int(y), int(x), radius))
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.int32)
    for i, (y, x, radius) in enumerate(discs):
        truth[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = i + 1
    image = np.where(truth > 0, 200, 10).astype(np.uint16)[..., None]
    return image, truth


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered by first appearance in raster order (compares partitions, not ids)."""
    ids, first = np.unique(labels, return_index=True)
    order = ids[np.argsort(first)]
    order = order[order != 0]
    lookup = np.zeros(labels.max() + 1, np.int64)
    lookup[order] = np.arange(1, len(order) + 1)
    return lookup[labels]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def test_tiles_merge_to_exactly_one_whole_instance_per_disc():
    image, truth = _discs()
    raw = []

    def counting_predict(batch):
        out = fake_predict(batch)
        raw.append(int(out["num_detections"].sum()))
        return out

    detector = _detector(predict=counting_predict)
    assert [(t.y, t.keep_y0, t.keep_y1) for t in detector.plan(300, 300)[::3]] == [(0, 0, 112), (96, 112, 200),
                                                                                     (176, 200, 304)]
    detections = detector.detect(image)
    count = truth.max()
    assert sum(raw) > count + 10  # the fake saw pieces and duplicates in the overlaps
    assert len(detections) == count
    masks = detections.dense_masks(*truth.shape)
    ious = np.array([[_iou(masks[i], truth == k) for k in range(1, count + 1)] for i in range(len(masks))])
    assert (ious.max(axis=0) >= 0.9).all()  # every disc found whole...
    assert ((ious >= 0.9).sum(axis=1) == 1).all() and ((ious >= 0.9).sum(axis=0) == 1).all()  # ...exactly once
    assert np.all(np.diff(detections.scores) <= 0)
    assert (detections.boxes[:, 2:] <= 300).all() and detections.classes.tolist() == [1] * count
    # memory: crops of the objects, not N x H x W
    assert sum(m.size for m in detections.masks) <= sum((truth == k).sum() * 1.6 for k in range(1, count + 1))


def test_tiled_equals_one_covering_tile():
    image, truth = _discs(seed=1)
    tiled = instance_labels(_detector().detect(image), 300, 300)
    whole_detector = _detector(tile=304)
    assert len(whole_detector.plan(300, 300)) == 1
    whole = instance_labels(whole_detector.detect(image), 300, 300)
    np.testing.assert_array_equal(_canonical(tiled), _canonical(whole))
    np.testing.assert_array_equal(_canonical(whole), _canonical(truth))


def test_small_image_is_padded_seen_once_and_cropped_back():
    image, truth = _discs(count=6, size=100)
    image, truth = image[:, :90].copy(), truth[:, :90].copy()
    truth[95:99, 40:45] = truth.max() + 1  # near the border: its reflection in the padding is a second object
    image[95:99, 40:45] = 200
    shapes = []

    def recording_predict(batch):
        shapes.append(batch.shape)
        return fake_predict(batch)

    detections = _detector(predict=recording_predict).detect(image)
    assert shapes == [(1, 112, 96, 1)]  # padded to the size multiple 16, one call
    labels = instance_labels(detections, 100, 90)
    assert len(detections) == truth.max()  # the mirrored copy (centre outside the image) is dropped
    np.testing.assert_array_equal(_canonical(labels), _canonical(ndimage.label(truth > 0)[0]))


def test_each_tile_is_normalized_on_its_own_window():
    image = np.random.default_rng(0).integers(0, 4000, (200, 150, 1)).astype(np.uint16)
    batches = []

    def recording_predict(batch):
        batches.append(batch.copy())
        return fake_predict(batch)

    detector = _detector(normalization="zscore", predict=recording_predict)
    detector.detect(image)
    tiles = detector.plan(200, 150)
    expected = [Normalization("zscore").apply(tiling.read_window(image, t.y, t.x, t.height, t.width)) for t in tiles]
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(expected))


def test_score_threshold():
    image, truth = _discs(seed=2)
    everything = _detector(score_threshold=0.0).detect(image)
    some = _detector(score_threshold=0.75).detect(image)
    assert len(everything) == truth.max()
    assert 0 < len(some) < len(everything) and some.scores.min() >= 0.75
    assert len(_detector(score_threshold=1.0).detect(image)) == 0


def test_instance_labels_give_overlaps_to_the_higher_score():
    square = np.ones((4, 4), bool)
    detections = Detections(np.array([[0, 0, 4, 4], [2, 2, 6, 6]], np.float32), np.array([0.9, 0.6], np.float32),
                            np.array([1, 2], np.int32), [square, square], np.array([[0, 0], [2, 2]]))
    labels = instance_labels(detections, 8, 8)
    assert labels[3, 3] == 1 and labels[5, 5] == 2 and labels[0, 0] == 1 and (labels > 0).sum() == 28
    assert labels.dtype == np.int32


def test_detector_rejects_bad_settings():
    with pytest.raises(ValueError, match="size multiple"):
        Detector(fake_predict, reference_paste, Normalization("none").apply, 100, size_multiple=16)
    with pytest.raises(ValueError, match="margin"):
        Detector(fake_predict, reference_paste, Normalization("none").apply, 64, overlap=60, size_multiple=16)


def test_writers(tmp_path):
    labels = np.zeros((8, 8), np.int64)
    labels[2, 2] = 70000
    instance_inference.write_instance_labels(tmp_path / "big.tif", labels)
    assert tifffile.imread(tmp_path / "big.tif").dtype == np.uint32
    with pytest.raises(instance_inference.image_io.InputError, match="tif"):
        instance_inference.write_instance_labels(tmp_path / "big.png", labels)
    labels[2, 2] = 3
    instance_inference.write_instance_labels(tmp_path / "small.tif", labels)
    assert tifffile.imread(tmp_path / "small.tif").dtype == np.uint16
    instance_inference.write_json(tmp_path / "nan.json", {"a": [float("nan"), 1.0]})
    assert json.loads((tmp_path / "nan.json").read_text()) == {"a": [None, 1.0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "nan.json", "small.tif"]


def test_instance_classes_by_majority_of_the_semantic_mask():
    instances = np.array([[1, 1, 1, 2], [0, 3, 3, 2]])
    semantic = np.array([[2, 2, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(instance_inference.instance_classes(instances, semantic, 3), [2, 1, 1])
    np.testing.assert_array_equal(instance_inference.instance_classes(instances, None, 3), [1, 1, 1])


# ----------------------------------------------------------------------------- the CLI


def _maskrcnn_run(folder, num_classes=2, name="maskrcnn"):
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"not loaded: model_functions is replaced")
    config = {"model": {"name": name, "config": {}, "size_multiple": 16},
              "classes": {"number_classes": num_classes,
                          "names": {str(k): n for k, n in enumerate(["background", "cell", "debris"][:num_classes])}},
              "input": {"channels": 1, "dtype": "uint16", "tile_size": 128},
              "normalization": {"method": "none", "mean": [], "std": []}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def cli_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(instance_inference, "model_functions", lambda run, *caps: (fake_predict, reference_paste))
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(2):
        image, truth = _discs(seed=i)
        tifffile.imwrite(images / f"img{i}.tif", image[..., 0])
        tifffile.imwrite(masks / f"img{i}.tif", truth.astype(np.uint16))
    return tmp_path, images, masks


def test_cli_writes_labels_overlays_detections_and_metrics(cli_folders, capsys):
    root, images, masks = cli_folders
    run = _maskrcnn_run(root / "run")
    out = root / "out"
    code = inference.main(["--model", str(run), "--image_folder", str(images), "--output_folder", str(out),
                           "--mask_folder", str(masks), "--save_overlay", "1", "--overlap", "32"])
    assert code == 0
    for i in range(2):
        labels = tifffile.imread(out / f"img{i}.tif")
        truth = tifffile.imread(masks / f"img{i}.tif")
        assert labels.dtype == np.uint16
        np.testing.assert_array_equal(_canonical(labels), _canonical(truth))
        assert (out / "overlays" / f"img{i}.png").is_file()
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = COCO(str(out / "detections.json"))
    assert [loaded.imgs[i]["file_name"] for i in (0, 1)] == ["img0.tif", "img1.tif"]
    assert len(loaded.getAnnIds(imgIds=[0])) == 30
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mask_AP"] == pytest.approx(1.0) and metrics["box_AP"] == pytest.approx(1.0)
    assert "mask AP 1.000" in capsys.readouterr().out
    assert not [p for p in out.rglob(".*")]  # no temporary files left


def test_cli_detections_reload_as_coco_results(cli_folders):
    root, images, masks = cli_folders
    out = root / "out"
    assert inference.main(["--model", str(_maskrcnn_run(root / "run")), "--image_folder", str(images),
                           "--output_folder", str(out), "--tile_size", "304"]) == 0
    data = json.loads((out / "detections.json").read_text())
    evaluator = coco_eval.CocoEvaluator([1])
    for i in range(2):
        truth = tifffile.imread(masks / f"img{i}.tif")
        evaluator.add_image(i, 300, 300, truth, [1] * truth.max(), np.zeros((0, 4)), [], [], None)
    gt = COCO()
    gt.dataset = {"images": evaluator.images, "categories": evaluator.categories, "annotations": evaluator.annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = gt.loadRes(data["annotations"])
    assert len(results.getAnnIds()) == 60 and not (out / "metrics.json").exists()


def test_cli_errors_exit_2(cli_folders, caplog):
    root, images, masks = cli_folders
    out = str(root / "out")
    common = ["--image_folder", str(images), "--output_folder", out]
    run = _maskrcnn_run(root / "run")
    three = _maskrcnn_run(root / "three", num_classes=3)
    unet = _maskrcnn_run(root / "unet", name="unet")
    cases = [
        (["--model", str(run), "--save_probabilities", "1"], "--save_probabilities is for semantic runs"),
        (["--model", str(run), "--margin", "8"], "use --overlap"),
        (["--model", str(three), "--mask_folder", str(masks)], "pass --class_folder"),
        (["--model", str(unet), "--score_threshold", "0.3"], "are for maskrcnn runs"),
        (["--model", str(unet), "--max_detections", "300"], "are for maskrcnn runs"),
        (["--model", str(run), "--tta", "flips"], "--tta is for UNet/FC-DenseNet runs"),
        (["--model", str(run), "--max_detections", "0"], "--max_detections must be >= 1"),
        (["--model", str(run), "--overlap", "120"], "change --tile_size, --overlap"),
        (["--model", str(run), "--class_folder", str(root / "nowhere")], "nowhere"),
    ]
    for extra, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="inference"):
            assert inference.main(common + extra) == 2, extra
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0], (extra, errors)


def test_cli_with_an_untrained_small_maskrcnn(tmp_path):
    """The real model path: load model.keras, traced calls on tiles, models.maskrcnn.paste_masks."""
    maskrcnn = pytest.importorskip("models.maskrcnn")
    import keras

    keras.utils.set_random_seed(0)
    model = maskrcnn.MaskRCNN(maskrcnn.MaskRCNNConfig.preset("small"), input_channels=1, num_classes=2)
    run = _maskrcnn_run(tmp_path / "run")
    (run / "model.keras").unlink()
    model.save(run / "model.keras")
    config = json.loads((run / "config.json").read_text())
    config["model"].update(config=model.get_config(), size_multiple=model.size_multiple)
    config["input"]["tile_size"] = 64
    config["normalization"]["method"] = "zscore"
    (run / "config.json").write_text(json.dumps(config))
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", np.random.default_rng(0).integers(0, 1000, (100, 90)).astype(np.uint16))
    out = tmp_path / "out"
    assert inference.main(["--model", str(run), "--image_folder", str(images), "--output_folder", str(out),
                           "--save_overlay", "1", "--score_threshold", "0"]) == 0
    labels = tifffile.imread(out / "a.tif")
    data = json.loads((out / "detections.json").read_text())
    assert labels.shape == (100, 90) and labels.dtype == np.uint16
    assert labels.max() <= len(data["annotations"]) and data["images"][0]["file_name"] == "a.tif"
    assert (out / "overlays" / "a.png").is_file()
    with contextlib.redirect_stdout(io.StringIO()):
        COCO(str(out / "detections.json"))
    # the loaded model takes the caps scaled to the inference tile: 4x the 64 px training tile's area
    predict, _ = instance_inference.model_functions(core.load_run_info(run), 128)
    outputs = predict(np.random.default_rng(1).normal(size=(1, 128, 128, 1)).astype(np.float32))
    assert outputs["boxes"].shape[1] == outputs["masks"].shape[1] == 400
