"""build_lmdb.py: tiling, split, instance/COCO input, bad input, killed builds, the real NIST data."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

import build_lmdb
from enki_seg.data import image_io
from enki_seg.data import records
from enki_seg.data import tiling
from enki_seg.data.writer import LmdbWriter
from conftest import ROOT, write_pairs

pytestmark = pytest.mark.filterwarnings(  # pycocotools under NumPy 2
    "ignore:__array__ implementation doesn't accept a copy keyword")


def run_build(tmp_path, images, masks=None, *extra, name="ds", out=None):
    out = out or tmp_path / "out"
    argv = ["--image_folder", str(images), "--output_folder", str(out), "--dataset_name", name,
            "--quiet", "--workers", "1", *extra]
    if masks is not None:
        argv += ["--mask_folder", str(masks)]
    return build_lmdb.main(argv), out


def read_all(path):
    with records.Database(path) as db:
        return db.metadata, [db.read(i) for i in range(len(db))]


def source_pixels(folder, name, tile):
    """The source pixels a record claims to come from."""
    image = image_io.read_image(Path(folder) / name)
    return image[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]


# ---------------------------------------------------------------- tiling


@pytest.mark.parametrize("height,width,tile,overlap", [
    (256, 256, 128, 0), (300, 517, 128, 0), (128, 128, 128, 0), (1000, 333, 256, 32), (257, 256, 64, 16),
])
def test_tiles_cover_every_pixel_without_duplicates(height, width, tile, overlap):
    grid = tiling.tile_grid(height, width, tile, overlap)
    assert len(grid) == len(set(grid)), "duplicate tile positions"
    covered = np.zeros((height, width), np.int32)
    for y, x in grid:
        assert 0 <= y <= height - tile and 0 <= x <= width - tile
        covered[y : y + tile, x : x + tile] += 1
    assert covered.min() >= 1


def test_nist_256_image_at_128_gives_four_distinct_tiles():
    # NIST writes 64 tiles (25 distinct keys) for this case
    assert tiling.tile_grid(256, 256, 128) == [(0, 0), (0, 128), (128, 0), (128, 128)]


# ---------------------------------------------------------------- round trip and split


@pytest.mark.parametrize("dtype,channels,compression", [
    (np.uint16, 1, "none"), (np.uint8, 3, "png"), (np.float32, 2, "zstd"), (np.int32, 1, "lz4"),
])
def test_build_round_trip_pixel_exact(tmp_path, dtype, channels, compression):
    images, masks = write_pairs(tmp_path / "src", count=5, size=80, channels=channels, dtype=dtype)
    rc, out = run_build(tmp_path, images, masks, "--use_tiling", "1", "--tile_size", "32",
                        "--tile_overlap", "8", "--compression", compression, "--train_fraction", "0.6")
    assert rc == 0
    seen = set()
    for split in ("train", "test"):
        meta, examples = read_all(out / f"{split}-ds.lmdb")
        assert meta.record_count == len(examples) == len(meta.sources)
        assert meta.channels == channels and meta.image_dtype == np.dtype(dtype).name
        assert meta.tile_size == 32 and meta.compression == compression and meta.split == split
        for index, (ex, src) in enumerate(zip(examples, meta.sources)):
            np.testing.assert_array_equal(ex.image, source_pixels(images, src.image, src))
            mask = image_io.read_labels(masks / src.mask)
            np.testing.assert_array_equal(ex.semantic_mask, mask[src.y : src.y + 32, src.x : src.x + 32])
            for class_id in np.unique(ex.semantic_mask):
                assert index in meta.class_records[int(class_id)]
            seen.add((split, src.image, src.y, src.x))
        # per-class index lists exactly the records that contain the class
        for class_id, indices in meta.class_records.items():
            expected = [i for i, ex in enumerate(examples) if (ex.semantic_mask == class_id).any()]
            assert indices == expected
    # 80 px at tile 32, overlap 8: starts 0, 24, 48 -> 9 tiles per image, 5 images
    assert len(seen) == 45


def test_split_is_reproducible_and_leak_free(tmp_path):
    images, masks = write_pairs(tmp_path / "src", count=12, size=32)
    manifests = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        rc, out = run_build(tmp_path, images, masks, "--seed", str(seed), out=tmp_path / run)
        assert rc == 0
        with open(out / "manifest-ds.csv") as f:
            rows = list(csv.DictReader(f))
        manifests[run] = {(r["split"], r["source_image"]) for r in rows}
        train = {img for split, img in manifests[run] if split == "train"}
        test = {img for split, img in manifests[run] if split == "test"}
        assert not train & test, "a source image is in both databases"
        assert len(train | test) == 12 and len(test) == 2  # round(0.8 * 12) = 10 train
    assert manifests["a"] == manifests["b"]
    assert manifests["a"] != manifests["c"]


def test_untiled_records_keep_whole_images_of_several_sizes(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i, size in enumerate((32, 48, 64, 40)):
        tifffile.imwrite(src / "images" / f"a{i}.tif", np.full((size, size + 1), i, np.uint16))
        tifffile.imwrite(src / "masks" / f"a{i}.tif", np.ones((size, size + 1), np.uint8))
    rc, out = run_build(tmp_path, src / "images", src / "masks", "--train_fraction", "0.5")
    assert rc == 0
    meta, examples = read_all(out / "train-ds.lmdb")
    assert meta.record_height is None and meta.tile_size is None
    for ex, s in zip(examples, meta.sources):
        assert ex.image.shape == (s.height, s.width, 1)


def test_multichannel_planar_tiff_and_stats(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    planes = []
    for i in range(3):
        planar = rng.integers(0, 4000, size=(3, 40, 40)).astype(np.uint16)
        planar[1] += 10000  # channel 1 much brighter
        planes.append(planar)
        tifffile.imwrite(src / "images" / f"p{i}.tif", planar, photometric="minisblack")  # (C, Y, X)
        imagecodecs.imwrite(str(src / "masks" / f"p{i}.png"), np.zeros((40, 40), np.uint8))
    rc, out = run_build(tmp_path, src / "images", src / "masks", "--train_fraction", "0.67")
    assert rc == 0
    meta, examples = read_all(out / "train-ds.lmdb")
    assert meta.channels == 3 and examples[0].image.shape == (40, 40, 3)
    used = [planes[int(s.image[1])] for s in meta.sources]
    pixels = np.concatenate([np.moveaxis(p, 0, -1).reshape(-1, 3) for p in used]).astype(np.float64)
    np.testing.assert_allclose(meta.channel_stats["mean"], pixels.mean(0))
    np.testing.assert_allclose(meta.channel_stats["std"], pixels.std(0), rtol=1e-9)


# ---------------------------------------------------------------- instances and COCO


def _instance_dataset(root: Path):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "instances").mkdir()
    for i in range(3):
        inst = np.zeros((64, 64), np.uint16)
        inst[4:20, 4:20] = 7           # class 1
        inst[20:30, 4:20] = 9          # touches object 7, class 2
        inst[40:60, 40:60] = 12 + i    # class 1, crossing the tile border at 32
        semantic = np.zeros((64, 64), np.uint8)
        semantic[inst == 7] = 1
        semantic[inst == 9] = 2
        semantic[inst >= 12] = 1
        semantic[5, 5] = 2  # one disagreeing pixel: the majority class still wins
        tifffile.imwrite(root / "images" / f"s{i}.tif", (inst * 100).astype(np.uint16))
        imagecodecs.imwrite(str(root / "masks" / f"s{i}.png"), semantic)
        tifffile.imwrite(root / "instances" / f"s{i}.tif", inst)
    return root


def test_instance_folder_records_hold_compact_ids_and_classes(tmp_path):
    root = _instance_dataset(tmp_path / "src")
    rc, out = run_build(tmp_path, root / "images", root / "masks", "--instance_folder",
                        str(root / "instances"), "--use_tiling", "1", "--tile_size", "32",
                        "--train_fraction", "0.67", "--number_classes", "3")
    assert rc == 0
    meta, examples = read_all(out / "train-ds.lmdb")
    assert meta.has_instances
    for ex, src in zip(examples, meta.sources):
        source = tifffile.imread(root / "instances" / src.instance)[src.y : src.y + 32, src.x : src.x + 32]
        ids = np.unique(source[source > 0])
        assert ex.instance_classes.shape == (ids.size,)
        assert sorted(np.unique(ex.instance_labels[ex.instance_labels > 0])) == list(range(1, ids.size + 1))
        for new_id, old_id in enumerate(ids, start=1):
            np.testing.assert_array_equal(ex.instance_labels == new_id, source == old_id)
            assert ex.instance_classes[new_id - 1] == (2 if old_id == 9 else 1)


def _rle_string(mask: np.ndarray) -> str:
    """pycocotools' compressed RLE string of a (H, W) bool mask (reference encoder for the test)."""
    flat = mask.T.ravel().astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_coco_polygons_and_rle_become_instances(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    blob = np.zeros((48, 48), bool)
    blob[30:40, 5:25] = True
    annotations, images = [], []
    for i in range(3):
        tifffile.imwrite(src / "images" / f"c{i}.tif", np.full((48, 48), i, np.uint16))
        images.append({"id": i + 1, "file_name": f"c{i}.tif", "height": 48, "width": 48})
        annotations += [
            {"id": 10 * i + 1, "image_id": i + 1, "category_id": 5, "iscrowd": 0,
             "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]},
            {"id": 10 * i + 2, "image_id": i + 1, "category_id": 9, "iscrowd": 0,
             "segmentation": {"size": [48, 48], "counts": _rle_string(blob)}},
            {"id": 10 * i + 3, "image_id": i + 1, "category_id": 9, "iscrowd": 0,
             "segmentation": {"size": [48, 48], "counts": [48 * 48]}},  # empty
            {"id": 10 * i + 4, "image_id": i + 1, "category_id": 77, "segmentation": [[1, 1, 2, 2, 3, 1]]},
            {"id": 10 * i + 5, "image_id": i + 1, "category_id": 5, "segmentation": [[1, 2, 3]]},
        ]
    coco_json = src / "coco.json"
    coco_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 5, "name": "cell"}, {"id": 9, "name": "debris"}]}))
    rc, out = run_build(tmp_path, src / "images", None, "--coco_json", str(coco_json),
                        "--train_fraction", "0.67")
    assert rc == 0
    meta, examples = read_all(out / "train-ds.lmdb")
    assert meta.class_names == {1: "cell", 2: "debris"}
    ex = examples[0]
    assert sorted(ex.instance_classes.tolist()) == [1, 2]
    debris_id = int(np.flatnonzero(ex.instance_classes == 2)[0]) + 1
    np.testing.assert_array_equal(ex.instance_labels == debris_id, blob)
    np.testing.assert_array_equal(ex.semantic_mask == 2, blob)
    assert (ex.semantic_mask == 1).sum() > 300
    warnings = (out / "warnings-ds.txt").read_text().splitlines()
    assert len(warnings) == 9  # 3 per image: empty RLE, unknown category, malformed polygon
    assert any("unknown category_id 77" in w for w in warnings)
    assert any("malformed" in w for w in warnings)


