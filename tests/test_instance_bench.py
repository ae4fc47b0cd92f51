"""bench/instance_accuracy.py end to end on a handful of real DSB2018 nuclei images and a few steps: the
split, the CLIs it runs and its last line (one JSON object with the figures the README quotes). A check
that the benchmark runs, not an accuracy figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_instance_accuracy_bench_runs_and_prints_its_figures(dsb2018, tmp_path):
    data = tmp_path / "data"
    names = sorted(p.name for p in (dsb2018 / "images").glob("*.png"))[:12]
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for name in names:
            (data / sub / name).symlink_to(dsb2018 / sub / name)
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "bench/instance_accuracy.py", "--data", str(data), "--work_dir", str(work),
         "--max_steps", "4", "--test_every_n_steps", "2", "--tile_size", "64", "--batch_size", "2",
         "--inference_tile_size", "128", "--validation_fraction", "0.2", "--tta", "flips", "--precision", "float32"],
        capture_output=True, text=True, timeout=550, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["method"] == "boundary" and figures["steps"] == 4 and figures["tta"] == "flips"
    assert (figures["validation_images"], figures["train_images"]) == (2, 10)
    assert figures["normalization"] == "percentile/image" and figures["precision"] == "float32"
    for name in ("accuracy_iou50", "accuracy_iou75", "dsb_mean", "mask_AP", "mask_AP50"):
        assert 0.0 <= figures[name] <= 1.0, (name, figures[name])
    assert figures["train_seconds"] > 0
    # the split is by image and seeded: the validation images are not among the training images
    validation = {p.name for p in (work / "validation" / "images").iterdir()}
    assert len(validation) == 2 and not validation & {p.name for p in (work / "train" / "images").iterdir()}
    assert "test-time augmentation flips" in (work / "inference.log").read_text()
