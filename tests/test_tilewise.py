"""Whole slides read tile by tile: tiled TIFF / OME-Zarr sources in build_lmdb.py and inference.

A tiled TIFF of a few thousand pixels a side (written tile by tile) is built and segmented with the
region threshold lowered to 0; the records and labels must equal those of the same image read whole,
and no read may come near the whole image: every region read is recorded and the whole-image readers
are made to fail for it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

import build_lmdb
from enki_seg.data import image_io, records
from enki_seg.data.normalization import Normalization

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]

HEIGHT, WIDTH, CHUNK = 2304, 1536, 256
TILE = 256  # builder tiles


def _slide(seed=0):
    """(H, W) uint16 smooth blobs plus noise and its (H, W) uint8 mask of 3 classes."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(HEIGHT // 64 + 1, WIDTH // 64 + 1))
    smooth = np.kron(coarse, np.ones((64, 64)))[:HEIGHT, :WIDTH]
    image = (20000 + 4000 * smooth + 500 * rng.normal(size=(HEIGHT, WIDTH))).clip(0, 65535).astype(np.uint16)
    mask = np.digitize(smooth, [-0.5, 0.8]).astype(np.uint8)
    return image, mask


def _write_tiled(path: Path, array: np.ndarray) -> None:
    """A tiled TIFF written tile by tile (the writer never holds more than one tile)."""
    def tiles():
        for y in range(0, array.shape[0], CHUNK):
            for x in range(0, array.shape[1], CHUNK):
                tile = np.zeros((CHUNK, CHUNK), array.dtype)
                part = array[y : y + CHUNK, x : x + CHUNK]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    tifffile.imwrite(path, tiles(), shape=array.shape, dtype=array.dtype, tile=(CHUNK, CHUNK),
                     compression="zlib", photometric="minisblack")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("slide")
    image, mask = _slide()
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(2):  # two sources: one per split
        _write_tiled(root / "images" / f"slide{i}.tif", np.roll(image, 300 * i, axis=1))
        _write_tiled(root / "masks" / f"slide{i}.tif", np.roll(mask, 300 * i, axis=1))
    return root, image


_READ_IMAGE, _READ_LABELS = image_io.read_image, image_io.read_labels
#: the most pixels one read may take: one full-width row of 256-px tiles, an eighth of the slide
BAND = 256 * WIDTH


def record_region_reads(monkeypatch, band: int, may_read_whole) -> list[tuple[str, int, int, int, int]]:
    """Region reading on for any size, full reads in bands of ``band`` pixels; returns the list every
    region read is recorded in (name, y, x, h, w); reading a file whole fails unless ``may_read_whole(path)``."""
    reads: list[tuple[str, int, int, int, int]] = []
    monkeypatch.setattr(image_io, "REGION_READ_MIN_PIXELS", 0)
    monkeypatch.setattr(image_io, "BAND_PIXELS", band)
    original = image_io.RegionSource.read_region

    def read_region(self, y, x, height, width):
        reads.append((Path(self.path).name, y, x, height, width))
        return original(self, y, x, height, width)

    def no_whole_read(path, *args, **kwargs):
        if not may_read_whole(Path(path)):
            raise AssertionError(f"{path} was read whole")
        return _READ_IMAGE(path)

    monkeypatch.setattr(image_io.RegionSource, "read_region", read_region)
    monkeypatch.setattr(image_io, "read_image", no_whole_read)
    monkeypatch.setattr(image_io, "read_labels", no_whole_read)
    return reads


@pytest.fixture
def region_reads(monkeypatch):
    """Region reads recorded, in bands of BAND pixels; reading a TIFF whole fails."""
    return record_region_reads(monkeypatch, BAND, lambda path: path.suffix != ".tif")


def _largest_read(reads) -> int:
    return max(h * w for _, _, _, h, w in reads)


def _build(root: Path, out: Path) -> int:
    return build_lmdb.main(["--image_folder", str(root / "images"), "--mask_folder", str(root / "masks"),
                            "--output_folder", str(out), "--dataset_name", "s", "--quiet", "--workers", "1",
                            "--use_tiling", "1", "--tile_size", str(TILE), "--tile_overlap", "32",
                            "--train_fraction", "0.5"])


def _read_all(path):
    with records.Database(str(path)) as db:
        return db.metadata, [db.read(i) for i in range(len(db))]


