"""The record format: round trips, zero-copy decoding, corruption errors, metadata."""
from __future__ import annotations

import itertools

import lmdb
import numpy as np
import pytest

from enki_seg.data import records


def _example(dtype, channels, instances, rng, size=(17, 23)):
    h, w = size
    if np.dtype(dtype).kind == "f":
        image = rng.normal(size=(h, w, channels)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        image = rng.integers(info.min, info.max, size=(h, w, channels), dtype=dtype, endpoint=True)
    mask = rng.integers(0, 5, size=(h, w)).astype(np.uint8)
    inst = classes = None
    if instances:
        inst = rng.integers(0, 4, size=(h, w)).astype(np.uint16)
        classes = np.array([1, 2, 1, 3], np.int32)
    return records.Example(image, mask, inst, classes)


@pytest.mark.parametrize(
    "dtype,channels,compression",
    list(itertools.product(records.IMAGE_DTYPES, (1, 3, 5), sorted(records.CODECS))),
)
def test_round_trip_every_dtype_channel_codec(dtype, channels, compression):
    rng = np.random.default_rng(0)
    for instances in (False, True):
        ex = _example(dtype, channels, instances, rng)
        value = records.encode_example(ex, compression)
        back = records.decode_example(value, b"00000001")
        assert back.image.dtype == ex.image.dtype and back.image.shape == ex.image.shape
        np.testing.assert_array_equal(back.image, ex.image)
        np.testing.assert_array_equal(back.semantic_mask, ex.semantic_mask)
        assert back.semantic_mask.dtype == ex.semantic_mask.dtype
        if instances:
            np.testing.assert_array_equal(back.instance_labels, ex.instance_labels)
            np.testing.assert_array_equal(back.instance_classes, ex.instance_classes)
        else:
            assert back.instance_labels is None and back.instance_classes is None


@pytest.mark.parametrize("label_dtype", records.LABEL_DTYPES)
def test_label_dtypes_round_trip(label_dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=(8, 8, 1), dtype=np.uint8)
    mask = rng.integers(0, 300 if label_dtype != "uint8" else 200, size=(8, 8)).astype(label_dtype)
    for compression in records.CODECS:
        back = records.decode_example(records.encode_example(records.Example(image, mask), compression))
        np.testing.assert_array_equal(back.semantic_mask, mask)
        assert back.semantic_mask.dtype == mask.dtype


def test_decode_is_zero_copy_from_lmdb_buffer(tmp_path):
    rng = np.random.default_rng(2)
    ex = _example("uint16", 2, True, rng, size=(64, 64))
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(records.record_key(0), records.encode_example(ex))
    with env.begin(buffers=True) as txn:
        buf = txn.get(records.record_key(0))
        assert isinstance(buf, memoryview)
        start = np.frombuffer(buf, np.uint8).ctypes.data
        end = start + len(buf)
        back = records.decode_example(buf, b"00000000")
        for array in (back.image, back.semantic_mask, back.instance_labels):
            assert start <= array.ctypes.data < end, "array was copied out of the LMDB buffer"
            assert not array.flags.writeable
            assert array.ctypes.data % 16 == (start % 16)  # payloads are 16-byte aligned in the value
        np.testing.assert_array_equal(back.image, ex.image)
    env.close()


def test_corrupt_records_name_the_key():
    ex = _example("uint8", 1, False, np.random.default_rng(3))
    value = records.encode_example(ex)
    with pytest.raises(records.RecordError, match="00000007.*truncated|00000007.*too short|00000007.*past"):
        records.decode_example(value[: len(value) // 2], b"00000007")
    with pytest.raises(records.RecordError, match="00000007.*bad magic"):
        records.decode_example(b"XXXX" + value[4:], b"00000007")
    with pytest.raises(records.RecordError, match="00000007.*schema version 9"):
        records.decode_example(value[:4] + (9).to_bytes(2, "little") + value[6:], b"00000007")
    with pytest.raises(records.RecordError, match="00000007.*too short"):
        records.decode_example(b"EN", b"00000007")
    zvalue = records.encode_example(ex, "zstd")
    damaged = bytearray(zvalue)
    damaged[-20:] = b"\xff" * 20
    with pytest.raises(records.RecordError, match="00000007"):
        records.decode_example(bytes(damaged), b"00000007")


def test_encode_rejects_inconsistent_examples():
    image = np.zeros((8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        records.encode_example(records.Example(image, np.zeros((8, 9), np.uint8)))
    with pytest.raises(ValueError, match="dtype"):
        records.encode_example(records.Example(image.astype(np.float64), np.zeros((8, 8), np.uint8)))
    with pytest.raises(ValueError, match="compression"):
        records.encode_example(records.Example(image, np.zeros((8, 8), np.uint8)), "gzip9")


def test_metadata_round_trip():
    meta = records.DatasetMetadata(
        record_count=2, image_dtype="uint16", channels=1, tile_size=128, record_height=128,
        record_width=128, mask_dtype="uint8", has_instances=False, class_ids=[0, 1],
        class_records={0: [0, 1], 1: [1]}, class_pixel_counts={0: 10, 1: 5},
        channel_stats={"mean": [1.0], "std": [2.0], "min": [0.0], "max": [9.0]}, split="train",
        split_seed=4, compression="none", build_args={"tile_size": 128},
        sources=[records.RecordSource("a.tif", "a.png", 0, 0, 128, 128),
                 records.RecordSource("a.tif", "a.png", 0, 128, 128, 128)],
        number_classes=2, class_names={1: "cell"},
    )
    back = records.DatasetMetadata.from_json(meta.to_json())
    assert back == meta
    bad = meta.to_json().replace(b'"schema_version":1', b'"schema_version":99')
    with pytest.raises(records.RecordError, match="schema version 99"):
        records.DatasetMetadata.from_json(bad)


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(5)
    parts = [rng.normal(1000, 50, size=(n, 7, 3)) for n in (3, 11, 1)]
    stats = records.ChannelStats(3)
    for part in parts:
        stats.add(part)
    everything = np.concatenate([p.reshape(-1, 3) for p in parts])
    got = stats.as_dict()
    np.testing.assert_allclose(got["mean"], everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["std"], everything.std(0), rtol=1e-9)
    np.testing.assert_allclose(got["min"], everything.min(0))
    np.testing.assert_allclose(got["max"], everything.max(0))


def test_keys_sort_in_index_order():
    keys = [records.record_key(i) for i in (0, 9, 10, 99999, 1234567)]
    assert keys == sorted(keys)
    assert [records.key_index(k) for k in keys] == [0, 9, 10, 99999, 1234567]


# ---------------------------------------------------------------- damaged databases


@pytest.fixture
def built_database(tmp_path):
    """A small train database built by build_lmdb.py (4 records of 64x64)."""
    import build_lmdb
    from conftest import write_pairs

    images, masks = write_pairs(tmp_path / "src", count=6, size=64)
    out = tmp_path / "out"
    assert build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                            str(out), "--quiet", "--workers", "1", "--dataset_name", "d"]) == 0
    return out / "train-d.lmdb"


def test_truncated_data_mdb_is_one_error_not_a_bus_error(built_database):
    """Reading past the end of a truncated data.mdb through LMDB's memory map kills the process with
    SIGBUS; the size is checked against LMDB's own index when the database is opened."""
    data = built_database / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    for open_it in (lambda: records.read_metadata(str(built_database)),
                    lambda: records.Database(built_database).read(0)):
        with pytest.raises(records.RecordError, match="is truncated.*copy it again or rebuild it"):
            open_it()
    data.write_bytes(b"")
    with pytest.raises(records.RecordError, match="cannot be opened.*rebuild it with build_lmdb.py"):
        records.read_metadata(str(built_database))


def test_corrupt_page_names_the_database_and_the_fix(built_database):
    data = built_database / "data.mdb"
    with open(data, "r+b") as f:  # overwrite the pages after the two meta pages: the tree's pages
        f.seek(2 * 4096)
        f.write(np.random.default_rng(0).integers(0, 256, data.stat().st_size - 2 * 4096, np.uint8).tobytes())
    with pytest.raises(records.RecordError, match=f"{built_database} is corrupt.*rebuild it"):
        records.read_metadata(str(built_database))


def test_database_without_read_permission_names_the_fix(built_database, monkeypatch):
    import os

    real_access = os.access
    # (the tests may run as root, for whom chmod 000 changes nothing: deny the check itself)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(built_database) else real_access(p, mode))
    with pytest.raises(records.RecordError, match=r"no read permission on .*chmod -R u\+rX"):
        records.read_metadata(str(built_database))


def test_trainer_check_reports_a_damaged_database_in_one_line(built_database):
    from enki_seg.training.config import BaseTrainConfig, check_databases
    from enki_seg.training.errors import TrainError

    data = built_database / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    config = BaseTrainConfig(train_database=str(built_database), test_database=str(built_database.with_name("test-d.lmdb")),
                             number_classes=3)
    with pytest.raises(TrainError, match="--train_database: database .* is truncated"):
        check_databases(config)
