"""Instance segmentation with a boundary-target UNet on real nuclei (a handful of DSB2018 images, few
steps): build with --instance_folder, train_unet.py --instance_target boundary, inference.py on whole
held-out images with their instance labels -> instance labels, detections.json and metrics.json with
COCO AP and the object-matching figures. A pipeline check, not an accuracy figure (that is
bench/instance_accuracy.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import build_lmdb
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=500, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_boundary_unet_on_real_nuclei_end_to_end(dsb2018, tmp_path):
    names = sorted(p.name for p in (dsb2018 / "images").glob("*.png"))[:10]
    for part, chosen in (("train", names[:8]), ("held_out", names[8:])):
        for sub in ("images", "masks"):
            (tmp_path / part / sub).mkdir(parents=True)
            for name in chosen:
                (tmp_path / part / sub / name).symlink_to(dsb2018 / sub / name)
    assert build_lmdb.main(["--image_folder", str(tmp_path / "train" / "images"), "--instance_folder",
                            str(tmp_path / "train" / "masks"), "--output_folder", str(tmp_path / "lmdb"),
                            "--dataset_name", "dsb", "--image_format", "png", "--use_tiling", "1",
                            "--tile_size", "128", "--tile_overlap", "32", "--quiet", "--workers", "1"]) == 0
    run = tmp_path / "run"
    bad = _run("train_unet.py", "--train_database", tmp_path / "lmdb" / "train-dsb.lmdb", "--test_database",
               tmp_path / "lmdb" / "test-dsb.lmdb", "--output_dir", run, "--instance_target", "boundary",
               "--number_classes", "2")
    assert bad.returncode == 2 and "use --number_classes 3" in bad.stderr
    r = _run("train_unet.py", "--train_database", tmp_path / "lmdb" / "train-dsb.lmdb", "--test_database",
             tmp_path / "lmdb" / "test-dsb.lmdb", "--output_dir", run, "--instance_target", "boundary",
             "--number_classes", "3", "--depth", "2", "--base_filters", "8", "--dropout", "0", "--batch_size", "4",
             "--max_steps", "20", "--test_every_n_steps", "10", "--learning_rate", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["instance_target"] == "boundary" and config["classes"]["number_classes"] == 3
    out = tmp_path / "predictions"
    r = _run("inference.py", "--model", run, "--image_folder", tmp_path / "held_out" / "images", "--mask_folder",
             tmp_path / "held_out" / "masks", "--output_folder", out, "--image_format", "png", "--save_overlay", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "object matching over 2 image(s)" in r.stdout
    for name in names[8:]:
        labels = tifffile.imread(out / name.replace(".png", ".tif"))
        assert labels.ndim == 2 and np.issubdtype(labels.dtype, np.integer)
        assert (out / "overlays" / name).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    matching = metrics["instance_matching"]
    assert matching["num_images"] == 2 and len(matching["thresholds"]) == 10
    assert [round(row["threshold"], 2) for row in matching["per_image_mean"]][:2] == [0.5, 0.55]
    for row in matching["thresholds"]:
        assert 0.0 <= row["accuracy"] <= row["f1"] <= 1.0
    assert 0.0 <= metrics["mask_AP"] <= 1.0
    detections = json.loads((out / "detections.json").read_text())
    assert detections["categories"] == [{"id": 1, "name": "object"}]