# ---------------------------------------------------------------- bad input


def _assert_failed_cleanly(rc, out, caplog, *needles):
    assert rc != 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    caplog.clear()
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.iterdir())}"


def test_bad_instance_without_a_class(tmp_path, caplog):
    """An object whose pixels are all background in the semantic mask has no class: say which one."""
    root = _instance_dataset(tmp_path / "src")
    inst = tifffile.imread(root / "instances" / "s1.tif")
    inst[0:3, 50:60] = 30  # drawn in the instance labels only
    tifffile.imwrite(root / "instances" / "s1.tif", inst)
    rc, out = run_build(tmp_path, root / "images", root / "masks", "--instance_folder", str(root / "instances"))
    _assert_failed_cleanly(rc, out, caplog, "s1.tif", "object 30", "entirely on background")


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "src", count=4, size=64)


def test_bad_size_mismatch(tmp_path, pairs, caplog):
    images, masks = pairs
    imagecodecs.imwrite(str(masks / "img002.png"), np.zeros((64, 60), np.uint8))
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img002.png", "same size")


def test_bad_image_without_mask(tmp_path, pairs, caplog):
    images, masks = pairs
    (masks / "img001.png").unlink()
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img001.tif", "no mask")


def test_bad_truncated_image(tmp_path, pairs, caplog):
    images, masks = pairs
    data = (images / "img003.tif").read_bytes()
    (images / "img003.tif").write_bytes(data[: len(data) // 3])
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img003.tif", "truncated")


def test_bad_unreadable_mask(tmp_path, pairs, caplog):
    images, masks = pairs
    (masks / "img000.png").write_bytes(b"not a png at all")
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img000.png", "cannot read")


def test_bad_negative_mask(tmp_path, pairs, caplog):
    images, masks = pairs
    (masks / "img002.png").unlink()
    tifffile.imwrite(masks / "img002.tif", np.full((64, 64), -1, np.int16))
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img002.tif", "negative")


def test_bad_non_integer_mask(tmp_path, pairs, caplog):
    images, masks = pairs
    (masks / "img002.png").unlink()
    tifffile.imwrite(masks / "img002.tif", np.full((64, 64), 0.5, np.float32))
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img002.tif", "non-integer")


def test_bad_label_beyond_number_classes(tmp_path, pairs, caplog):
    images, masks = pairs  # labels 0..2
    rc, out = run_build(tmp_path, images, masks, "--number_classes", "2")
    _assert_failed_cleanly(rc, out, caplog, "labels [2] >= --number_classes 2")


def test_bad_4d_image(tmp_path, pairs, caplog):
    images, masks = pairs
    tifffile.imwrite(images / "img001.tif", np.zeros((2, 3, 64, 64), np.uint16), photometric="minisblack")
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img001.tif", "4 dimensions")


def test_bad_empty_image(tmp_path, pairs, caplog):
    images, masks = pairs
    tifffile.imwrite(images / "img001.tif", np.zeros((0, 64), np.uint16))
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img001.tif")


def test_bad_nan_image(tmp_path, pairs, caplog):
    images, masks = pairs
    image = np.zeros((64, 64), np.float32)
    image[3, 4] = np.nan
    tifffile.imwrite(images / "img001.tif", image)
    rc, out = run_build(tmp_path, images, masks)
    _assert_failed_cleanly(rc, out, caplog, "img001.tif", "NaN")


def test_bad_empty_folder_and_wrong_format(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out = run_build(tmp_path, empty, empty)
    _assert_failed_cleanly(rc, out, caplog, "no .tif files", str(empty))
    images, masks = write_pairs(tmp_path / "src", count=3, size=32)
    rc, out = run_build(tmp_path, images, masks, "--image_format", "png")
    _assert_failed_cleanly(rc, out, caplog, "no .png files", "found extensions: .tif")


def test_bad_split_leaves_a_side_empty(tmp_path, caplog):
    images, masks = write_pairs(tmp_path / "src", count=3, size=32)
    rc, out = run_build(tmp_path, images, masks, "--train_fraction", "0.9")
    _assert_failed_cleanly(rc, out, caplog, "test database empty")
    rc, out = run_build(tmp_path, images, masks, "--train_fraction", "0.1")
    _assert_failed_cleanly(rc, out, caplog, "train database empty")


def test_bad_output_not_writable(tmp_path, pairs, caplog):
    images, masks = pairs
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _ = run_build(tmp_path, images, masks, out=blocker / "sub")
    _assert_failed_cleanly(rc, blocker / "sub", caplog, "cannot create output folder", "writable")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        rc, _ = run_build(tmp_path, images, masks, out=ro)
        _assert_failed_cleanly(rc, ro, caplog, "not writable")


def test_bad_tile_size_not_multiple(tmp_path, pairs, caplog):
    images, masks = pairs
    rc, out = run_build(tmp_path, images, masks, "--use_tiling", "1", "--tile_size", "40")
    _assert_failed_cleanly(rc, out, caplog, "--tile_size 40 is not a multiple of --size_multiple 16")


def test_bad_image_smaller_than_tile(tmp_path, pairs, caplog):
    images, masks = pairs
    tifffile.imwrite(images / "img002.tif", np.zeros((32, 64), np.uint16))
    imagecodecs.imwrite(str(masks / "img002.png"), np.zeros((32, 64), np.uint8))
    rc, out = run_build(tmp_path, images, masks, "--use_tiling", "1", "--tile_size", "48")
    _assert_failed_cleanly(rc, out, caplog, "img002.tif", "smaller than --tile_size 48")


def test_bad_mixed_dtypes(tmp_path, pairs, caplog):
    images, masks = pairs
    tifffile.imwrite(images / "img003.tif", np.zeros((64, 64), np.uint8))
    rc, out = run_build(tmp_path, images, masks, "--train_fraction", "0.5")
    assert rc != 0
    assert "share pixel type" in caplog.text


def test_existing_output_is_not_overwritten_without_flag(tmp_path, pairs, caplog):
    images, masks = pairs
    rc, out = run_build(tmp_path, images, masks)
    assert rc == 0
    before = (out / "manifest-ds.csv").read_text()
    rc, out = run_build(tmp_path, images, masks, "--seed", "9")
    assert rc == 2 and "--overwrite 1" in caplog.text
    assert (out / "manifest-ds.csv").read_text() == before
    rc, out = run_build(tmp_path, images, masks, "--seed", "9", "--overwrite", "1")
    assert rc == 0


def test_skip_bad_skips_and_lists(tmp_path, pairs, capsys):
    images, masks = write_pairs(tmp_path / "src", count=6, size=64)
    (masks / "img001.png").unlink()
    (images / "img004.tif").write_bytes(b"garbage")
    rc, out = run_build(tmp_path, images, masks, "--skip_bad", "1", "--train_fraction", "0.5")
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipped 2 bad input(s)" in captured.out
    assert "img001.tif" in captured.out and "img004.tif" in captured.out
    names = set()
    for split in ("train", "test"):
        meta, _ = read_all(out / f"{split}-ds.lmdb")
        names |= {s.image for s in meta.sources}
    assert names == {"img000.tif", "img002.tif", "img003.tif", "img005.tif"}


# ---------------------------------------------------------------- killed build


def test_sigkill_mid_build_leaves_nothing_that_looks_finished(tmp_path):
    images, masks = write_pairs(tmp_path / "src", count=40, size=512)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "build_lmdb.py"), "--image_folder", str(images), "--mask_folder",
           str(masks), "--output_folder", str(out), "--dataset_name", "k", "--workers", "1",
           "--use_tiling", "1", "--tile_size", "64", "--compression", "zstd", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        data_file = None
        while time.monotonic() < deadline and proc.poll() is None:
            tmp_dirs = list(out.glob(".build-k-*/train-k.lmdb/data.mdb")) if out.exists() else []
            if tmp_dirs and tmp_dirs[0].stat().st_size > 0:
                data_file = tmp_dirs[0]
                break
            time.sleep(0.005)
        assert proc.poll() is None, "build finished before it could be killed; make the input larger"
        assert data_file is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert visible == [], f"killed build left {visible}"
    # a rerun cleans the stale temporary folder and succeeds
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest-k.csv", "test-k.lmdb", "train-k.lmdb"]
    assert "did not finish" in result.stderr


def test_sigterm_cleans_up(tmp_path):
    images, masks = write_pairs(tmp_path / "src", count=40, size=512)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "build_lmdb.py"), "--image_folder", str(images), "--mask_folder",
           str(masks), "--output_folder", str(out), "--workers", "2", "--use_tiling", "1",
           "--tile_size", "64", "--compression", "zstd", "--quiet"]
    # the build pauses (test-only hook) after writing its records: the signal lands mid-build on any machine
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ENKI_TEST_PAUSE_BEFORE_METADATA": "60"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob("out/.build-*/train-*/data.mdb")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "interrupted" in err
    assert not out.exists(), "the output folder this build created should be gone"


