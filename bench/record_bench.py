"""Benchmark: decoding records straight from the LMDB buffer, per compression, against raw cursor reads.

    python bench/record_bench.py [--data ../shared/data/nist-hes]

Builds the NIST data (tiled 128) once per codec, then in one process: records/s of iterating the
cursor values alone, of cursor + decode (zero-copy for "none"), and the bytes per record, so the
cost of each codec is a ratio against the raw read. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lmdb  # noqa: E402

import build_lmdb  # noqa: E402
from enki_seg.data import records  # noqa: E402


def _rate(path: Path, decode: bool, passes: int = 5) -> float:
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    count = 0
    start = time.perf_counter()
    with env.begin(buffers=True) as txn:
        for _ in range(passes):
            for key, value in txn.cursor():
                if key == records.METADATA_KEY:
                    continue
                if decode:
                    example = records.decode_example(value, key)
                    int(example.image[-1, -1, 0])  # decoding is eager; read one pixel anyway
                else:
                    bytes(value[:16])
                count += 1
    elapsed = time.perf_counter() - start
    env.close()
    return count / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nist-hes"))
    args = p.parse_args(argv)
    logging.disable(logging.INFO)
    data = Path(args.data)
    result = {}
    print(f"{'codec':6s} {'bytes/rec':>10s} {'raw rec/s':>10s} {'decode rec/s':>13s} {'decode/raw':>10s}")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("none", "lz4", "zstd", "png"):
            out = Path(tmp) / codec
            rc = build_lmdb.main([
                "--image_folder", str(data / "images"), "--mask_folder", str(data / "masks"),
                "--output_folder", str(out), "--dataset_name", "b", "--use_tiling", "1",
                "--tile_size", "128", "--compression", codec, "--quiet", "--workers", "1"])
            if rc:
                raise SystemExit(f"build failed ({rc})")
            db = out / "train-b.lmdb"
            meta = records.read_metadata(str(db))
            size = sum(f.stat().st_size for f in db.iterdir() if f.name == "data.mdb")
            raw, dec = _rate(db, False), _rate(db, True)
            per_record = size / meta.record_count
            print(f"{codec:6s} {per_record:10.0f} {raw:10.0f} {dec:13.0f} {dec / raw:10.2f}")
            result[f"{codec}_bytes_per_record"] = round(per_record)
            result[f"{codec}_decode_rec_s"] = round(dec)
            result[f"{codec}_decode_vs_raw"] = round(dec / raw, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
