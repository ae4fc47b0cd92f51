"""Benchmark: instance segmentation accuracy on real nuclei (DSB2018 fluorescence), end to end through
the CLIs, as a new user would run them.

    python bench/instance_accuracy.py [--data ../shared/data/dsb2018-fluo] [--max_steps N] \\
        [--method boundary|maskrcnn] [--validation_fraction 0.1] [--seed 0]

1. A seeded image-level split of the data folder (``--validation_fraction`` of the images for
   validation; the split is by image, never by tile).
2. ``build_lmdb.py --instance_folder`` on the training images, tiled (``--tile_size``, overlap a
   quarter tile); its own test database is a seeded 10% of the training images (for test intervals).
3. Training: ``--method boundary`` (default) trains ``train_unet.py --instance_target boundary`` (a UNet
   that tells nucleus interiors from their rims; seeded watershed at inference), ``--method maskrcnn``
   trains ``train_maskrcnn.py --preset small``.
4. ``inference.py`` on the whole validation images with ``--mask_folder`` (their instance labels).

Last line: one JSON object with the per-image-mean Kaggle accuracy TP/(TP+FP+FN) at IoU 0.5 and 0.75,
the official DSB score (mean accuracy over IoU 0.5:0.05:0.95), precision/recall/F1 at 0.5, the same
summed over all validation objects (StarDist's matching_dataset), COCO mask AP and AP50, training
seconds and steps. Each step's command and log go to --work_dir (a temporary folder
unless given).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def split(data: Path, fraction: float, seed: int, work: Path) -> dict[str, int]:
    """Symlink a seeded image-level split into work/{train,validation}/{images,masks}."""
    stems = sorted(p.stem for p in (data / "images").glob("*.png"))
    if not stems:
        raise SystemExit(f"no images in {data / 'images'}")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = max(1, int(round(fraction * len(stems))))
    parts = {"validation": [stems[i] for i in order[:n_val]], "train": [stems[i] for i in order[n_val:]]}
    for part, names in parts.items():
        for sub in ("images", "masks"):
            folder = work / part / sub
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                link = folder / f"{name}.png"
                if not link.exists():
                    link.symlink_to((data / sub / f"{name}.png").resolve())
    return {part: len(names) for part, names in parts.items()}


def run(command: list[str], log: Path) -> float:
    """Run one CLI step (output to ``log``); seconds. A failure stops the benchmark naming the log."""
    started = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(command) + "\n\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code != 0:
        raise SystemExit(f"{command[1]} failed with exit code {code}; see {log}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dsb2018-fluo"))
    p.add_argument("--method", choices=("boundary", "maskrcnn"), default="boundary")
    p.add_argument("--validation_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    # per method, the settings of the README's figures (each within 30 minutes of training on the 2-core CPU)
    p.add_argument("--tile_size", type=int, help="training tile (boundary 128, maskrcnn 256)")
    p.add_argument("--batch_size", type=int, help="batch size (boundary 8, maskrcnn 4)")
    p.add_argument("--max_steps", type=int, help="training steps (boundary 4000, maskrcnn 3500)")
    p.add_argument("--test_every_n_steps", type=int, default=500)
    p.add_argument("--inference_tile_size", type=int, default=512)
    p.add_argument("--work_dir", help="keep the split, databases, run and predictions here")
    p.add_argument("--normalization", default="percentile", help="the trainers' --normalization (percentile)")
    p.add_argument("--normalization_scope", default="image", help="the trainers' --normalization_scope (image)")
    p.add_argument("--tta", default="none", help="inference.py --tta for boundary runs (none)")
    p.add_argument("--precision", help="the trainers' --precision (default: theirs; train_unet.py: auto)")
    args = p.parse_args(argv)
    for name, values in (("tile_size", (128, 256)), ("batch_size", (8, 4)), ("max_steps", (4000, 3500))):
        if getattr(args, name) is None:
            setattr(args, name, values[args.method == "maskrcnn"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        counts = split(Path(args.data), args.validation_fraction, args.seed, work)
        py = sys.executable
        tile = args.tile_size
        run([py, "build_lmdb.py", "--image_folder", str(work / "train" / "images"), "--instance_folder",
             str(work / "train" / "masks"), "--output_folder", str(work / "lmdb"), "--dataset_name", "dsb",
             "--image_format", "png", "--train_fraction", "0.9", "--seed", str(args.seed), "--use_tiling", "1",
             "--tile_size", str(tile), "--tile_overlap", str(tile // 4), "--overwrite", "1", "--quiet"],
            work / "build.log")
        data_flags = ["--train_database", str(work / "lmdb" / "train-dsb.lmdb"), "--test_database",
                      str(work / "lmdb" / "test-dsb.lmdb"), "--output_dir", str(work / "run"),
                      "--batch_size", str(args.batch_size), "--max_steps", str(args.max_steps),
                      "--test_every_n_steps", str(args.test_every_n_steps), "--early_stopping", "100",
                      "--seed", str(args.seed), "--normalization", args.normalization,
                      "--normalization_scope", args.normalization_scope]
        if args.method == "boundary":
            train = [py, "train_unet.py", *data_flags, "--instance_target", "boundary", "--number_classes", "3",
                     "--depth", "4", "--base_filters", "16", "--dropout", "0.0", "--learning_rate", "1e-3",
                     "--loss", "cross_entropy+dice", "--lr_schedule", "cosine", "--monitor", "loss",
                     "--warmup_steps", str(min(200, args.max_steps // 10))]
        else:
            train = [py, "train_maskrcnn.py", *data_flags, "--number_classes", "2", "--preset", "small",
                     "--learning_rate", "1e-3",  # --max_num_instances: from the data
                     "--warmup_steps", str(min(200, args.max_steps // 10))]
        if args.precision:
            train += ["--precision", args.precision]
        train_seconds = run(train, work / "train.log")
        summary = json.loads((work / "run" / "summary.json").read_text())
        precision = json.loads((work / "run" / "config.json").read_text()).get("precision")
        run([py, "inference.py", "--model", str(work / "run"), "--image_folder", str(work / "validation" / "images"),
             "--output_folder", str(work / "predictions"), "--image_format", "png", "--mask_folder",
             str(work / "validation" / "masks"), "--tile_size", str(args.inference_tile_size)]
            + (["--tta", args.tta] if args.tta != "none" else []),
            work / "inference.log")
        metrics = json.loads((work / "predictions" / "metrics.json").read_text())
    matching = metrics["instance_matching"]
    at = {round(t["threshold"], 2): t for t in matching["per_image_mean"]}
    summed = {round(t["threshold"], 2): t for t in matching["thresholds"]}
    result = {
        "method": args.method,
        "accuracy_iou50": round(at[0.5]["accuracy"], 4),  # per image, averaged (Kaggle DSB2018)
        "accuracy_iou75": round(at[0.75]["accuracy"], 4),
        "dsb_mean": round(matching["dsb_score"], 4),
        "precision_iou50": round(at[0.5]["precision"], 4),
        "recall_iou50": round(at[0.5]["recall"], 4),
        "f1_iou50": round(at[0.5]["f1"], 4),
        "summed_accuracy_iou50": round(summed[0.5]["accuracy"], 4),  # TP/FP/FN over all images (StarDist)
        "summed_precision_iou50": round(summed[0.5]["precision"], 4),
        "summed_recall_iou50": round(summed[0.5]["recall"], 4),
        "mask_AP": round(metrics["mask_AP"], 4),
        "mask_AP50": round(metrics["mask_AP50"], 4),
        "train_seconds": round(train_seconds, 1),
        "steps": summary["steps"],
        "validation_images": counts["validation"],
        "train_images": counts["train"],
        "tile_size": args.tile_size,
        "batch_size": args.batch_size,
        "normalization": f"{args.normalization}/{args.normalization_scope}",
        "precision": precision,
        "tta": args.tta,
    }
    print(f"{args.method}: accuracy@0.5 {result['accuracy_iou50']:.3f}  @0.75 {result['accuracy_iou75']:.3f}  "
          f"DSB mean {result['dsb_mean']:.3f}  ({result['steps']} steps, {train_seconds / 60:.1f} min training, "
          f"{counts['validation']} validation images)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
