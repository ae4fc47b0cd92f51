"""Outputs of whole slides: pyramidal, tiled, compressed OME-TIFFs written band by band.

The writer (``enki_seg.inference.pyramid``) is checked on synthetic bands (levels, layout, memory),
and inference.py on a tiled TIFF slide read by region (threshold lowered as in test_tilewise.py):
level 0 of its label OME-TIFF equals the labels of a whole-image run, and the whole label image is
never assembled. Instance labels (Mask R-CNN, the model faked as in test_instance_inference.py) are
painted band by band with the ids of a whole painting.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from enki_seg.data import image_io
from enki_seg.inference import pyramid

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]


def _bands(array, rows):
    for y in range(0, array.shape[0], rows):
        yield array[y : y + rows].copy()


def _check_layout(path, shape, levels):
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert len(series.levels) == levels
        for level, below in zip(series.levels, series.levels[1:]):  # each half (rounded up) of the previous
            assert below.shape[-2:] == tuple(-(-n // 2) for n in level.shape[-2:])
        assert series.levels[0].shape == shape
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == page.tilelength == pyramid.TILE
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == levels - 1
        return [level.asarray() for level in series.levels]


def test_label_pyramid_levels_layout_and_bounded_memory(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (8200, 1000), dtype=np.uint8)
    pyramid.write_pyramid(tmp_path / "warm.tif", [labels[:600]], 600, 1000, np.uint8, "nearest")  # imports, caches
    (tmp_path / "warm.tif").unlink()
    tracemalloc.start()
    try:
        pyramid.write_pyramid(tmp_path / "a.tif", _bands(labels, 300), *labels.shape, np.uint8, "nearest")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # memory: a few rows of tiles (zarr copies a block read ~3x), never a level: the slide is 16 rows of tiles
    tile_row = pyramid.TILE * labels.shape[1]
    assert peak < 8 * tile_row <= labels.nbytes / 2
    levels = _check_layout(tmp_path / "a.tif", labels.shape, 6)  # 8200 -> 4100 -> ... -> 257
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, labels[:: 2**k, :: 2**k])
    assert not [p for p in tmp_path.iterdir() if p.name != "a.tif"]  # the temporary levels are gone


def test_probability_pyramid_is_planar_and_averaged(tmp_path):
    rng = np.random.default_rng(1)
    probabilities = rng.random((700, 1102, 3)).astype(np.float32)
    pyramid.write_pyramid(tmp_path / "p.tif", _bands(probabilities, 97), 700, 1102, np.float32, "mean", channels=3)
    levels = _check_layout(tmp_path / "p.tif", (3, 700, 1102), 3)  # (350, 551), (175, 276)
    np.testing.assert_array_equal(levels[0], np.moveaxis(probabilities, -1, 0))
    expected = probabilities.reshape(350, 2, 551, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(levels[1], np.moveaxis(expected, -1, 0), atol=1e-6)
    # an odd side: the last column repeated
    odd = np.pad(expected, [(0, 0), (0, 1), (0, 0)], mode="edge").reshape(175, 2, 276, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(levels[2], np.moveaxis(odd, -1, 0), atol=1e-6)


def test_band_of_the_wrong_shape_is_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        pyramid.write_pyramid(tmp_path / "a.tif", [np.zeros((10, 99), np.uint8)], 10, 100, np.uint8, "nearest")
    with pytest.raises(ValueError, match="cover 10 rows of 20"):
        pyramid.write_pyramid(tmp_path / "a.tif", [np.zeros((10, 100), np.uint8)], 20, 100, np.uint8, "nearest")
    with pytest.raises(ValueError, match="float16"):
        pyramid.PyramidWriter(tmp_path / "a.tif", 10, 100, np.float16, "mean", channels=2)
    assert not list(tmp_path.iterdir())


def test_uint8_probabilities_scale_to_255():
    from enki_seg.inference.semantic import scale_probabilities

    p = np.array([0.0, 0.5, 0.999, 1.0], np.float16)
    assert scale_probabilities(p, "uint8").tolist() == [0, 128, 255, 255]
    assert scale_probabilities(p, "float32").dtype == np.float32


@pytest.mark.slow
def test_slide_inference_writes_pyramids_equal_to_a_whole_run(tmp_path, monkeypatch):
    from test_inference import _build_model, write_run
    from test_tilewise import _slide, _write_tiled

    import inference
    from enki_seg.inference import core, semantic

    image, mask = _slide()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _write_tiled(tmp_path / "images" / "slide.tif", image)
    tifffile.imwrite(tmp_path / "masks" / "slide.tif", mask)
    run = write_run(tmp_path / "run", _build_model(), {"method": "zscore", "mean": [], "std": []})
    segmenter = semantic.Segmenter(core.load_run_info(run), tile_size=256, batch_size=4)
    whole = segmenter.segment(image[..., None])
    whole_probabilities = segmenter.probabilities(image[..., None])

    monkeypatch.setattr(image_io, "REGION_READ_MIN_PIXELS", 0)
    writes = []
    original_write = tifffile.TiffWriter.write

    def write(self, data=None, *args, **kwargs):  # the writer gets tiles from an iterator, never an array
        writes.append(type(data))
        return original_write(self, data, *args, **kwargs)

    def no_whole_labels(self, image, *args, **kwargs):
        raise AssertionError("the label image of a slide was assembled whole")

    monkeypatch.setattr(tifffile.TiffWriter, "write", write)
    monkeypatch.setattr(semantic.Segmenter, "segment", no_whole_labels)
    out = tmp_path / "pred"
    assert inference.main(["--model", str(run), "--image_folder", str(tmp_path / "images"), "--output_folder",
                           str(out), "--tile_size", "256", "--save_overlay", "1", "--save_probabilities", "1",
                           "--mask_folder", str(tmp_path / "masks")]) == 0
    assert writes and not any(issubclass(t, np.ndarray) for t in writes)
    labels = _check_layout(out / "slide.tif", whole.shape, 4)  # 2304 -> 1152 -> 576 -> 288
    np.testing.assert_array_equal(labels[0], whole)
    np.testing.assert_array_equal(labels[3], whole[::8, ::8])
    probabilities = _check_layout(out / "probabilities" / "slide.tif", (3, *whole.shape), 4)
    assert probabilities[0].dtype == np.float32  # the default float16 has no OME pixel type: float32
    np.testing.assert_allclose(probabilities[0], np.moveaxis(whole_probabilities, -1, 0), atol=2e-3)
    assert (out / "overlays" / "slide.png").is_file()
    # metrics band by band (the mask read by region) equal those of the whole label image
    from enki_seg.evaluation import metrics as seg_metrics
    from enki_seg.evaluation.semantic_evaluation import Evaluation

    reference = Evaluation(3)
    reference.add("slide.tif", mask, whole)
    written = seg_metrics.read_json(out / "metrics.json")
    np.testing.assert_array_equal(written.confusion, reference.total.result().confusion)
    assert written.confusion.sum() == whole.size
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary levels left

    # a small image (read whole) keeps today's outputs: one plain page; uint8 probabilities = round(255 p)
    small = image[:200, :300]
    (tmp_path / "small").mkdir()
    tifffile.imwrite(tmp_path / "small" / "a.tif", small)  # one strip: read whole
    monkeypatch.undo()
    assert inference.main(["--model", str(run), "--image_folder", str(tmp_path / "small"), "--output_folder",
                           str(tmp_path / "small_pred"), "--tile_size", "256", "--save_probabilities", "1",
                           "--probability_dtype", "uint8"]) == 0
    with tifffile.TiffFile(tmp_path / "small_pred" / "a.tif") as tif:
        assert not tif.is_ome and len(tif.pages) == 1 and not tif.pages[0].subifds
        np.testing.assert_array_equal(tif.asarray(), segmenter.segment(small[..., None]))
    scaled = tifffile.imread(tmp_path / "small_pred" / "probabilities" / "a.tif")
    assert scaled.dtype == np.uint8 and scaled.shape == (3, 200, 300)
    expected = np.moveaxis(segmenter.probabilities(small[..., None]), -1, 0) * 255
    assert np.abs(scaled - expected).max() <= 1


# ----------------------------------------------------------------------------- instance labels (Mask R-CNN)


def test_instance_label_bands_equal_the_whole_painting():
    from enki_seg.inference.instance import Detections, instance_label_bands, instance_labels

    rng = np.random.default_rng(2)
    n, height, width = 40, 97, 83
    sizes = rng.integers(3, 30, (n, 2))
    offsets = np.stack([rng.integers(0, height - sizes[:, 0]), rng.integers(0, width - sizes[:, 1])], axis=1)
    masks = [rng.random(tuple(s)) < 0.7 for s in sizes]  # overlapping objects, crossing band edges
    scores = rng.permutation(np.repeat(rng.random(n // 2), 2)).astype(np.float32)  # ties too
    detections = Detections(np.zeros((n, 4), np.float32), scores, np.ones(n, np.int32), masks, offsets)
    whole = instance_labels(detections, height, width)
    for rows in (1, 7, 50, 200):
        bands = list(instance_label_bands(detections, height, width, rows, np.uint16))
        assert all(b.dtype == np.uint16 for b in bands)
        np.testing.assert_array_equal(np.concatenate(bands), whole)


def test_slide_instance_labels_stream_into_a_pyramid(tmp_path, monkeypatch):
    from test_instance_inference import _canonical, _discs, _maskrcnn_run, fake_predict, reference_paste

    import inference
    from enki_seg.inference import instance

    monkeypatch.setattr(instance, "model_functions", lambda run, *caps: (fake_predict, reference_paste))
    image, truth = _discs(seed=3, count=200, size=1100)
    (tmp_path / "slide").mkdir()
    (tmp_path / "small").mkdir()
    tifffile.imwrite(tmp_path / "slide" / "a.tif", image[..., 0], tile=(256, 256), compression="zlib")
    tifffile.imwrite(tmp_path / "small" / "a.tif", image[..., 0])  # one strip: read whole
    run = _maskrcnn_run(tmp_path / "run")

    def cli(folder, out):
        return inference.main(["--model", str(run), "--image_folder", str(tmp_path / folder), "--output_folder",
                               str(tmp_path / out), "--save_overlay", "1", "--overlap", "32"])

    assert cli("small", "whole") == 0
    whole = tifffile.imread(tmp_path / "whole" / "a.tif")
    monkeypatch.setattr(image_io, "REGION_READ_MIN_PIXELS", 0)

    def no_whole_labels(*args, **kwargs):
        raise AssertionError("the instance label image of a slide was painted whole")

    monkeypatch.setattr(instance, "instance_labels", no_whole_labels)
    assert cli("slide", "region") == 0
    levels = _check_layout(tmp_path / "region" / "a.tif", (1100, 1100), 3)  # 1100 -> 550 -> 275
    assert levels[0].dtype == np.uint16
    np.testing.assert_array_equal(levels[0], whole)  # the same ids: unique over the slide
    np.testing.assert_array_equal(_canonical(levels[0]), _canonical(truth))  # seam objects come out once
    np.testing.assert_array_equal(levels[1], whole[::2, ::2])
    import imagecodecs

    np.testing.assert_array_equal(imagecodecs.imread(str(tmp_path / "region" / "overlays" / "a.png")),
                                  imagecodecs.imread(str(tmp_path / "whole" / "overlays" / "a.png")))
    assert not [p for p in (tmp_path / "region").rglob(".*")]
