"""Benchmark: Mask R-CNN training and inference images/s on this machine, and the share of training
step time spent waiting for data.

    python bench/maskrcnn_bench.py [--steps 20] [--size 256]

Synthetic demo data (enki_seg.data.demo: touching cells + debris with instance labels) at --size x --size,
built into LMDBs; the trainers' own code path (enki_seg.training.maskrcnn.MaskRCNNTrainer: reader with NIST's
default augmentation and instance outputs, distributed train step, the model's detect function):
  * the small preset (GroupNorm backbone, FPN P2-P4 at 64 channels), batch 4: training images/s,
    inference images/s (model + post-processing, batch 4), and data_wait_fraction = seconds the
    consumer waited for the reader / wall seconds of the timed training steps;
  * the ResNet-50-FPN preset (TAO-like, P2-P6 at 256 channels, from scratch), batch 2: training and
    inference images/s.
One process, one TensorFlow import. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import build_lmdb  # noqa: E402
from enki_seg.data import demo as demo_data  # noqa: E402
from enki_seg.data import records  # noqa: E402
from enki_seg.training.maskrcnn import MaskRCNNTrainConfig, MaskRCNNTrainer  # noqa: E402


def measure(tmp: Path, lmdb: Path, preset: str, batch: int, steps: int) -> dict:
    config = MaskRCNNTrainConfig(
        train_database=str(lmdb / "train-b.lmdb"), test_database=str(lmdb / "test-b.lmdb"),
        output_dir=str(tmp / f"run-{preset}"), number_classes=3, batch_size=batch, preset=preset,
        test_every_n_steps=10**9, reader_count=1, warmup_steps=0)
    meta = records.read_metadata(config.train_database), records.read_metadata(config.test_database)
    trainer = MaskRCNNTrainer(config, *meta, resume=False)
    try:
        trainer.setup()
        tf = trainer.tf
        for _ in range(3):  # trace and warm up
            trainer.distributed_train(trainer.train_iterator)[0].numpy()
        reader = trainer.readers[0]
        wait_before = reader.stats()["wait_seconds"]
        start = time.perf_counter()
        for _ in range(steps):
            loss, _terms = trainer.distributed_train(trainer.train_iterator)
        loss.numpy()
        train_seconds = time.perf_counter() - start
        wait = reader.stats()["wait_seconds"] - wait_before
        batch_images = next(iter(trainer.test_reader))["image"][:batch]
        images = tf.constant(batch_images)
        trainer.detect(images)["boxes"].numpy()
        start = time.perf_counter()
        repeats = max(3, steps // 2)
        for _ in range(repeats):
            out = trainer.detect(images)
        out["boxes"].numpy()
        infer_seconds = time.perf_counter() - start
        return {"params": int(sum(int(tf.size(w)) for w in trainer.model.trainable_weights)),
                "train_img_s": steps * batch / train_seconds, "infer_img_s": repeats * len(batch_images) / infer_seconds,
                "data_wait_fraction": wait / train_seconds, "train_step_s": train_seconds / steps}
    finally:
        trainer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--skip_r50", action="store_true", help="only the small configuration")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        assert demo_data.main(["--output_folder", str(tmp / "data"), "--count", "24", "--height", str(args.size),
                               "--width", str(args.size), "--seed", "0", "--coco", "0"]) == 0
        assert build_lmdb.main(["--image_folder", str(tmp / "data" / "images"), "--mask_folder",
                                str(tmp / "data" / "masks"), "--instance_folder", str(tmp / "data" / "instances"),
                                "--output_folder", str(tmp / "lmdb"), "--dataset_name", "b", "--image_format", "tif",
                                "--number_classes", "3", "--quiet"]) == 0
        small = measure(tmp, tmp / "lmdb", "small", batch=4, steps=args.steps)
        print(f"small (GroupNorm, P2-P4 64 ch, {small['params'] / 1e6:.2f} M params), {args.size}x{args.size}, "
              f"batch 4: train {small['train_img_s']:.2f} img/s ({small['train_step_s']:.2f} s/step), "
              f"inference {small['infer_img_s']:.2f} img/s, data wait {100 * small['data_wait_fraction']:.1f}% "
              "of training time", flush=True)
        result = {"train_img_s_small": round(small["train_img_s"], 3), "infer_img_s_small": round(small["infer_img_s"], 3),
                  "data_wait_fraction": round(small["data_wait_fraction"], 4), "params_small": small["params"],
                  "size": args.size}
        if not args.skip_r50:
            r50 = measure(tmp, tmp / "lmdb", "resnet50", batch=2, steps=max(4, args.steps // 4))
            print(f"resnet50-FPN (P2-P6 256 ch, {r50['params'] / 1e6:.1f} M params), {args.size}x{args.size}, batch 2: "
                  f"train {r50['train_img_s']:.2f} img/s ({r50['train_step_s']:.2f} s/step), inference "
                  f"{r50['infer_img_s']:.2f} img/s, data wait {100 * r50['data_wait_fraction']:.1f}%", flush=True)
            result.update({"train_img_s_r50": round(r50["train_img_s"], 3), "infer_img_s_r50": round(r50["infer_img_s"], 3),
                           "data_wait_fraction_r50": round(r50["data_wait_fraction"], 4), "params_r50": r50["params"]})
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
