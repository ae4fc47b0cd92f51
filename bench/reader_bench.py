"""Benchmark: the reader engine against a NIST-style reader and against in-process loops, as ratios.

    python bench/reader_bench.py [--data ../shared/data/nist-hes] [--seconds 4]

On the NIST data (256x256 uint16 records, untiled), batch 8, examples/s delivered to a consumer that
does nothing else:
  ours    augmented (NIST's default augmentation) and not, with 1 and 2 workers, direct and through
          the tf.data adapter;
  (a)     bench/nist_baseline.py: NIST's way (skimage rotate + second warp, gaussian_filter, float64
          noise, one-hot, batches pickled through a multiprocessing.Queue), 1 and 2 workers;
  (b)     one process reading and decoding records (no normalization, no transport);
  (c)     one process decoding and z-score normalizing into a batch array (no transport);
and the workers' RSS growth over a long augmented run. Last line: one JSON object.
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
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

import augment  # noqa: E402
import build_lmdb  # noqa: E402
import nist_baseline  # noqa: E402
from enki_seg.data import records  # noqa: E402
from imagereader import ImageReader, ReaderConfig  # noqa: E402
from enki_seg.data.normalization import Normalization  # noqa: E402

BATCH = 8


def _config(db, workers, aug, **kw):
    return ReaderConfig(db, batch_size=BATCH, num_workers=workers,
                        augment=augment.AugmentConfig() if aug else None, **kw)


def ours(db, workers, aug, seconds) -> float:
    with ImageReader(_config(db, workers, aug)) as reader:
        for _ in range(3):
            reader.next_batch()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += len(reader.next_batch()["index"])
        return count / (time.perf_counter() - start)


def ours_tf(db, workers, aug, seconds) -> float:
    with ImageReader(_config(db, workers, aug)) as reader:
        iterator = iter(reader.as_tf_dataset())
        for _ in range(3):
            next(iterator)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += int(next(iterator)["index"].shape[0])
        return count / (time.perf_counter() - start)


def raw_decode(db, seconds) -> float:
    """(b) one process: cursor + decode, nothing else."""
    with records.Database(db) as database, database.transaction() as txn:
        n, count, start = len(database), 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for i in range(n):
                database.view(txn, i)
            count += n
        return count / (time.perf_counter() - start)


def inprocess_loop(db, seconds) -> float:
    """(c) one process: decode + z-score normalization into a batch array, no transport."""
    norm = Normalization("zscore")
    meta = records.read_metadata(db)
    batch = np.empty((BATCH, meta.record_height, meta.record_width, meta.channels), np.float32)
    masks = np.empty((BATCH, meta.record_height, meta.record_width), np.int32)
    rng = np.random.default_rng(0)
    with records.Database(db) as database:
        n, count, start = len(database), 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            with database.transaction() as txn:
                for j, i in enumerate(rng.permutation(n)[:BATCH]):
                    example = database.view(txn, int(i))
                    norm.apply(example.image, out=batch[j])
                    masks[j] = example.semantic_mask
            count += BATCH
        return count / (time.perf_counter() - start)


def _rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_growth(db, examples=12000, warmup=2000) -> float:
    """MB of worker RSS growth per 10,000 augmented examples (max over the 2 workers)."""
    with ImageReader(_config(db, 2, True)) as reader:
        pids = [p.pid for p in reader._processes]
        seen = 0
        while seen < warmup:
            seen += len(reader.next_batch()["index"])
        before = [_rss_mb(p) for p in pids]
        while seen < warmup + examples:
            seen += len(reader.next_batch()["index"])
        after = [_rss_mb(p) for p in pids]
    return max((a - b) * 10000 / examples for a, b in zip(after, before))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nist-hes"))
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--no_tf", action="store_true", help="skip the tf.data adapter (no TensorFlow)")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # starvation warnings are the point here, not news
    with tempfile.TemporaryDirectory() as tmp:
        assert build_lmdb.main(["--image_folder", f"{args.data}/images", "--mask_folder", f"{args.data}/masks",
                                "--output_folder", tmp, "--dataset_name", "b", "--quiet",
                                "--workers", "1"]) == 0
        db = f"{tmp}/train-b.lmdb"
        s = args.seconds
        r = {}
        for workers in (1, 2):
            r[f"nist_aug_w{workers}"] = nist_baseline.throughput(db, workers, True, BATCH, seconds=s)
            r[f"nist_noaug_w{workers}"] = nist_baseline.throughput(db, workers, False, BATCH, seconds=s)
            r[f"aug_w{workers}"] = ours(db, workers, True, s)
            r[f"noaug_w{workers}"] = ours(db, workers, False, s)
        r["raw_decode"] = raw_decode(db, s)
        r["inprocess"] = inprocess_loop(db, s)
        r["rss_growth_mb_per_10k"] = rss_growth(db)
        if not args.no_tf:
            import tensorflow as tf  # noqa: F401  (after the fork-based runs: the reader now uses forkserver)

            r["aug_w2_direct_tfrun"] = ours(db, 2, True, s)
            r["aug_w2_tf"] = ours_tf(db, 2, True, s)
    print(f"NIST data, 256x256 uint16, batch {BATCH}, examples/s ({s:.0f} s per figure)")
    print(f"{'':24s} {'ours':>9s} {'NIST-style':>11s} {'ratio':>7s}")
    for key in ("aug_w1", "aug_w2", "noaug_w1", "noaug_w2"):
        print(f"{key:24s} {r[key]:9.0f} {r['nist_' + key]:11.0f} {r[key] / r['nist_' + key]:7.1f}")
    print(f"(b) raw read+decode, 1 process     {r['raw_decode']:9.0f}")
    print(f"(c) decode+normalize, 1 process    {r['inprocess']:9.0f}")
    print(f"noaug w2 / (c)                     {r['noaug_w2'] / r['inprocess']:9.2f}")
    if "aug_w2_tf" in r:
        print(f"aug w2 via tf.data / direct        {r['aug_w2_tf'] / r['aug_w2_direct_tfrun']:9.2f}")
    print(f"worker RSS growth, MB / 10k examples {r['rss_growth_mb_per_10k']:7.2f}")
    result = {
        "aug_w2_vs_nist_w2": round(r["aug_w2"] / r["nist_aug_w2"], 2),
        "noaug_w2_vs_nist_w2": round(r["noaug_w2"] / r["nist_noaug_w2"], 2),
        "noaug_w2_vs_inprocess": round(r["noaug_w2"] / r["inprocess"], 2),
        "tf_vs_direct": round(r["aug_w2_tf"] / r["aug_w2_direct_tfrun"], 3) if "aug_w2_tf" in r else None,
        "rss_growth_mb_per_10k": round(r["rss_growth_mb_per_10k"], 2),
        **{f"{k}_ex_s": round(v, 1) for k, v in r.items() if k != "rss_growth_mb_per_10k"},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
