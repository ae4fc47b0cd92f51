"""Train and test databases belong together: build ids, the all-or-nothing replacement of a set by
``--overwrite 1`` (kill -9 at each of its steps), and the trainers' pairing check."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import lmdb
import pytest

import build_lmdb
import train_unet
from conftest import ROOT, write_pairs
from enki_seg.data import records
from enki_seg.training.config import check_databases
from enki_seg.training.errors import TrainError

SET = ["manifest-ds.csv", "test-ds.lmdb", "train-ds.lmdb"]


def _build(images, masks, out, *extra):
    return build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder", str(out),
                            "--dataset_name", "ds", "--quiet", "--workers", "1", *map(str, extra)])


def _ids(out) -> dict[str, str]:
    """The build id of each visible item of the set ``ds`` in ``out``."""
    ids = {}
    for split in ("train", "test"):
        if (out / f"{split}-ds.lmdb").exists():
            ids[split] = records.read_metadata(str(out / f"{split}-ds.lmdb")).build_id
    if (out / "manifest-ds.csv").exists():
        with open(out / "manifest-ds.csv") as f:
            column = {row["build_id"] for row in csv.DictReader(f)}
        assert len(column) == 1
        ids["manifest"] = column.pop()
    return ids


def _config(train, test, allow=False):
    return train_unet.build_config(train_unet.parse_args(
        ["--train_database", str(train), "--test_database", str(test), "--output_dir", "unused",
         "--number_classes", "3", "--allow_foreign_test_database", str(int(allow))]))


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "src", count=6, size=32)


def test_build_id_is_in_both_databases_and_the_manifest(tmp_path, pairs, capsys):
    assert _build(*pairs, tmp_path / "out") == 0
    ids = _ids(tmp_path / "out")
    assert set(ids) == {"train", "test", "manifest"} and len(set(ids.values())) == 1
    assert f"build id {ids['train']}" in capsys.readouterr().out
    assert _build(*pairs, tmp_path / "out", "--overwrite", "1") == 0
    assert _ids(tmp_path / "out")["train"] != ids["train"]  # every build its own id


# stages of the replacement of the old set by the new one; the new set is complete in each
KILL_POINTS = ["before_journal", "journal_written", "aside:test-ds.lmdb", "aside:train-ds.lmdb",
               "in:train-ds.lmdb", "in:manifest-ds.csv", "in:test-ds.lmdb", "journal_removed"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_during_overwrite_never_leaves_a_mixed_pair(tmp_path, pairs, point, caplog):
    images, masks = pairs
    out = tmp_path / "out"
    assert _build(images, masks, out, "--seed", "0") == 0
    old_id = _ids(out)["train"]
    cmd = [sys.executable, str(ROOT / "build_lmdb.py"), "--image_folder", str(images), "--mask_folder", str(masks),
           "--output_folder", str(out), "--dataset_name", "ds", "--quiet", "--workers", "1", "--seed", "1",
           "--overwrite", "1"]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ENKI_TEST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ids = _ids(out)
    assert len(set(ids.values())) <= 1, f"killed at {point}: visible items of different builds {ids}"
    if "train" in ids and "test" in ids:
        check_databases(_config(out / "train-ds.lmdb", out / "test-ds.lmdb"))  # a usable pair is one build
    elif point == "aside:test-ds.lmdb":
        with pytest.raises(TrainError, match="run build_lmdb.py again"):
            check_databases(_config(out / "train-ds.lmdb", out / "test-ds.lmdb"))
    rolled_forward = point not in ("before_journal",)
    # the next run finishes (or discards) the killed one, then refuses to overwrite without the flag
    assert _build(images, masks, out, "--seed", "2") == 2
    assert "already exists" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == SET, "leftovers of the killed build"
    ids = _ids(out)
    assert len(set(ids.values())) == 1
    assert (ids["train"] != old_id) == rolled_forward
    check_databases(_config(out / "train-ds.lmdb", out / "test-ds.lmdb"))


def test_old_warnings_file_goes_with_the_old_set(tmp_path, pairs):
    out = tmp_path / "out"
    assert _build(*pairs, out) == 0
    (out / "warnings-ds.txt").write_text("a warning of the old build\n")
    assert _build(*pairs, out, "--overwrite", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == SET


def test_trainers_refuse_a_pair_of_two_builds(tmp_path, pairs):
    images, masks = pairs
    assert _build(images, masks, tmp_path / "a", "--seed", "0") == 0
    # most images in test: some of them must be train images of build a
    assert _build(images, masks, tmp_path / "b", "--seed", "1", "--train_fraction", "0.2") == 0
    a, b = _ids(tmp_path / "a")["train"], _ids(tmp_path / "b")["test"]
    mixed = (tmp_path / "a" / "train-ds.lmdb", tmp_path / "b" / "test-ds.lmdb")
    with pytest.raises(TrainError, match=f"from build {a} but --test_database .* from build {b}; .*"
                                         "--allow_foreign_test_database 1") as exc:
        check_databases(_config(*mixed))
    assert "\n" not in str(exc.value)
    with pytest.raises(TrainError, match=r"source image\(s\) of --test_database .* are also in --train_database"):
        check_databases(_config(*mixed, allow=True))
    # a deliberate pairing with a test database of other images is accepted
    other = write_pairs(tmp_path / "other", count=4, size=32, seed=7)
    assert _build(*other, tmp_path / "c") == 0
    foreign = (tmp_path / "a" / "train-ds.lmdb", tmp_path / "c" / "test-ds.lmdb")
    with pytest.raises(TrainError, match="--allow_foreign_test_database 1"):
        check_databases(_config(*foreign))
    check_databases(_config(*foreign, allow=True))


def test_trainers_refuse_the_train_database_as_test_database(tmp_path, pairs):
    out = tmp_path / "out"
    assert _build(*pairs, out) == 0
    train = out / "train-ds.lmdb"
    with pytest.raises(TrainError, match=f"--test_database {train} is the same database as --train_database .*"
                                         f"train split of build .*e.g. {out / 'test-ds.lmdb'}"):
        check_databases(_config(train, train))
    copy = tmp_path / "copy" / "train-ds.lmdb"  # a copy (node-local scratch) is still the same database
    shutil.copytree(train, copy)
    with pytest.raises(TrainError, match="is the same database as --train_database"):
        check_databases(_config(train, copy, allow=True))


def test_databases_without_build_id_are_read_with_a_warning(tmp_path, pairs, caplog):
    out = tmp_path / "out"
    assert _build(*pairs, out) == 0
    for split in ("train", "test"):  # as written before build ids existed
        path = out / f"{split}-ds.lmdb"
        meta = records.read_metadata(str(path))
        raw = meta.to_json().replace(f',"build_id":"{meta.build_id}"'.encode(), b"")
        assert b"build_id" not in raw
        with lmdb.open(str(path), subdir=True) as env, env.begin(write=True) as txn:
            txn.put(records.METADATA_KEY, raw)
        assert records.read_metadata(str(path)).build_id is None
    with caplog.at_level(logging.WARNING):
        check_databases(_config(out / "train-ds.lmdb", out / "test-ds.lmdb"))
    assert "no build id" in caplog.text


def test_a_live_replacement_is_not_touched(tmp_path, pairs, caplog):
    out = tmp_path / "out"
    assert _build(*pairs, out) == 0
    journal = out / ".replace-ds.json"  # as written by a build that is moving its set in right now
    journal.write_text(json.dumps({"build_id": "x", "pid": os.getppid(), "new": ".build-ds-1", "old": ".old-ds-1",
                                   "items": SET}))
    assert _build(*pairs, out, "--overwrite", "1") == 2
    assert f"pid {os.getppid()}) is replacing the ds set" in caplog.text
    assert journal.exists() and sorted(p.name for p in out.iterdir() if p != journal) == SET
