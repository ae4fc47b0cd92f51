"""Shared fixtures: repository root on sys.path, the real NIST data, tiny synthetic datasets."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from slurm_helpers import slurm_cluster  # noqa: E402,F401  (session fixture: one private SLURM cluster)

SHARED_DATA = ROOT.parent / "shared" / "data" / "nist-hes"


@pytest.hookimpl(tryfirst=True)  # before pytest applies -m
def pytest_collection_modifyitems(items):
    """Every `slurm` test is also `slow`, so `-m "not slow"` (the quick tier) never needs a cluster."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def nist_hes() -> Path:
    """../shared/data/nist-hes; skipped when absent, unless ENKI_REQUIRE_SHARED=1 (CI) makes it fatal."""
    if not (SHARED_DATA / "images").is_dir():
        if os.environ.get("ENKI_REQUIRE_SHARED") == "1":
            pytest.fail(f"ENKI_REQUIRE_SHARED=1 but {SHARED_DATA} is missing")
        pytest.skip(f"real data not found at {SHARED_DATA} (a user's clone without ../shared)")
    return SHARED_DATA


DSB_DATA = ROOT.parent / "shared" / "data" / "dsb2018-fluo"


@pytest.fixture(scope="session")
def dsb2018() -> Path:
    """../shared/data/dsb2018-fluo (real fluorescence nuclei, instance labels); skipped when absent,
    unless ENKI_REQUIRE_SHARED=1 (CI) makes it fatal."""
    if not (DSB_DATA / "images").is_dir():
        if os.environ.get("ENKI_REQUIRE_SHARED") == "1":
            pytest.fail(f"ENKI_REQUIRE_SHARED=1 but {DSB_DATA} is missing")
        pytest.skip(f"real data not found at {DSB_DATA} (a user's clone without ../shared)")
    return DSB_DATA


def write_pairs(folder: Path, count: int = 4, size: int = 64, channels: int = 1, dtype=np.uint16,
                classes: int = 3, seed: int = 0, mask_ext: str = ".png", image_ext: str = ".tif"):
    """Write `count` random image/mask pairs; returns (image_folder, mask_folder)."""
    import imagecodecs
    import tifffile

    rng = np.random.default_rng(seed)
    images = folder / "images"
    masks = folder / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = (size, size) if channels == 1 else (size, size, channels)
        if np.dtype(dtype).kind == "f":
            image = rng.normal(size=shape).astype(dtype)
        else:
            image = rng.integers(0, min(np.iinfo(dtype).max, 60000), size=shape).astype(dtype)
        mask = rng.integers(0, classes, size=(size, size)).astype(np.uint8)
        if image_ext == ".tif":
            tifffile.imwrite(images / f"img{i:03d}.tif", image,
                             photometric="minisblack", planarconfig="contig" if channels > 1 else None)
        else:
            imagecodecs.imwrite(str(images / f"img{i:03d}{image_ext}"), image)
        if mask_ext == ".png":
            imagecodecs.imwrite(str(masks / f"img{i:03d}.png"), mask)
        else:
            tifffile.imwrite(masks / f"img{i:03d}{mask_ext}", mask)
    return images, masks


def build_blocks_db(root: Path, count: int = 24, seed: int = 0, train_fraction: float = 0.75) -> Path:
    """Learnable 32x32 data: bright rectangles (class 1) on a dark textured background, built into
    ROOT/lmdb/{train,test}-b.lmdb with the project's builder; returns the lmdb folder."""
    import imagecodecs
    import tifffile

    import build_lmdb

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.zeros((32, 32), np.uint8)
        y, x = rng.integers(0, 16, 2)
        mask[y: y + rng.integers(8, 16), x: x + rng.integers(8, 16)] = 1
        image = (mask.astype(np.uint16) * 800 + 200 + rng.integers(0, 100, (32, 32))).astype(np.uint16)
        tifffile.imwrite(root / "images" / f"b{i:02d}.tif", image)
        imagecodecs.imwrite(str(root / "masks" / f"b{i:02d}.png"), mask)
    assert build_lmdb.main(["--image_folder", str(root / "images"), "--mask_folder", str(root / "masks"),
                            "--output_folder", str(root / "lmdb"), "--dataset_name", "b", "--quiet",
                            "--workers", "1", "--train_fraction", str(train_fraction)]) == 0
    return root / "lmdb"

