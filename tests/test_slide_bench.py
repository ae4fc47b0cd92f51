"""The small version of bench/slide_bench.py: a tiled OME-TIFF slide written tile by tile, built and segmented
by region, with a memory bound that fails if the whole slide were read.

The slide is a few thousand pixels a side; the region threshold is lowered to 0 (smaller images are
otherwise read whole), every region read is recorded, reading a TIFF whole fails, and no read may
exceed one row of tiles (a quarter of the slide here).
"""
from __future__ import annotations

import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import tifffile

from bench import slide_bench

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIDE = 2048 + 300  # not a multiple of the 512-px tile: the edge tiles are cut
TILE = 512
BAND = TILE * SIDE  # one row of tiles


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("slide")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    slide_bench.write_slide(root / "images" / "slide.tif", root / "masks" / "slide.tif", SIDE)
    slide_bench.write_slide(root / "images" / "companion.tif", root / "masks" / "companion.tif", 1024, seed=1)
    return root


@pytest.fixture
def region_reads(monkeypatch):
    """Region reading for any size; every region read recorded; reading the slide whole fails."""
    from test_tilewise import record_region_reads

    return record_region_reads(monkeypatch, BAND, lambda path: path.name != "slide.tif")


def _largest_slide_read(reads) -> int:
    return max(h * w for name, _, _, h, w in reads if name == "slide.tif")


def test_slide_is_a_tiled_ome_tiff_equal_to_the_pattern_and_written_tile_by_tile(tmp_path, slide):
    with tifffile.TiffFile(slide / "images" / "slide.tif") as tif:
        assert tif.is_ome and tif.is_bigtiff and tif.pages[0].is_tiled
        assert tif.series[0].axes == "YXS" and tif.series[0].shape == (SIDE, SIDE, 3)
        assert tif.pages[0].tilewidth == 512 and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        image = tif.asarray()
    mask = tifffile.imread(slide / "masks" / "slide.tif")
    expected_image, expected_mask = slide_bench.SlidePattern().region(SIDE, SIDE)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, expected_mask)
    assert image.dtype == np.uint16 and 0.05 < mask.mean() < 0.3  # objects on a background
    # a smaller slide is the top-left corner of a larger one (the bench's in-memory square)
    slide_bench.write_slide(tmp_path / "small.tif", None, 700)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "small.tif"), image[:700, :700])
    # the writer holds a few tiles (1.6 MB each, plus the disks' float32 brightness), never the image (33 MB)
    tracemalloc.start()
    try:
        slide_bench.write_slide(tmp_path / "again.tif", None, SIDE, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12e6 < image.nbytes / 2, f"{peak / 1e6:.1f} MB"


def test_measured_run_reports_the_peak_of_the_process_tree(tmp_path):
    # a child that starts a grandchild holding ~300 MB: the tree's peak must see it
    script = textwrap.dedent("""
        import subprocess, sys
        subprocess.run([sys.executable, "-c",
                        "import numpy as np, time; a = np.ones(300_000_000 // 8); time.sleep(1.0)"], check=True)
    """)
    result = slide_bench.measured_run([sys.executable, "-c", script], tmp_path / "log")
    assert result["code"] == 0
    assert 0.28 < result["tree_peak_gb"] < 1.0 and 0.28 < result["maxrss_gb"] < 1.0
    assert slide_bench.peak_gb(result) == max(result["tree_peak_gb"], result["maxrss_gb"])


@pytest.mark.slow
def test_slide_is_built_and_segmented_by_region_never_whole(slide, tmp_path, region_reads):
    import build_lmdb
    import inference
    from enki_seg.data import records
    from enki_seg.inference import core, semantic

    assert build_lmdb.main(["--image_folder", str(slide / "images"), "--mask_folder", str(slide / "masks"),
                            "--output_folder", str(tmp_path / "lmdb"), "--dataset_name", "s", "--quiet",
                            "--workers", "1", "--use_tiling", "1", "--tile_size", str(TILE), "--tile_overlap", "0",
                            "--train_fraction", "0.5"]) == 0
    assert {name for name, *_ in region_reads} >= {"slide.tif"}
    assert _largest_slide_read(region_reads) <= BAND < SIDE * SIDE // 4
    count = 0
    for split in ("train", "test"):
        with records.Database(str(tmp_path / "lmdb" / f"{split}-s.lmdb")) as db:
            count += len(db)
            assert db.metadata.channels == 3
    assert count == 5 * 5 + 2 * 2  # the slide's 512-px tiles (edges shifted inwards) + the companion's

    region_reads.clear()
    run = slide_bench.write_run(tmp_path / "run", TILE)
    assert inference.main(["--model", str(run), "--image_folder", str(slide / "images"),
                           "--output_folder", str(tmp_path / "out"), "--tile_size", str(TILE)]) == 0
    assert _largest_slide_read(region_reads) <= BAND
    with tifffile.TiffFile(tmp_path / "out" / "slide.tif") as tif:  # a slide's output: a pyramidal OME-TIFF
        assert tif.is_ome and tif.series[0].shape == (SIDE, SIDE) and len(tif.series[0].levels) > 1
        labels = tif.series[0].levels[0].asarray()
    image, _ = slide_bench.SlidePattern().region(SIDE, SIDE)
    segmenter = semantic.Segmenter(core.load_run_info(run), tile_size=TILE)
    np.testing.assert_array_equal(labels, segmenter.segment(image))


def test_labels_equal_compares_level_0_band_by_band(tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, (300, 200), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", labels, tile=(64, 64))
    tifffile.imwrite(tmp_path / "b.tif", labels)
    changed = labels.copy()
    changed[299, 199] += 1
    tifffile.imwrite(tmp_path / "c.tif", changed, tile=(64, 64))
    assert slide_bench.labels_equal(tmp_path / "a.tif", tmp_path / "b.tif", rows=128)
    assert not slide_bench.labels_equal(tmp_path / "a.tif", tmp_path / "c.tif", rows=128)
    tifffile.imwrite(tmp_path / "d.tif", labels[:299], tile=(64, 64))
    assert not slide_bench.labels_equal(tmp_path / "a.tif", tmp_path / "d.tif", rows=128)
