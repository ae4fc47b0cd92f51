"""Benchmark: build_lmdb.py throughput on the NIST data against simply reading the same files.

    python bench/build_bench.py [--data ../shared/data/nist-hes] [--repeats 3]

Source megapixels/s of a tiled build (tile 128) with --workers 1 and 2, and of a loop that only
reads every image and mask (tifffile) in one process. The ratios are what to compare across machines.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import build_lmdb  # noqa: E402
from enki_seg.data import image_io  # noqa: E402


def read_rate(images: list[Path], masks: Path) -> float:
    start = time.perf_counter()
    pixels = 0
    for path in images:
        image = image_io.read_image(path)
        image_io.read_labels(masks / path.name)
        pixels += image.shape[0] * image.shape[1]
    return pixels / 1e6 / (time.perf_counter() - start)


def build_rate(data: Path, workers: int, megapixels: float, compression: str = "none") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rc = build_lmdb.main([
            "--image_folder", str(data / "images"), "--mask_folder", str(data / "masks"),
            "--output_folder", str(Path(tmp) / "out"), "--dataset_name", "bench", "--use_tiling", "1",
            "--tile_size", "128", "--workers", str(workers), "--compression", compression, "--quiet",
        ])
        elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"build failed with code {rc}")
    return megapixels / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nist-hes"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copies", type=int, default=4,
                   help="link each source this many times, so fixed costs do not dominate")
    args = p.parse_args(argv)
    import logging

    logging.disable(logging.INFO)  # the build's summary logging is noise here
    with tempfile.TemporaryDirectory() as tmp:
        return _run(_replicate(Path(args.data), Path(tmp), args.copies), args.repeats)


def _replicate(data: Path, tmp: Path, copies: int) -> Path:
    for sub in ("images", "masks"):
        (tmp / sub).mkdir()
        for path in sorted((data / sub).iterdir()):
            for k in range(copies):
                (tmp / sub / f"{path.stem}_{k}{path.suffix}").symlink_to(path.resolve())
    return tmp


def _run(data: Path, repeats: int) -> int:
    images = image_io.list_images(data / "images", "tif")
    megapixels = sum(image_io.read_image(p).shape[0] * image_io.read_image(p).shape[1] for p in images) / 1e6
    figures: dict[str, list[float]] = {"read": [], "w1": [], "w2": [], "w2_zstd": []}
    for _ in range(repeats):  # interleaved, so machine load hits every variant alike
        figures["read"].append(read_rate(images, data / "masks"))
        figures["w1"].append(build_rate(data, 1, megapixels))
        figures["w2"].append(build_rate(data, 2, megapixels))
        figures["w2_zstd"].append(build_rate(data, 2, megapixels, "zstd"))
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"{len(images)} images, {megapixels:.1f} source megapixels, tiled 128, median of {repeats}")
    print(f"{'variant':28s} {'MP/s':>8s} {'vs read':>8s}")
    for label, key in (("read only (1 process)", "read"), ("build --workers 1", "w1"),
                       ("build --workers 2", "w2"), ("build --workers 2 zstd", "w2_zstd")):
        print(f"{label:28s} {med[key]:8.1f} {med[key] / med['read']:8.2f}")
    result = {
        "read_mp_s": round(med["read"], 2),
        "build_w1_mp_s": round(med["w1"], 2),
        "build_w2_mp_s": round(med["w2"], 2),
        "build_w2_zstd_mp_s": round(med["w2_zstd"], 2),
        "build_vs_read_w1": round(med["w1"] / med["read"], 3),
        "build_vs_read_w2": round(med["w2"] / med["read"], 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
