"""Benchmark: inference.py's peak memory on a 10,000 x 10,000 image, and tiled vs bare-model throughput.

    python bench/inference_bench.py [--side 10000] [--small_side 2048] [--tile 256] [--batch_size 8]

A tiny UNet (depth 2, 8 base filters, 2 classes, z-score; random weights: throughput and memory do not
depend on what a model has learned) is saved as a run folder. Then:

1. ``inference.py`` runs in a subprocess on one synthetic ``--side`` x ``--side`` uint16 TIFF with every
   output on (mask, overlay, float16 probabilities, evaluation against a ground-truth mask); its peak
   resident memory is the child's ``ru_maxrss`` from ``os.wait4`` (= VmHWM, page cache not counted).
   About 2,300 tiles of 256: a few minutes on 2 CPU cores.
2. In this process, tiles/s of ``Segmenter.segment`` on a ``--small_side`` image (normalization,
   reflection, batching, stitching; no file I/O) against the model alone called on the same
   normalized batches, made beforehand (best of 3 each, interleaved).

Last line: one JSON object (``peak_rss_gb_10k``, ``tiled_vs_model_throughput``, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_CLASSES = 2


def write_run(folder: Path, tile: int) -> Path:
    """A run folder (model.keras + config.json shaped like train_unet's) for a tiny random UNet."""
    import keras

    import models

    keras.utils.set_random_seed(0)
    model = models.build_model("unet", input_channels=1, num_classes=NUM_CLASSES, depth=2, base_filters=8,
                               dropout=0.0)
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    config = {
        "model": {"name": "unet", "config": model.get_config(), "size_multiple": model.size_multiple},
        "classes": {"number_classes": NUM_CLASSES, "names": {}},
        "input": {"channels": 1, "dtype": "uint16", "tile_size": tile, "record_height": tile, "record_width": tile},
        "normalization": {"method": "zscore", "mean": [], "std": []},
        "augmentation": None, "data": {}, "train": {}, "versions": {},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W) uint16: a 512 x 512 patch of bright blobs on a textured background, repeated, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512]
    patch = 8000 + 1500 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    for _ in range(60):
        cy, cx, r = rng.uniform(0, 512, 2).tolist() + [rng.uniform(5, 15)]
        patch += 20000 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    reps = (-(-height // 512), -(-width // 512))
    image = np.empty((height, width), np.uint16)
    for start in range(0, height, 512):  # row strips: the parent never holds a float copy of the image
        rows = min(512, height - start)
        strip = np.tile(patch[:rows], (1, reps[1]))[:, :width] + rng.normal(0, 400, (rows, width))
        image[start : start + rows] = np.clip(strip, 0, 65535)
    return image


def peak_rss_run(command: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``command``; returns (exit code, peak RSS in GB, wall seconds)."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024**2, time.perf_counter() - started


def throughput(run: Path, side: int, batch_size: int, repeats: int = 3) -> dict:
    from enki_seg.inference import core, semantic

    segmenter = semantic.Segmenter(core.load_run_info(run), batch_size=batch_size)
    image = synthetic_image(side, side, seed=1)[:, :, None]
    tiles = segmenter.plan(side, side)
    # the very batches segment() feeds the model, made beforehand: the model alone sees identical input
    batches = [batch.copy() for _, _, batch in core.normalized_batches(
        image, tiles, segmenter.normalization.for_image(image), segmenter.batch_size)]
    segmenter.segment(image)  # trace and warm up
    segmenter.predict_tiles(batches[0], "labels")
    tiled_best = model_best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter.segment(image)
        tiled_best = min(tiled_best, time.perf_counter() - start)
        start = time.perf_counter()
        for batch in batches:
            segmenter.predict_tiles(batch, "labels")
        model_best = min(model_best, time.perf_counter() - start)
    return {"tiles": len(tiles), "tile": segmenter.tile_size, "margin": segmenter.margin,
            "tiled_tiles_s": len(tiles) / tiled_best, "model_tiles_s": len(tiles) / model_best,
            "tiled_mp_s": side * side / tiled_best / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=10_000, help="side of the large image (default 10000)")
    p.add_argument("--small_side", type=int, default=2048, help="side of the throughput image (default 2048)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--keep", help="keep the work folder here instead of a temporary one")
    args = p.parse_args(argv)
    import imagecodecs
    import tifffile

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="inference-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run = write_run(work / "run", args.tile)
        (work / "images").mkdir()
        (work / "masks").mkdir()
        image = synthetic_image(args.side, args.side)
        tifffile.imwrite(work / "images" / "large.tif", image)
        imagecodecs.imwrite(str(work / "masks" / "large.png"), (image > 20000).astype(np.uint8))
        del image
        command = [sys.executable, str(ROOT / "inference.py"), "--model", str(run), "--image_folder",
                   str(work / "images"), "--output_folder", str(work / "out"), "--mask_folder", str(work / "masks"),
                   "--save_overlay", "1", "--save_probabilities", "1", "--batch_size", str(args.batch_size)]
        code, peak_gb, seconds = peak_rss_run(command, work / "large.log")
        log = (work / "large.log").read_text()
        if code != 0:
            print(log[-3000:], file=sys.stderr)
            raise SystemExit(f"inference on the {args.side}x{args.side} image failed with exit code {code}")
        with tifffile.TiffFile(work / "out" / "large.tif") as tif:
            assert tif.series[0].shape == (args.side, args.side) and tif.series[0].dtype == np.uint8
        print(f"{args.side}x{args.side} uint16, all outputs: peak RSS {peak_gb:.2f} GB, {seconds:.0f} s "
              f"(process start, TF import and model load included)")
        sizes = {str(p.relative_to(work / "out")): p.stat().st_size for p in (work / "out").rglob("*") if p.is_file()}
        print("outputs:", ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items())))

        speed = throughput(run, args.small_side, args.batch_size)
        ratio = speed["tiled_tiles_s"] / speed["model_tiles_s"]
        print(f"{args.small_side}x{args.small_side}: {speed['tiles']} tiles of {speed['tile']} (margin "
              f"{speed['margin']}): tiled {speed['tiled_tiles_s']:.1f} tiles/s ({speed['tiled_mp_s']:.2f} MP/s), "
              f"model alone {speed['model_tiles_s']:.1f} tiles/s: ratio {ratio:.3f}")
        result = {"peak_rss_gb_10k": round(peak_gb, 3), "seconds_10k": round(seconds, 1),
                  "tiled_vs_model_throughput": round(ratio, 3),
                  "tiled_tiles_s": round(speed["tiled_tiles_s"], 2), "model_tiles_s": round(speed["model_tiles_s"], 2),
                  "tiled_mp_s": round(speed["tiled_mp_s"], 3), "tile": speed["tile"], "margin": speed["margin"],
                  "batch_size": args.batch_size, "side": args.side}
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