def test_open_image_reads_regions_of_a_tiled_tiff(slide, monkeypatch):
    root, image = slide
    monkeypatch.setattr(image_io, "REGION_READ_MIN_PIXELS", 0)
    with image_io.open_image(root / "images" / "slide0.tif") as source:
        assert source.tile_wise and source.shape == (HEIGHT, WIDTH, 1) and source.dtype == np.uint16
        np.testing.assert_array_equal(source.read_region(700, 900, 300, 400)[..., 0], image[700:1000, 900:1300])
        # reflection beyond the border as np.pad(mode="reflect")
        padded = np.pad(image, 40, mode="reflect")
        np.testing.assert_array_equal(source.read_window(-40, WIDTH - 100, 128, 140)[..., 0],
                                      padded[0:128, WIDTH - 60 : WIDTH + 80])
        np.testing.assert_array_equal(source.subsample(7)[..., 0], image[::7, ::7])
    monkeypatch.undo()
    with image_io.open_image(root / "images" / "slide0.tif") as source:  # default threshold: small, whole
        assert not source.tile_wise


def test_overlapping_rows_of_tiles_decode_each_chunk_row_once(slide, monkeypatch):
    """Inference steps by less than a tile: each band overlaps the last; rows come in whole chunk rows
    and the last ones are kept, so every row of the file is read once (not ~twice)."""
    root, image = slide
    monkeypatch.setattr(image_io, "REGION_READ_MIN_PIXELS", 0)
    padded = np.pad(image, 48, mode="reflect")
    with image_io.open_image(root / "images" / "slide0.tif") as source:
        for y in range(-48, HEIGHT + 48 - 300, 208):  # 300-row windows at a 208-row stride, from the reflection
            for x in (-48, 600):
                np.testing.assert_array_equal(source.read_window(y, x, 300, 400)[..., 0],
                                              padded[y + 48 : y + 348, x + 48 : x + 448])
        heights = [h for _, _, h, _ in source.regions_read]
        assert sum(heights) == HEIGHT and all(h % CHUNK == 0 and h <= 2 * CHUNK for h in heights)


def test_build_by_region_equals_whole_read_and_never_reads_the_whole_slide(slide, tmp_path, monkeypatch,
                                                                           region_reads):
    root, _ = slide
    with monkeypatch.context() as whole_reads:  # the default threshold: these slides are read whole
        whole_reads.setattr(image_io, "REGION_READ_MIN_PIXELS", 1 << 40)
        whole_reads.setattr(image_io, "read_image", _READ_IMAGE)
        whole_reads.setattr(image_io, "read_labels", _READ_LABELS)
        assert _build(root, tmp_path / "whole") == 0
    assert not region_reads
    assert _build(root, tmp_path / "region") == 0
    # memory: both slides and masks were read, none in a read of more than one row of tiles
    assert {name for name, *_ in region_reads} == {"slide0.tif", "slide1.tif"}
    assert _largest_read(region_reads) <= BAND < HEIGHT * WIDTH // 8
    for split in ("train", "test"):
        whole_meta, whole = _read_all(tmp_path / "whole" / f"{split}-s.lmdb")
        region_meta, region = _read_all(tmp_path / "region" / f"{split}-s.lmdb")
        assert len(whole) == len(region) > 0
        for a, b in zip(whole, region):
            assert a.image.dtype == b.image.dtype and a.semantic_mask.dtype == b.semantic_mask.dtype
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.semantic_mask, b.semantic_mask)
        assert whole_meta.sources == region_meta.sources
        assert whole_meta.mask_dtype == region_meta.mask_dtype
        for key in ("mean", "std", "min", "max"):
            np.testing.assert_allclose(region_meta.channel_stats[key], whole_meta.channel_stats[key], rtol=1e-12)
        for name, stats in whole_meta.source_stats.items():
            assert region_meta.source_stats[name]["quantiles"] == stats["quantiles"]  # the same subsample
            np.testing.assert_allclose(region_meta.source_stats[name]["std"], stats["std"], rtol=1e-12)


def test_records_of_a_slide_are_written_as_they_are_made(slide, tmp_path, monkeypatch, region_reads):
    """A source tiled by region never has all its records in memory: each goes to the LMDB writer as it
    is encoded (a worker would hold a 40,000 px slide's ~10 GB of records and pickle them back)."""
    from enki_seg.data import convert, writer

    root, _ = slide
    encoded, lags = [0], []
    original_encode, original_put = records.encode_example, writer.LmdbWriter.put

    def encode(*args, **kwargs):
        encoded[0] += 1
        return original_encode(*args, **kwargs)

    def put(self, key, value):
        if key != records.METADATA_KEY:
            lags.append(encoded[0] - len(lags) - 1)  # records encoded but not yet handed to a writer
        return original_put(self, key, value)

    monkeypatch.setattr(convert.records, "encode_example", encode)
    monkeypatch.setattr(writer.LmdbWriter, "put", put)
    assert _build(root, tmp_path / "out") == 0
    assert len(lags) == encoded[0] > 20 and max(lags) == 0