def test_sigterm_is_not_swallowed_by_library_code(tmp_path, monkeypatch):
    """The signal can land inside library code that catches Exception (tqdm does while it starts its
    monitor thread, which once let a terminated build run on); the build must still stop, cleanly."""
    from enki_seg.data import build as build_module

    real_tqdm = build_module.tqdm

    def tqdm_hit_by_sigterm(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, inside the try
            time.sleep(1)
        except Exception:  # what tqdm does with any error while it starts its monitor
            pass
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(build_module, "tqdm", tqdm_hit_by_sigterm)
    images, masks = write_pairs(tmp_path / "src", count=4, size=64)
    out = tmp_path / "out"
    config = build_module.BuildConfig(image_folder=str(images), mask_folder=str(masks),
                                      output_folder=str(out), workers=1, quiet=1)
    with pytest.raises(build_module.Interrupted):
        build_module.build(config)
    assert not out.exists(), "the output folder this build created should be gone"
    assert signal.getsignal(signal.SIGTERM) is not build_module._raise_interrupted


# ---------------------------------------------------------------- real data


def test_real_nist_data_tiled_round_trip(tmp_path, nist_hes):
    rc, out = run_build(tmp_path, nist_hes / "images", nist_hes / "masks", "--use_tiling", "1",
                        "--tile_size", "128", "--number_classes", "2", name="hes")
    assert rc == 0
    total = 0
    sources = set()
    for split in ("train", "test"):
        meta, examples = read_all(out / f"{split}-hes.lmdb")
        assert meta.image_dtype == "uint16" and meta.channels == 1 and meta.class_ids == [0, 1]
        for ex, src in zip(examples, meta.sources):
            image = tifffile.imread(nist_hes / "images" / src.image)
            mask = tifffile.imread(nist_hes / "masks" / src.mask)
            window = (slice(src.y, src.y + 128), slice(src.x, src.x + 128))
            np.testing.assert_array_equal(ex.image[:, :, 0], image[window])
            np.testing.assert_array_equal(ex.semantic_mask, mask[window])
            sources.add(src.image)
        total += len(examples)
    assert total == 400 and len(sources) == 100  # 4 distinct tiles per 256x256 image


def test_map_grows_when_the_estimate_is_too_small(tmp_path, monkeypatch):
    images, masks = write_pairs(tmp_path / "src", count=4, size=512)  # ~1.5 MB per split
    grown = []
    original = LmdbWriter.flush

    def tiny_start(self):
        if not grown and self.map_size > (1 << 20):
            self.map_size = 1 << 20  # 1 MB: too small for the split
            self.env.set_mapsize(self.map_size)
        before = self.map_size
        original(self)
        grown.append(self.map_size > before)

    monkeypatch.setattr(LmdbWriter, "flush", tiny_start)
    rc, out = run_build(tmp_path, images, masks, "--train_fraction", "0.5")
    assert rc == 0 and any(grown)
    meta, examples = read_all(out / "train-ds.lmdb")
    assert len(examples) == 2


def test_jpg_and_png_images(tmp_path):
    for ext in (".jpg", ".png"):
        images, masks = write_pairs(tmp_path / ext[1:], count=3, size=32, dtype=np.uint8, channels=3,
                                    image_ext=ext)
        rc, out = run_build(tmp_path, images, masks, "--image_format", ext[1:], "--train_fraction", "0.67",
                            out=tmp_path / f"out{ext}")
        assert rc == 0
        meta, examples = read_all(out / "train-ds.lmdb")
        assert meta.channels == 3 and examples[0].image.dtype == np.uint8
        if ext == ".png":  # lossless: pixel exact
            np.testing.assert_array_equal(examples[0].image, image_io.read_image(images / meta.sources[0].image))


# ---------------------------------------------------------------- worker pool


def test_worker_pool_starts_clean_processes_and_matches_one_process(tmp_path, monkeypatch):
    """Workers are not plain-forked from a parent that may hold threads (the reader's rule), and the CPU
    count works without os.sched_getaffinity (macOS); a 2-worker build equals a 1-worker build."""
    from enki_seg.data import build as build_module

    pool = build_module._worker_pool(2, 4)
    try:
        assert pool._ctx.get_start_method() in ("forkserver", "spawn")
    finally:
        pool.terminate()
        pool.join()
    images, masks = write_pairs(tmp_path / "src", count=4, size=64)
    built = {}
    for workers in ("1", "2"):
        argv = ["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                str(tmp_path / f"out{workers}"), "--quiet", "--workers", workers]
        assert build_lmdb.main(argv) == 0
        built[workers] = [read_all(tmp_path / f"out{workers}" / f"{s}-dataset.lmdb") for s in ("train", "test")]
    for (meta1, ex1), (meta2, ex2) in zip(built["1"], built["2"]):
        assert meta1.sources == meta2.sources
        for a, b in zip(ex1, ex2):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.semantic_mask, b.semantic_mask)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert build_module.default_workers() == min(8, os.cpu_count())


# ---------------------------------------------------------------- masks exported as 0/255


def _binary_255_pairs(folder):
    images, masks = write_pairs(folder, count=4, size=64, classes=2)
    for path in masks.iterdir():
        path.write_bytes(imagecodecs.png_encode((imagecodecs.imread(path) * 255).astype(np.uint8)))
    return images, masks


def test_masks_exported_as_0_255_are_named_and_mapped_by_label_map(tmp_path, caplog):
    images, masks = _binary_255_pairs(tmp_path / "src")
    rc, out = run_build(tmp_path, images, masks, out=tmp_path / "plain")
    assert rc == 0 and "looks like" not in caplog.text
    assert "holds only the values 0 and 255" in caplog.text and "--label_map 255=1" in caplog.text
    rc, out = run_build(tmp_path, images, masks, "--number_classes", "2", out=tmp_path / "checked")
    _assert_failed_cleanly(rc, out, caplog, "0/255 binary export: pass --label_map 255=1")
    caplog.clear()
    rc, out = run_build(tmp_path, images, masks, "--label_map", "255=1", "--number_classes", "2",
                        out=tmp_path / "mapped")
    assert rc == 0 and "0 and 255" not in caplog.text
    meta, examples = read_all(out / "train-ds.lmdb")
    assert meta.class_ids == [0, 1] and meta.build_args["label_map"] == "255=1"
    for example, tile in zip(examples, meta.sources):
        source = imagecodecs.imread(masks / tile.mask)
        np.testing.assert_array_equal(example.semantic_mask, source // 255)


@pytest.mark.parametrize("text,message", [("255", "is not VALUE=CLASS"), ("255=1,255=2", "mapped twice"),
                                          (",", "maps nothing"), ("3=-1", ">= 0")])
def test_bad_label_map(tmp_path, pairs, caplog, text, message):
    images, masks = pairs
    rc, out = run_build(tmp_path, images, masks, "--label_map", text)
    _assert_failed_cleanly(rc, out, caplog, message)


def test_label_map_keeps_unlisted_values_and_widens_only_when_needed():
    from enki_seg.data.convert import apply_label_map

    mask = np.array([[0, 255, 7], [255, 0, 7]], np.uint8)
    np.testing.assert_array_equal(apply_label_map(mask, {255: 1}), [[0, 1, 7], [1, 0, 7]])
    assert apply_label_map(mask, {255: 1}).dtype == np.uint8
    assert apply_label_map(mask, {7: 300}).dtype == np.int32
    np.testing.assert_array_equal(apply_label_map(mask.astype(np.int32), {255: 1, 7: 2}), [[0, 1, 2], [1, 0, 2]])


def test_trainer_class_count_error_names_the_label_map_fix(tmp_path):
    from enki_seg.training.config import BaseTrainConfig, check_databases
    from enki_seg.training.errors import TrainError

    images, masks = _binary_255_pairs(tmp_path / "src")
    rc, out = run_build(tmp_path, images, masks)
    assert rc == 0
    config = BaseTrainConfig(train_database=str(out / "train-ds.lmdb"), test_database=str(out / "test-ds.lmdb"),
                             number_classes=2)
    with pytest.raises(TrainError, match=r"\[0, 255\].*0/255 binary export.*--label_map 255=1"):
        check_databases(config)
