"""train_maskrcnn.py end to end on tiny synthetic data: overfitting to COCO mask AP50 >= 0.8, exports,
config.json that inference.py recognises, COCO results, and clear errors on unsuitable databases.

Training runs in subprocesses (each sets up its own TensorFlow); this process never imports it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import tifffile

import build_lmdb
from enki_seg.data import demo as demo_data
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # every test starts trainers


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """8 synthetic 128x128 images with touching cells (class 1) and debris (class 2), as LMDBs."""
    root = tmp_path_factory.mktemp("maskrcnn")
    assert demo_data.main(["--output_folder", str(root / "data"), "--count", "8", "--height", "128",
                           "--width", "128", "--seed", "3", "--num_workers", "1"]) == 0
    assert build_lmdb.main(["--image_folder", str(root / "data" / "images"), "--mask_folder",
                            str(root / "data" / "masks"), "--instance_folder", str(root / "data" / "instances"),
                            "--output_folder", str(root / "lmdb"), "--dataset_name", "c", "--image_format", "tif",
                            "--number_classes", "3", "--train_fraction", "0.9", "--seed", "0", "--quiet",
                            "--workers", "1"]) == 0
    return root


def _train(args, timeout=840):
    cmd = [sys.executable, str(ROOT / "train_maskrcnn.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_overfits_to_mask_ap50_then_inference_writes_instances_and_coco_json(cells, tmp_path):
    """The whole path: reader with instances -> Mask R-CNN -> COCO AP each interval -> exports ->
    inference.py recognising the run -> instance TIFFs + detections.json + AP against the labels."""
    lmdb = cells / "lmdb"
    out = tmp_path / "run"
    # overfitting is measured on the training images: the trainers refuse the train database as test
    # database, so the test database is the train split of a second build, of a copy of the images
    shutil.copytree(cells / "data", tmp_path / "data")
    assert build_lmdb.main(["--image_folder", str(tmp_path / "data" / "images"), "--mask_folder",
                            str(tmp_path / "data" / "masks"), "--instance_folder", str(tmp_path / "data" / "instances"),
                            "--output_folder", str(tmp_path / "lmdb"), "--dataset_name", "c", "--image_format", "tif",
                            "--number_classes", "3", "--train_fraction", "0.9", "--seed", "0", "--quiet",
                            "--workers", "1"]) == 0
    r = _train(["--train_database", lmdb / "train-c.lmdb", "--test_database", tmp_path / "lmdb" / "train-c.lmdb",
                "--allow_foreign_test_database", "1", "--output_dir", out, "--number_classes", "3",
                "--batch_size", "4", "--test_every_n_steps", "100",
                "--max_steps", "300", "--use_augmentation", "0", "--warmup_steps", "10", "--early_stopping", "0",
                "--log_every", "50", "--seed", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    best_ap50 = max(float(row["test_mask_AP50"]) for row in history)
    assert best_ap50 >= 0.8, [(row["step"], row["test_mask_AP50"]) for row in history]
    # every loss term reaches TensorBoard and the log
    assert "rpn_score" in r.stderr and "mask" in r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "maskrcnn" and config["classes"]["number_classes"] == 3
    assert (out / "model.keras").is_file() and (out / "saved_model" / "saved_model.pb").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 300 and summary["best_test_mask_ap"] > 0.3

    pred = tmp_path / "pred"
    r = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model", str(out), "--image_folder",
                        str(cells / "data" / "images"), "--image_format", "tif", "--output_folder", str(pred),
                        "--mask_folder", str(cells / "data" / "instances"), "--class_folder",
                        str(cells / "data" / "masks"), "--save_overlay", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    labels = tifffile.imread(sorted(pred.glob("*.tif"))[0])
    assert labels.shape == (128, 128) and labels.max() >= 3
    from pycocotools.coco import COCO

    coco = COCO(str(pred / "detections.json"))
    assert len(coco.getImgIds()) == 8 and len(coco.getAnnIds()) >= 8
    metrics = json.loads((pred / "metrics.json").read_text())
    # 7 of the 8 images were trained on; AP50 over all 8 stays high
    assert metrics["mask_AP50"] >= 0.6, metrics


def test_errors_before_work(cells, tmp_path):
    lmdb = cells / "lmdb"
    # a database without instance labels
    plain = tmp_path / "plain"
    assert build_lmdb.main(["--image_folder", str(cells / "data" / "images"), "--mask_folder",
                            str(cells / "data" / "masks"), "--output_folder", str(plain), "--dataset_name", "p",
                            "--image_format", "tif", "--number_classes", "3", "--quiet", "--workers", "1"]) == 0
    r = _train(["--train_database", plain / "train-p.lmdb", "--test_database", plain / "test-p.lmdb",
                "--output_dir", tmp_path / "a", "--number_classes", "3"], timeout=120)
    assert r.returncode == 2
    assert "holds no instance labels" in r.stderr and "--instance_folder" in r.stderr
    # class ids beyond --number_classes
    r = _train(["--train_database", lmdb / "train-c.lmdb", "--test_database", lmdb / "test-c.lmdb",
                "--output_dir", tmp_path / "b", "--number_classes", "2"], timeout=120)
    assert r.returncode == 2 and "use --number_classes 3" in r.stderr
    # an unknown model setting
    r = _train(["--train_database", lmdb / "train-c.lmdb", "--test_database", lmdb / "test-c.lmdb",
                "--output_dir", tmp_path / "c", "--number_classes", "3", "--maskrcnn", "fpn_chanels=32"], timeout=120)
    assert r.returncode == 2 and "fpn_chanels" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_two_workers_stay_in_sync_and_a_single_process_resumes(cells, tmp_path):
    """MultiWorkerMirroredStrategy (2 processes via launch/local.py): equal weights on both workers,
    evaluation on each worker without collectives; then the run continues from its checkpoint in one
    process (a changed worker count is allowed, and said)."""
    lmdb, out = cells / "lmdb", tmp_path / "run"
    common = ["--train_database", lmdb / "train-c.lmdb", "--test_database", lmdb / "test-c.lmdb", "--output_dir",
              out, "--number_classes", "3", "--batch_size", "2", "--test_every_n_steps", "5", "--log_every", "5",
              "--seed", "0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--num_workers", "2", "--timeout", "400",
                        "--", sys.executable, str(ROOT / "train_maskrcnn.py"), *map(str, common), "--max_steps", "10",
                        "--distribution", "multi_worker"], capture_output=True, text=True, timeout=480, cwd=ROOT,
                       env=env)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-4000:]
    prints = dict(re.findall(r"\[rank (\d)\].*model weights fingerprint (\w+)", output))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    assert json.loads((out / "summary.json").read_text())["workers"] == 2
    r = _train([*common, "--max_steps", "14"], timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "instead of 2 x 1" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 14 and summary["workers"] == 1