def test_a_slide_failing_half_way_leaves_no_records(tmp_path):
    """--skip_bad with a streamed source that fails after some records: those records are deleted."""
    from enki_seg.data import build, writer

    target = writer.LmdbWriter(tmp_path / "db", 1 << 20)
    accumulator = writer.SplitAccumulator("train")
    target.put(records.record_key(0), b"kept")
    accumulator.sources.append(None)  # one record of an earlier source

    def failing(source, options, emit):
        emit(b"a")
        emit(b"b")
        raise image_io.InputError("slide.tif: tile 3 is corrupt")

    original = build.convert_source
    build.convert_source = failing
    try:
        assert build._convert_streaming(None, None, target, accumulator) == ("bad", "slide.tif: tile 3 is corrupt")
    finally:
        build.convert_source = original
    target.flush()
    with target.env.begin() as txn:
        assert [key for key, _ in txn.cursor()] == [records.record_key(0)]
    target.close()


def test_mask_is_read_by_region_in_bands(slide, region_reads):
    root, _ = slide
    _, mask = _slide()
    with image_io.open_labels(root / "masks" / "slide0.tif") as labels:
        assert labels.dtype == np.uint8 and labels.values.tolist() == np.unique(mask).tolist()
        np.testing.assert_array_equal(labels.read_region(100, 50, 20, 30), mask[100:120, 50:80])
    assert _largest_read(region_reads) <= BAND


def test_image_scope_statistics_by_region_equal_whole(slide, monkeypatch, region_reads):
    root, image = slide
    monkeypatch.setattr("enki_seg.data.normalization.QUANTILE_SAMPLE", 1 << 16)  # the strided subsample
    tile = image[:256, :256, None]
    for method in ("percentile", "zscore", "minmax"):
        normalization = Normalization(method, scope="image")
        with image_io.open_image(root / "images" / "slide0.tif") as source:
            by_region = normalization.for_image(source)(tile)
        np.testing.assert_allclose(by_region, normalization.for_image(image[..., None])(tile), rtol=1e-6)
    assert _largest_read(region_reads) <= BAND


def test_ome_zarr_folder_is_read_by_region(tmp_path):
    import zarr

    image, _ = _slide()
    channels = np.stack([image[:512, :384], image[512:1024, :384]])  # (C, Y, X)
    group = zarr.open_group(str(tmp_path / "a.ome.zarr"), mode="w")
    array = group.create_array("0", shape=(1, 2, 1, 512, 384), chunks=(1, 1, 1, 128, 128), dtype="uint16")
    array[...] = channels[None, :, None]
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                   "axes": [{"name": n} for n in "tczyx"]}]
    assert image_io.list_images(tmp_path, "zarr") == [tmp_path / "a.ome.zarr"]
    with image_io.open_image(tmp_path / "a.ome.zarr") as source:
        assert source.tile_wise and source.shape == (512, 384, 2)
        np.testing.assert_array_equal(source.read_region(10, 20, 30, 40), np.moveaxis(channels, 0, -1)[10:40, 20:60])
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "a.ome.zarr"), np.moveaxis(channels, 0, -1))


def test_large_whole_read_is_logged(tmp_path, monkeypatch, caplog):
    import imagecodecs

    imagecodecs.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(image_io, "LARGE_IMAGE_PIXELS", 1)
    with caplog.at_level(logging.INFO, logger="enki_seg.data.image_io"):
        source = image_io.open_image(tmp_path / "a.png")
    assert not source.tile_wise and "read whole" in caplog.text and "cannot be read by region" in caplog.text


@pytest.mark.slow
def test_semantic_inference_by_region_equals_whole(slide, tmp_path, region_reads):
    from test_inference import _build_model, write_run

    import inference
    from enki_seg.inference import core, semantic

    root, image = slide
    run = write_run(tmp_path / "run", _build_model(), {"method": "zscore", "mean": [], "std": []})
    segmenter = semantic.Segmenter(core.load_run_info(run), tile_size=256, batch_size=4)
    with image_io.open_image(root / "images" / "slide0.tif") as source:
        by_region = segmenter.segment(source)
    whole = segmenter.segment(image[..., None])
    np.testing.assert_array_equal(by_region, whole)
    assert _largest_read(region_reads) <= 256 * WIDTH < HEIGHT * WIDTH // 8  # one row of model tiles
    # the CLI: the image comes to the segmenter as a region source (whole reads fail in this test)
    region_reads.clear()
    out = tmp_path / "pred"
    assert inference.main(["--model", str(run), "--image_folder", str(root / "images"), "--output_folder", str(out),
                           "--tile_size", "256", "--save_overlay", "1"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out / "slide0.tif"), whole)
    assert region_reads and _largest_read(region_reads) <= 256 * WIDTH
