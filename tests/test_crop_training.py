"""Untiled databases of images of several sizes train without tiling: the reader cuts every record
to one shape (random windows in training, fixed ones for test intervals), for a semantic model
(UNet with boundary targets) and for Mask R-CNN (whose test-interval AP is scored on the same window
of the full truth). Real DSB2018 nuclei of three sizes; a few steps each."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

import build_lmdb
from enki_seg.data import records
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SIZES = {(256, 256): 2, (360, 360): 2, (260, 347): 2}


@pytest.fixture(scope="module")
def mixed_db(dsb2018, tmp_path_factory):
    import imagecodecs

    root = tmp_path_factory.mktemp("mixed")
    wanted = dict(SIZES)
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for path in sorted((dsb2018 / "images").glob("*.png")):
        shape = imagecodecs.imread(path).shape[:2]
        if wanted.get(shape, 0) > 0:
            wanted[shape] -= 1
            for sub in ("images", "masks"):
                (root / sub / path.name).symlink_to(dsb2018 / sub / path.name)
    assert not any(wanted.values()), wanted
    assert build_lmdb.main(["--image_folder", str(root / "images"), "--instance_folder", str(root / "masks"),
                            "--output_folder", str(root / "lmdb"), "--dataset_name", "m", "--image_format", "png",
                            "--train_fraction", "0.67", "--seed", "1", "--quiet", "--workers", "1"]) == 0
    train, test = root / "lmdb" / "train-m.lmdb", root / "lmdb" / "test-m.lmdb"
    assert records.read_metadata(str(train)).record_height is None  # records of several sizes
    return train, test


def _train(script, train, test, out, *extra):
    cmd = [sys.executable, str(ROOT / script), "--train_database", str(train), "--test_database", str(test),
           "--output_dir", str(out), "--batch_size", "2", "--max_steps", "2", "--test_every_n_steps", "2",
           "--log_every", "1", "--early_stopping", "0", *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=ROOT)


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_unet_trains_on_crops_of_records_of_several_sizes(mixed_db, tmp_path):
    train, test = mixed_db
    out = tmp_path / "unet"
    r = _train("train_unet.py", train, test, out, "--instance_target", "boundary", "--number_classes", "3",
               "--depth", "2", "--base_filters", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train examples: 256x256 random crops" in r.stderr
    assert [int(row["step"]) for row in _rows(out)] == [2]
    config = json.loads((out / "config.json").read_text())
    assert (config["input"]["record_height"], config["input"]["record_width"]) == (256, 256)
    # a crop that is not a multiple of the model's size multiple is refused before work
    r = _train("train_unet.py", train, test, tmp_path / "bad", "--instance_target", "boundary",
               "--number_classes", "3", "--depth", "2", "--base_filters", "8", "--crop_size", "250")
    assert r.returncode == 2 and "--crop_size" in r.stderr and not (tmp_path / "bad" / "checkpoints").exists()


def test_maskrcnn_trains_and_scores_on_crops(mixed_db, tmp_path):
    train, test = mixed_db
    out = tmp_path / "maskrcnn"
    r = _train("train_maskrcnn.py", train, test, out, "--number_classes", "2", "--crop_size", "192",
               "--max_num_instances", "200")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test examples: 192x192 fixed crops" in r.stderr
    (row,) = _rows(out)
    assert 0.0 <= float(row["test_mask_AP"]) <= 1.0
