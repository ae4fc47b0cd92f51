"""A full output disk while building, checkpointing and writing inference outputs: one line naming the
file and the fix, a non-zero exit, nothing half-written, the previous checkpoint still usable.

Where the tests run as root, a real small tmpfs is filled (``small_disk``); elsewhere those tests are
skipped and the monkeypatched ENOSPC tests still cover each path.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import build_lmdb
from conftest import write_pairs
from enki_seg import exit_codes, files
from enki_seg.data import build as build_module
from enki_seg.inference import core

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs mount rights: root); unmounted afterwards."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                capture_output=True, timeout=30)
    except OSError:
        result = None
    if result is None or result.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            f.write(b"\0" * (1 << 20))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _one_error_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]


# ---------------------------------------------------------------- build_lmdb.py


def test_build_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk, caplog):
    """Before: a raw ``lmdb.Error: mdb_txn_commit: Input/output error`` traceback."""
    images, masks = write_pairs(tmp_path / "src", count=6, size=256)
    out = small_disk / "out"
    out.mkdir()
    rc = build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                          str(out), "--quiet", "--workers", "1"])
    assert rc == exit_codes.FAILED
    line = _one_error_line(caplog)
    assert f"cannot write {out / 'train-dataset.lmdb'}" in line and "free space" in line and "--output_folder" in line
    assert list(out.iterdir()) == []


def test_build_manifest_on_a_full_disk(tmp_path, monkeypatch, caplog):
    """ENOSPC while the manifest is written (the databases fit): same single line, nothing left."""
    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(build_module, "write_manifest", no_space)
    images, masks = write_pairs(tmp_path / "src", count=4, size=64)
    out = tmp_path / "out"
    rc = build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                          str(out), "--quiet", "--workers", "1"])
    assert rc == exit_codes.FAILED
    assert "No space left on device" in _one_error_line(caplog)
    assert not out.exists()


# ---------------------------------------------------------------- inference outputs


def test_atomic_outputs_on_a_full_disk_raise_write_error_and_leave_no_temporary(tmp_path):
    target = tmp_path / "labels.tif"
    with pytest.raises(files.WriteError, match=f"cannot write {target}: No space left on device.*free space"):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with files.atomic_path(target):
            raise ValueError("not a disk problem")


def test_inference_writers_on_a_real_full_disk(small_disk):
    from enki_seg.inference import semantic

    labels = np.random.default_rng(0).integers(0, 3, (300, 300)).astype(np.uint8)
    core.write_labels(small_disk / "first.png", labels)  # fits
    _fill(small_disk)
    with pytest.raises(files.WriteError, match="second.png: No space left on device"):
        core.write_labels(small_disk / "second.png", labels)
    # the probability map is a memory map: without the reservation a full disk is a SIGBUS, not an error
    with pytest.raises(files.WriteError, match="probabilities.tif: No space left on device"):
        with files.atomic_path(small_disk / "probabilities.tif") as tmp:
            semantic.open_probabilities(tmp, 3, 300, 300)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "first.png"]


def test_a_full_disk_stops_the_image_loop_instead_of_failing_every_image(tmp_path, monkeypatch):
    job = core.Job.__new__(core.Job)
    job.files, job.failures = [tmp_path / "a.tif", tmp_path / "b.tif"], []
    job.run = type("Run", (), {"channels": 1, "input_dtype": None})()
    seen = []

    def handle(path, image):
        seen.append(path.name)
        raise files.WriteError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(core, "read_ahead", lambda paths: ((p, np.zeros((4, 4, 1), np.uint8)) for p in paths))
    with pytest.raises(files.WriteError):
        core.process_images(job, handle)
    assert seen == ["a.tif"] and job.failures == []


# ---------------------------------------------------------------- checkpoints


def _manager(folder):
    import tensorflow as tf

    variable = tf.Variable(np.zeros((100, 100), np.float32))  # 40 kB
    checkpoint = tf.train.Checkpoint(v=variable)
    return variable, checkpoint, tf.train.CheckpointManager(checkpoint, str(folder), max_to_keep=2)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one_usable(small_disk):
    import tensorflow as tf

    from enki_seg.training.run_folder import save_checkpoint

    variable, checkpoint, manager = _manager(small_disk / "checkpoints")
    first = save_checkpoint(manager, 1, None)
    _fill(small_disk)
    variable.assign(np.ones((100, 100), np.float32))
    with pytest.raises(files.WriteError, match=r"checkpoint .*ckpt-2: No space left on device.*ckpt-1 is kept.*resume"):
        save_checkpoint(manager, 2, first)
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == [
        "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]  # TensorFlow's ckpt-2_temp is gone
    assert tf.train.latest_checkpoint(str(small_disk / "checkpoints")) == first
    checkpoint.restore(first).assert_existing_objects_matched()
    assert float(variable.numpy().sum()) == 0.0


def test_checkpoint_write_error_without_a_small_disk(tmp_path, monkeypatch):
    """The same path where no tmpfs can be mounted: the manager's save fails as TensorFlow's does."""
    import tensorflow as tf

    from enki_seg.training.run_folder import save_checkpoint

    variable, checkpoint, manager = _manager(tmp_path / "checkpoints")
    first = save_checkpoint(manager, 1, None)

    def full(checkpoint_number):
        (tmp_path / "checkpoints" / f"ckpt-{checkpoint_number}_temp").mkdir()
        raise tf.errors.ResourceExhaustedError(None, None, "ckpt-2_temp/part-0; No space left on device [Op:SaveV2]")

    monkeypatch.setattr(manager, "save", full)
    with pytest.raises(files.WriteError, match="ckpt-1 is kept"):
        save_checkpoint(manager, 2, first)
    assert not (tmp_path / "checkpoints" / "ckpt-2_temp").exists()
    monkeypatch.setattr(manager, "save", lambda checkpoint_number: (_ for _ in ()).throw(
        tf.errors.InvalidArgumentError(None, None, "a bug, not a disk")))
    with pytest.raises(tf.errors.InvalidArgumentError):  # other errors are not disguised as a full disk
        save_checkpoint(manager, 3, first)
