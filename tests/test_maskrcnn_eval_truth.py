"""The Mask R-CNN test interval scores COCO AP against every object of the test records, not against
the reader's training targets (which keep only the ``--max_num_instances`` largest per record).

The trainer's detector is replaced by one that returns the true objects, smallest first by score: with
the full truth that is a perfect detector (AP50 1); against truncated truth the small objects would be
false positives ranked first (AP50 well below 1). Runs in one subprocess (one TensorFlow setup).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import build_lmdb
from enki_seg.data import demo as demo_data
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = r"""
import json, sys
import numpy as np
from skimage.transform import resize
from enki_seg.training import distribution
tf = distribution.configure_devices()
import train_maskrcnn
from enki_seg.data import records

args, truth_db = json.loads(sys.argv[1]), sys.argv[2]
config = train_maskrcnn.build_config(train_maskrcnn.parse_args(args))
train_meta, test_meta = train_maskrcnn.MaskRCNNTrainer.check_databases(config)
trainer = train_maskrcnn.MaskRCNNTrainer(config, train_meta, test_meta, resume=False)
trainer.setup()
truth = records.Database(truth_db)
# the detector sees a batch of images; it answers from the records in the order the reader sends them
order = iter([i for batch in trainer.test_reader for i in batch["index"]])
D = 100


def perfect_detect(images):
    n_images = int(images.shape[0])
    out = {"boxes": np.zeros((n_images, D, 4), np.float32), "scores": np.zeros((n_images, D), np.float32),
           "classes": np.zeros((n_images, D), np.int32), "masks": np.zeros((n_images, D, 28, 28), np.float32),
           "num_detections": np.zeros((n_images,), np.int32)}
    for i in range(n_images):
        record = truth.read(int(next(order)))
        labels = record.instance_labels
        ids = [k for k in range(1, len(record.instance_classes) + 1) if (labels == k).any()]
        areas = [int((labels == k).sum()) for k in ids]
        for rank, (k, area) in enumerate(sorted(zip(ids, areas), key=lambda t: t[1])):
            ys, xs = np.nonzero(labels == k)
            y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
            out["boxes"][i, rank] = (y0, x0, y1, x1)
            out["scores"][i, rank] = 1.0 - 0.001 * rank  # the smallest object scores highest
            out["classes"][i, rank] = record.instance_classes[k - 1]
            crop = (labels[y0:y1, x0:x1] == k).astype(np.float32)
            out["masks"][i, rank] = resize(crop, (28, 28), order=0, anti_aliasing=False)
        out["num_detections"][i] = len(ids)
    return {key: tf.constant(value) for key, value in out.items()}


trainer.detect = perfect_detect
counts = [int((np.unique(truth.read(i).instance_labels) > 0).sum()) for i in range(len(truth))]
result = trainer.evaluate()
trainer.close()
truth.close()
print(json.dumps({"row": result["row"], "objects": counts}))
"""


def test_test_interval_ap_counts_every_object(tmp_path):
    assert demo_data.main(["--output_folder", str(tmp_path / "data"), "--count", "6", "--height", "128",
                           "--width", "128", "--seed", "5", "--num_workers", "1"]) == 0
    data, lmdb = tmp_path / "data", tmp_path / "lmdb"
    assert build_lmdb.main(["--image_folder", str(data / "images"), "--mask_folder", str(data / "masks"),
                            "--instance_folder", str(data / "instances"), "--output_folder", str(lmdb),
                            "--dataset_name", "c", "--image_format", "tif", "--number_classes", "3",
                            "--train_fraction", "0.5", "--seed", "0", "--quiet", "--workers", "1"]) == 0
    test_db = lmdb / "test-c.lmdb"
    args = ["--train_database", str(lmdb / "train-c.lmdb"), "--test_database", str(test_db), "--output_dir",
            str(tmp_path / "run"), "--number_classes", "3", "--batch_size", "2", "--max_num_instances", "2",
            "--use_augmentation", "0"]
    copy = tmp_path / "copy.lmdb"  # the fake detector's own copy: LMDB opens a path once per process
    shutil.copytree(test_db, copy)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args), str(copy)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(out["objects"]) > 2, "the test records need more objects than --max_num_instances"
    assert out["row"]["test_mask_AP50"] == pytest.approx(1.0, abs=1e-6), out
    assert out["row"]["test_box_AP50"] == pytest.approx(1.0, abs=1e-6), out
