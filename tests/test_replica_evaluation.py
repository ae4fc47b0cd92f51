"""Test intervals under MirroredStrategy with 2 replicas: test databases of every size from 1 record to
two global batches plus one evaluate without error and give the metrics a single-replica evaluation of
the same weights gives (each record counted once), for UNet, FC-DenseNet and Mask R-CNN.

An odd number of test batches, or a partial last batch, used to leave a replica with an empty batch, and
the synchronized batch norm then failed (``Incompatible shapes: [8] vs. [0,32,32,4]``). The evaluations
run in one subprocess (one TensorFlow device setup); this process builds the databases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

import build_lmdb
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PER_REPLICA_BATCH = 2
REPLICAS = 2
SIZES = range(1, 2 * PER_REPLICA_BATCH * REPLICAS + 2)  # 1 .. two global batches plus one
TRAIN_IMAGES = 8


def _write(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "instances"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        instances = np.zeros((64, 64), np.uint16)
        for k in range(1, int(rng.integers(1, 4)) + 1):
            y, x = rng.integers(0, 44, 2)
            instances[y: y + rng.integers(8, 20), x: x + rng.integers(8, 20)] = k
        image = ((instances > 0) * 700 + 200 + rng.integers(0, 150, (64, 64))).astype(np.uint16)
        tifffile.imwrite(folder / "images" / f"r{i:02d}.tif", image)
        imagecodecs.imwrite(str(folder / "masks" / f"r{i:02d}.png"), (instances > 0).astype(np.uint8))
        tifffile.imwrite(folder / "instances" / f"r{i:02d}.tif", instances)


@pytest.fixture(scope="module")
def databases(tmp_path_factory) -> dict[int, tuple[Path, Path]]:
    """{test size: (train db, test db)}: the same 8 training images, test databases of 1..9 records."""
    root = tmp_path_factory.mktemp("replicas")
    out = {}
    for size in SIZES:
        src = root / f"src{size}"
        _write(src, TRAIN_IMAGES + size, seed=size)
        assert build_lmdb.main([
            "--image_folder", str(src / "images"), "--mask_folder", str(src / "masks"), "--instance_folder",
            str(src / "instances"), "--output_folder", str(root / "lmdb"), "--dataset_name", f"s{size}",
            "--train_fraction", str(TRAIN_IMAGES / (TRAIN_IMAGES + size)), "--quiet", "--workers", "1"]) == 0
        out[size] = (root / "lmdb" / f"train-s{size}.lmdb", root / "lmdb" / f"test-s{size}.lmdb")
    return out


SCRIPT = r"""
import json, sys
from enki_seg.training import distribution
tf = distribution.configure_devices(cpu_replicas=2)
import train_maskrcnn, train_unet

jobs, out_root = json.loads(sys.argv[1]), sys.argv[2]
results = []
for job in jobs:
    module = {"unet": train_unet, "maskrcnn": train_maskrcnn}[job["trainer"]]
    cls = train_unet.UNetTrainer if module is train_unet else train_maskrcnn.MaskRCNNTrainer
    evaluations = {}
    weights = None
    for replicas in (1, 2):
        args = [*job["args"], "--output_dir", f"{out_root}/{job['name']}-{replicas}",
                "--cpu_replicas", str(replicas)]
        config = module.build_config(module.parse_args(args))
        train_meta, test_meta = cls.check_databases(config)
        trainer = cls(config, train_meta, test_meta, False)
        try:
            trainer.setup()
            if weights is None:
                weights = trainer.model.get_weights()
            else:
                trainer.model.set_weights(weights)
            result = trainer.evaluate()
            evaluations[replicas] = {"loss": result["loss"], "row": result["row"],
                                     "replicas": trainer.replicas}
        finally:
            trainer.close()
    results.append({"name": job["name"], **{str(k): v for k, v in evaluations.items()}})
print("RESULTS " + json.dumps(results))
"""


def _jobs(databases) -> list[dict]:
    jobs = []
    common = ["--batch_size", str(PER_REPLICA_BATCH), "--number_classes", "2", "--reader_count", "1"]
    for size, (train, test) in databases.items():
        data = ["--train_database", str(train), "--test_database", str(test), *common]
        jobs.append({"name": f"unet-{size}", "trainer": "unet",
                     "args": [*data, "--depth", "2", "--base_filters", "4", "--dropout", "0.0"]})
        if size in (1, 3, 5, 9):  # the heavier models on the shapes that once broke: 1, odd, partial
            jobs.append({"name": f"fc-densenet-{size}", "trainer": "unet",
                         "args": [*data, "--model", "fc-densenet", "--densenet_config", "56"]})
        if size in (1, 3):
            jobs.append({"name": f"maskrcnn-{size}", "trainer": "maskrcnn",
                         "args": [*data, "--preset", "small", "--eval_score_threshold", "0.0"]})
    return jobs


def test_every_test_size_evaluates_like_a_single_replica(databases, tmp_path):
    jobs = _jobs(databases)
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs), str(tmp_path)], capture_output=True,
                       text=True, timeout=840, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                                               "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULTS "))
    results = {x["name"]: x for x in json.loads(line[len("RESULTS "):])}
    assert set(results) == {j["name"] for j in jobs}
    for name, result in results.items():
        single, mirrored = result["1"], result["2"]
        assert single["replicas"] == 1 and mirrored["replicas"] == 2, name
        # differently ordered float reductions: equal up to rounding, never bit-equal by assumption
        assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-4, abs=1e-6), name
        assert set(mirrored["row"]) == set(single["row"]), name
        for key, value in single["row"].items():
            assert mirrored["row"][key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (name, key)
