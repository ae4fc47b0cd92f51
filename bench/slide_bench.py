"""Benchmark: a whole slide (40,000 x 40,000 x 3 uint16 OME-TIFF) built into LMDB and segmented tile by tile.

    python bench/slide_bench.py [--side 40000] [--inmemory_side 4096] [--tile 512] [--batch_size 4]

1. A synthetic tiled (512 x 512), zlib-compressed BigTIFF OME-TIFF of ``--side`` x ``--side`` x 3 uint16
   (9.6 GB uncompressed at 40,000) is written tile by tile (:func:`write_slide`: the generator holds one
   tile), with its mask (bright disks on a noisy background; disk = class 1). The slide of any side is
   the top-left corner of the 40,000 px one.
2. ``build_lmdb.py --use_tiling 1 --workers 1`` tiles it (plus a small companion image: a split needs
   two sources) and ``inference.py`` segments it with a small random UNet (depth 2, 4 filters, tile
   ``--tile``; ~3.8 MP/s on 2 CPU cores: ~7 min for 1,600 MP; throughput and memory do not depend on
   what a model learned), each in a subprocess;
   peak memory is the largest resident set of the process tree (``/proc`` polled every 0.2 s, summed
   over the process and its children) and the child's ``ru_maxrss`` from ``os.wait4`` (target < 2 GB each).
3. ``inference.py --num_blocks 4 --block_index I`` (I = 0..3, one after the other) then
   ``--assemble 1``: the assembled labels must equal the one-process labels, compared band by band
   (skipped, ``blocks_equal_single`` null, when inference.py has no such flags).
4. In this process, on the top-left ``--inmemory_side`` square written as its own tiled TIFF (read by
   region): the builder and the segmenter reading it tile by tile against the same work on the same
   pixels already decoded and held in memory (target >= 0.9), interleaved pairs, median ratio.

Time at 40,000 on 2 quiet CPU cores: roughly 25-30 min (writing ~5, build ~5, inference ~7, the four
blocks ~7, the in-memory comparisons ~2); ``--side 8192`` takes ~5 min. Disk: the slide (~6.5 GB at
40,000), the databases (~11 GB of uncompressed records, removed once measured) and the outputs, in
``--work`` (default: a temporary folder, removed at the end). Last line: one JSON object
(``build_peak_rss_gb``, ``inference_peak_rss_gb``, ``build_tilewise_vs_inmemory``,
``inference_tilewise_vs_inmemory``, ``blocks_equal_single``, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Slide tiles (and OME-TIFF chunks) of this side; the disks are drawn in cells of CELL px that divide it.
SLIDE_TILE = 512
CELL = 64
CHANNELS = 3
NUM_CLASSES = 2


# ----------------------------------------------------------------------------- the synthetic slide

class SlidePattern:
    """Pixels of a synthetic slide, tile by tile, the same for every slide size (a top-left crop).

    One disk per CELL x CELL cell (present with probability 0.6, radius 6..22 px, centre within 8 px
    of the cell centre, so a disk never leaves its cell and never crosses a tile), each channel of a
    disk a random brightness; background ~1,000 plus uniform noise of 0..255. Disks and noise of a tile
    are drawn from the tile's own seed, so a tile is the same in a slide of any size.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        local = np.arange(SLIDE_TILE, dtype=np.float32) % CELL
        self._local_y, self._local_x = local[:, None], local[None, :]

    def _disks(self, ty: int, tx: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile (ty, tx)'s (S, S) bool disks and (S, S, 3) float32 brightness, from the tile's own seed."""
        cells = SLIDE_TILE // CELL
        rng = np.random.default_rng([self.seed, 1, ty, tx])
        present = rng.random((cells, cells)) < 0.6
        centre_y, centre_x = CELL / 2 + rng.uniform(-8, 8, (2, cells, cells))
        radius = rng.uniform(6, 22, (cells, cells))
        brightness = rng.uniform(6000, 30000, (cells, cells, CHANNELS))

        def per_pixel(array):
            return np.repeat(np.repeat(array.astype(np.float32), CELL, axis=0), CELL, axis=1)

        dy, dx = self._local_y - per_pixel(centre_y), self._local_x - per_pixel(centre_x)
        inside = (dy * dy + dx * dx < per_pixel(radius) ** 2) & per_pixel(present).astype(bool)
        return inside, per_pixel(brightness)

    def image_tile(self, ty: int, tx: int) -> np.ndarray:
        """(SLIDE_TILE, SLIDE_TILE, 3) uint16 pixels of tile (ty, tx) (tile row, tile column)."""
        rng = np.random.default_rng([self.seed, 2, ty, tx])
        tile = rng.integers(1000, 1256, (SLIDE_TILE, SLIDE_TILE, CHANNELS), dtype=np.uint16)
        inside, brightness = self._disks(ty, tx)
        tile[inside] += brightness[inside].astype(np.uint16)
        return tile

    def mask_tile(self, ty: int, tx: int) -> np.ndarray:
        """(SLIDE_TILE, SLIDE_TILE) uint8 class ids of tile (ty, tx): 1 in disks, 0 elsewhere."""
        return self._disks(ty, tx)[0].astype(np.uint8)

    def region(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-left (height, width, 3) uint16 image and (height, width) uint8 mask, in memory."""
        rows, cols = -(-height // SLIDE_TILE), -(-width // SLIDE_TILE)
        image = np.concatenate([np.concatenate([self.image_tile(ty, tx) for tx in range(cols)], axis=1)
                                for ty in range(rows)], axis=0)
        mask = np.concatenate([np.concatenate([self.mask_tile(ty, tx) for tx in range(cols)], axis=1)
                               for ty in range(rows)], axis=0)
        return image[:height, :width], mask[:height, :width]


def write_slide(image_path: Path, mask_path: Path | None, side: int, seed: int = 0, workers: int = 2) -> None:
    """Write the ``side`` x ``side`` slide as a tiled (512), zlib BigTIFF OME-TIFF (YXS, RGB uint16) and its
    mask as a tiled uint8 TIFF, tile by tile: memory stays at a few tiles whatever the side."""
    import tifffile

    pattern = SlidePattern(seed)
    count = -(-side // SLIDE_TILE)

    def tiles(make):
        for ty in range(count):
            for tx in range(count):
                yield make(ty, tx)

    common = dict(tile=(SLIDE_TILE, SLIDE_TILE), compression="zlib", compressionargs={"level": 1},
                  maxworkers=workers)
    with tifffile.TiffWriter(image_path, bigtiff=True, ome=True) as tif:
        tif.write(tiles(pattern.image_tile), shape=(side, side, CHANNELS), dtype=np.uint16, photometric="rgb",
                  metadata={"axes": "YXS"}, **common)
    if mask_path is not None:
        with tifffile.TiffWriter(mask_path, bigtiff=True) as tif:
            tif.write(tiles(pattern.mask_tile), shape=(side, side), dtype=np.uint8, photometric="minisblack",
                      **common)


# ----------------------------------------------------------------------------- the model

def write_run(folder: Path, tile: int, depth: int = 2, base_filters: int = 4) -> Path:
    """A run folder (model.keras + config.json shaped like train_unet's) of a small random 3-channel UNet."""
    import keras

    import models

    keras.utils.set_random_seed(0)
    model = models.build_model("unet", input_channels=CHANNELS, num_classes=NUM_CLASSES, depth=depth,
                               base_filters=base_filters, dropout=0.0)
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    config = {
        "model": {"name": "unet", "config": model.get_config(), "size_multiple": model.size_multiple},
        "classes": {"number_classes": NUM_CLASSES, "names": {}},
        "input": {"channels": CHANNELS, "dtype": "uint16", "tile_size": tile, "record_height": tile,
                  "record_width": tile},
        "normalization": {"method": "zscore", "mean": [], "std": []},
        "augmentation": None, "data": {}, "train": {}, "versions": {},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


# ----------------------------------------------------------------------------- measuring a process

def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def measured_run(command: list[str], log: Path, poll_s: float = 0.2) -> dict:
    """Run ``command`` (cwd: the repository); returns exit code, seconds and peak memory in GB:
    ``tree_peak_gb`` (largest sum of the resident sets of the process and its children, polled) and
    ``maxrss_gb`` (``ru_maxrss`` of ``os.wait4``: the largest single process, page cache not counted).

    The command is started by a small Python wrapper that waits for it and reports its ``ru_maxrss``:
    a child forked from this process (large once TensorFlow is imported) counts this process's
    resident pages until it execs, which inflated ``ru_maxrss`` to this process's size."""
    started = time.perf_counter()
    peak = [0]
    maxrss_file = Path(str(log) + ".maxrss")
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(maxrss_file), *command], stdout=handle,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], sum(_rss_bytes(p) for p in _descendants(process.pid)))
                done.wait(poll_s)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    try:
        maxrss_kb = int(maxrss_file.read_text())
        maxrss_file.unlink()
    except (OSError, ValueError):
        maxrss_kb = usage.ru_maxrss
    return {"code": process.returncode, "seconds": time.perf_counter() - started,
            "tree_peak_gb": peak[0] / 1e9, "maxrss_gb": maxrss_kb * 1024 / 1e9}


#: Runs argv[2:] and writes its ru_maxrss (KB) to argv[1]; exits with its code (see measured_run).
_WRAPPER = ("import os, subprocess, sys\n"
            "child = subprocess.Popen(sys.argv[2:])\n"
            "_, status, usage = os.wait4(child.pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def _check(result: dict, log: Path, what: str) -> None:
    if result["code"] != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed with exit code {result['code']} (log: {log})")


def peak_gb(result: dict) -> float:
    return max(result["tree_peak_gb"], result["maxrss_gb"])


# ----------------------------------------------------------------------------- tile-wise vs in memory

def _interleaved_ratio(tilewise, inmemory, pairs: int) -> tuple[float, float, float]:
    """Median over ``pairs`` of (in-memory seconds / tile-wise seconds), and the best seconds of each
    (one untimed warm-up call of each first)."""
    tilewise()
    inmemory()
    ratios, best_t, best_m = [], float("inf"), float("inf")
    for _ in range(pairs):
        start = time.perf_counter()
        tilewise()
        t = time.perf_counter() - start
        start = time.perf_counter()
        inmemory()
        m = time.perf_counter() - start
        ratios.append(m / t)
        best_t, best_m = min(best_t, t), min(best_m, m)
    return statistics.median(ratios), best_t, best_m


def build_ratio(work: Path, pairs: int = 5) -> dict:
    """The builder tiling a region-read TIFF against the same sources decoded and held in memory."""
    from unittest import mock

    from enki_seg.data import image_io
    from enki_seg.data.build import BuildConfig, build

    images, masks = work / "images", work / "masks"
    held = {}
    for path in sorted(images.iterdir()):
        with image_io.open_image(path) as source:
            held[path.name] = (source.tile_wise, source.read())
    held_masks = {p.name: image_io.read_labels(p) for p in sorted(masks.iterdir())}
    assert held["crop.tif"][0], "the crop must be read by region"

    def run(name):
        return build(BuildConfig(image_folder=str(images), mask_folder=str(masks), output_folder=str(work / name),
                                 dataset_name="crop", use_tiling=1, tile_size=SLIDE_TILE, tile_overlap=0,
                                 train_fraction=0.5, workers=1, quiet=True, overwrite=1))

    def in_memory():
        open_held = lambda path: image_io.ArraySource(held[Path(path).name][1], Path(path))  # noqa: E731
        read_held = lambda path, what="mask": held_masks[Path(path).name]  # noqa: E731
        with mock.patch.object(image_io, "open_image", open_held), \
                mock.patch.object(image_io, "read_labels", read_held):
            run("inmemory")

    ratio, tilewise_s, inmemory_s = _interleaved_ratio(lambda: run("tilewise"), in_memory, pairs)
    pixels = sum(array.shape[0] * array.shape[1] for _, array in held.values())
    return {"ratio": ratio, "tilewise_mp_s": pixels / tilewise_s / 1e6, "inmemory_mp_s": pixels / inmemory_s / 1e6}


def inference_ratio(run: Path, crop: Path, tile: int, batch_size: int, pairs: int = 5) -> dict:
    """The segmenter reading a region-read TIFF tile by tile against the same pixels held in memory."""
    from enki_seg.data import image_io
    from enki_seg.inference import core, semantic

    segmenter = semantic.Segmenter(core.load_run_info(run), tile_size=tile, batch_size=batch_size)
    with image_io.open_image(crop) as source:
        assert source.tile_wise, "the crop must be read by region"
        image = source.read()

    def tilewise():
        with image_io.open_image(crop) as source:
            return segmenter.segment(source)

    np.testing.assert_array_equal(tilewise(), segmenter.segment(image))
    ratio, tilewise_s, inmemory_s = _interleaved_ratio(tilewise, lambda: segmenter.segment(image), pairs)
    pixels = image.shape[0] * image.shape[1]
    return {"ratio": ratio, "tilewise_mp_s": pixels / tilewise_s / 1e6, "inmemory_mp_s": pixels / inmemory_s / 1e6}


# ----------------------------------------------------------------------------- the 4-block array run

def blocks_supported() -> bool:
    """Whether inference.py has the array-job flags (--num_blocks, --block_index, --assemble)."""
    text = (ROOT / "inference.py").read_text()
    return all(flag in text for flag in ('"--num_blocks"', '"--block_index"', '"--assemble"'))


def labels_equal(a: Path, b: Path, rows: int = 2048) -> bool:
    """Whether two (possibly huge) single-plane TIFFs hold the same level-0 pixels, compared band by band."""
    import tifffile
    import zarr

    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        if ta.series[0].shape != tb.series[0].shape or ta.series[0].dtype != tb.series[0].dtype:
            return False
        za = zarr.open_array(ta.series[0].aszarr(level=0), mode="r")
        zb = zarr.open_array(tb.series[0].aszarr(level=0), mode="r")
        return all(np.array_equal(za[y : y + rows], zb[y : y + rows]) for y in range(0, za.shape[0], rows))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=40_000, help="slide side in pixels (default 40000)")
    p.add_argument("--inmemory_side", type=int, default=4096,
                   help="side of the square compared tile-wise vs in memory (default 4096: at least 4096, "
                   "so that it is read by region)")
    p.add_argument("--tile", type=int, default=512, help="builder and model tile (default 512)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--depth", type=int, default=2, help="UNet depth (default 2)")
    p.add_argument("--base_filters", type=int, default=4, help="UNet filters of the first level (default 4)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved pairs per throughput ratio (default 5)")
    p.add_argument("--work", help="work folder (kept); default: a temporary folder, removed at the end")
    args = p.parse_args(argv)
    if args.inmemory_side * args.inmemory_side < 1 << 24:
        p.error("--inmemory_side must be at least 4096 (smaller images are read whole)")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slide-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    result: dict = {"side": args.side, "tile": args.tile, "batch_size": args.batch_size,
                    "unet_depth": args.depth, "unet_base_filters": args.base_filters}
    try:
        # 1. the slide, its mask, a companion image for the test split, the model
        for sub in ("slide", "build/images", "build/masks", "crop/images", "crop/masks"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_slide(work / "slide" / "slide.tif", work / "build" / "masks" / "slide.tif", args.side)
        result["write_seconds"] = round(time.perf_counter() - start, 1)
        result["slide_file_gb"] = round((work / "slide" / "slide.tif").stat().st_size / 1e9, 3)
        os.symlink(work / "slide" / "slide.tif", work / "build" / "images" / "slide.tif")
        companion = 1024  # read whole: its memory does not matter
        write_slide(work / "build" / "images" / "companion.tif", work / "build" / "masks" / "companion.tif",
                    companion, seed=1)
        print(f"slide {args.side}x{args.side}x{CHANNELS} uint16 written in {result['write_seconds']} s "
              f"({result['slide_file_gb']} GB)", flush=True)
        run = write_run(work / "run", args.tile, args.depth, args.base_filters)

        # 2. build and inference of the slide in subprocesses
        build = measured_run([python, "build_lmdb.py", "--image_folder", str(work / "build" / "images"),
                              "--mask_folder", str(work / "build" / "masks"), "--output_folder", str(work / "lmdb"),
                              "--dataset_name", "slide", "--use_tiling", "1", "--tile_size", str(args.tile),
                              "--tile_overlap", "0", "--train_fraction", "0.5", "--workers", "1", "--quiet"],
                             work / "build.log")
        _check(build, work / "build.log", "build_lmdb.py")
        shutil.rmtree(work / "lmdb", ignore_errors=True)  # ~9.6 GB at 40,000: free the disk
        print(f"build: {build['seconds']:.0f} s, peak RSS {peak_gb(build):.2f} GB", flush=True)
        infer_args = ["--model", str(run), "--image_folder", str(work / "slide"), "--tile_size", str(args.tile),
                      "--batch_size", str(args.batch_size)]
        single = measured_run([python, "inference.py", *infer_args, "--output_folder", str(work / "single")],
                              work / "inference.log")
        _check(single, work / "inference.log", "inference.py")
        megapixels = args.side * args.side / 1e6
        print(f"inference: {single['seconds']:.0f} s ({megapixels / single['seconds']:.2f} MP/s), "
              f"peak RSS {peak_gb(single):.2f} GB", flush=True)
        result.update({
            "build_peak_rss_gb": round(peak_gb(build), 3), "build_maxrss_gb": round(build["maxrss_gb"], 3),
            "build_seconds": round(build["seconds"], 1), "build_mp_s": round(megapixels / build["seconds"], 2),
            "inference_peak_rss_gb": round(peak_gb(single), 3),
            "inference_maxrss_gb": round(single["maxrss_gb"], 3),
            "inference_seconds": round(single["seconds"], 1),
            "inference_mp_s": round(megapixels / single["seconds"], 2),
        })

        # 3. the 4-block array run
        if blocks_supported():
            blocks = []
            for index in range(4):
                blocks.append(measured_run([python, "inference.py", *infer_args, "--output_folder",
                                            str(work / "blocks"), "--num_blocks", "4", "--block_index", str(index)],
                                           work / f"block{index}.log"))
                _check(blocks[-1], work / f"block{index}.log", f"inference.py --block_index {index}")
            blocks.append(measured_run([python, "inference.py", *infer_args, "--output_folder", str(work / "blocks"),
                                        "--num_blocks", "4", "--assemble", "1"], work / "assemble.log"))
            _check(blocks[-1], work / "assemble.log", "inference.py --assemble 1")
            result["blocks_equal_single"] = labels_equal(work / "single" / "slide.tif", work / "blocks" / "slide.tif")
            result["blocks_peak_rss_gb"] = round(max(peak_gb(b) for b in blocks), 3)
            result["blocks_seconds"] = round(sum(b["seconds"] for b in blocks), 1)
            print(f"4 blocks + assembly: {result['blocks_seconds']:.0f} s, equal to one process: "
                  f"{result['blocks_equal_single']}", flush=True)
        else:
            result["blocks_equal_single"] = None
            result["blocks_note"] = "inference.py has no --num_blocks/--block_index/--assemble yet"
            print("4-block run skipped:", result["blocks_note"], flush=True)
        shutil.rmtree(work / "single", ignore_errors=True)
        shutil.rmtree(work / "blocks", ignore_errors=True)

        # 4. tile-wise vs in memory on the top-left square
        side = args.inmemory_side
        write_slide(work / "crop" / "images" / "crop.tif", work / "crop" / "masks" / "crop.tif", side)
        write_slide(work / "crop" / "images" / "companion.tif", work / "crop" / "masks" / "companion.tif",
                    companion, seed=1)
        built = build_ratio(work / "crop", args.pairs)
        print(f"build {side}x{side}: tile-wise {built['tilewise_mp_s']:.1f} MP/s, in memory "
              f"{built['inmemory_mp_s']:.1f} MP/s: ratio {built['ratio']:.3f}", flush=True)
        segmented = inference_ratio(run, work / "crop" / "images" / "crop.tif", args.tile, args.batch_size, args.pairs)
        print(f"inference {side}x{side}: tile-wise {segmented['tilewise_mp_s']:.2f} MP/s, in memory "
              f"{segmented['inmemory_mp_s']:.2f} MP/s: ratio {segmented['ratio']:.3f}", flush=True)
        result.update({
            "build_tilewise_vs_inmemory": round(built["ratio"], 3),
            "inference_tilewise_vs_inmemory": round(segmented["ratio"], 3),
            "inmemory_side": side,
            "build_crop_tilewise_mp_s": round(built["tilewise_mp_s"], 2),
            "build_crop_inmemory_mp_s": round(built["inmemory_mp_s"], 2),
            "inference_crop_tilewise_mp_s": round(segmented["tilewise_mp_s"], 3),
            "inference_crop_inmemory_mp_s": round(segmented["inmemory_mp_s"], 3),
        })
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
