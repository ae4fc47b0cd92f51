"""The reader engine: exact passes and epochs, determinism, sampling, alignment, failures, cleanup."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import imagecodecs
import lmdb
import numpy as np
import pytest
import tifffile

import augment
import build_lmdb
from enki_seg.data import records
from conftest import ROOT
from imagereader import (STARVATION_MESSAGE, STARVATION_OVER_MESSAGE, ImageReader, ReaderConfig,
                         ReaderError)
from enki_seg.data.normalization import Normalization

pytestmark = pytest.mark.timeout(120)  # every reader test is bounded (pytest-timeout)


def _build(root: Path, images: dict, masks: dict, instances: dict | None = None, name="r",
           train_fraction="0.5", tile=None):
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, image in images.items():
        tifffile.imwrite(root / "images" / f"{stem}.tif", image)
        imagecodecs.imwrite(str(root / "masks" / f"{stem}.png"), masks[stem])
        if instances is not None:
            tifffile.imwrite(root / "instances" / f"{stem}.tif", instances[stem])
    argv = ["--image_folder", str(root / "images"), "--mask_folder", str(root / "masks"),
            "--output_folder", str(root / "lmdb"), "--dataset_name", name, "--quiet", "--workers", "1",
            "--train_fraction", train_fraction]
    if instances is not None:
        argv += ["--instance_folder", str(root / "instances")]
    if tile:
        argv += ["--use_tiling", "1", "--tile_size", str(tile)]
    assert build_lmdb.main(argv) == 0
    return root / "lmdb" / f"train-{name}.lmdb", root / "lmdb" / f"test-{name}.lmdb"


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    """22 train + 22 test records of 32x32, 3 classes, image = f(mask) + texture."""
    root = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    images, masks = {}, {}
    for i in range(44):
        mask = np.zeros((32, 32), np.uint8)
        mask[rng.integers(0, 16) :, rng.integers(0, 16) : 24] = 1
        if i % 4 == 0:  # class 2 is rare: one image in four
            mask[20:28, 2:10] = 2
        images[f"s{i:02d}"] = (mask.astype(np.uint16) * 1000 + rng.integers(0, 50, (32, 32))).astype(np.uint16)
        masks[f"s{i:02d}"] = mask
    return _build(root, images, masks)


def _hash(batch, row):
    h = hashlib.sha1()
    h.update(batch["image"][row].tobytes())
    h.update(batch["semantic_mask"][row].tobytes())
    return h.hexdigest()


def _collect(config, batches):
    out = []
    with ImageReader(config) as reader:
        for _ in range(batches):
            batch = reader.next_batch()
            out += [(int(batch["index"][r]), _hash(batch, r)) for r in range(len(batch["index"]))]
    return out


# ---------------------------------------------------------------- sampling


def test_test_pass_reads_every_record_once_in_order(small_db):
    _, test = small_db
    n = records.read_metadata(str(test)).record_count
    config = ReaderConfig(str(test), batch_size=5, num_workers=3, mode="test")
    with ImageReader(config) as reader:
        passes = []
        for _ in range(3):
            batches = [(b["index"].copy(), b["image"].copy()) for b in reader]
            assert [len(i) for i, _ in batches] == [5, 5, 5, 5, 2]  # last batch partial
            passes.append(batches)
    order = np.concatenate([i for i, _ in passes[0]])
    np.testing.assert_array_equal(order, np.arange(n))
    for other in passes[1:]:
        for (i0, im0), (i1, im1) in zip(passes[0], other):
            np.testing.assert_array_equal(i0, i1)
            np.testing.assert_array_equal(im0, im1)


def test_train_epochs_are_exact(small_db):
    train, _ = small_db
    n = records.read_metadata(str(train)).record_count
    config = ReaderConfig(str(train), batch_size=4, num_workers=2, seed=3)  # 4 does not divide 22
    indices = [i for i, _ in _collect(config, batches=math_ceil(3 * n, 4))][: 3 * n]
    epochs = [indices[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1], "each epoch is shuffled anew"


def math_ceil(a, b):
    return -(-a // b)


def test_same_seed_same_examples_with_1_or_3_workers_and_spawn(small_db):
    train, _ = small_db
    base = ReaderConfig(str(train), batch_size=4, num_workers=1, seed=11,
                        augment=augment.AugmentConfig(noise=0.05, intensity=0.1, elastic_alpha=2.0))
    one = _collect(base, 12)  # default start method (forkserver)
    three = _collect(ReaderConfig(**{**base.__dict__, "num_workers": 3}), 12)
    spawned = _collect(ReaderConfig(**{**base.__dict__, "num_workers": 2, "start_method": "spawn"}), 12)
    assert one == three == spawned
    # plain fork is only safe in a parent that has not run OpenCV's threads; check it in a clean one
    forked = _run_script(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_imagereader import _collect
        from imagereader import ReaderConfig
        import augment
        config = ReaderConfig({str(train)!r}, batch_size=4, num_workers=2, seed=11, start_method="fork",
                              augment=augment.AugmentConfig(noise=0.05, intensity=0.1, elastic_alpha=2.0))
        print(json.dumps(_collect(config, 12)))
    """)
    assert forked.returncode == 0, forked.stderr
    assert [tuple(x) for x in json.loads(forked.stdout.strip().splitlines()[-1])] == one
    other_seed = _collect(ReaderConfig(**{**base.__dict__, "seed": 12}), 12)
    assert one != other_seed
    assert len({h for _, h in one}) == len(one), "no two examples are augmentation clones"


def test_resume_continues_the_same_stream(small_db):
    train, _ = small_db
    config = ReaderConfig(str(train), batch_size=4, num_workers=2, seed=5,
                          augment=augment.AugmentConfig())
    full = _collect(config, 10)
    with ImageReader(config) as reader:
        for _ in range(4):
            reader.next_batch()
        position = reader.position
    assert position == 16
    resumed = _collect(ReaderConfig(**{**config.__dict__, "start_position": position}), 6)
    assert resumed == full[16:]


def test_shards_are_disjoint_and_cover(small_db):
    _, test = small_db
    n = records.read_metadata(str(test)).record_count
    seen = []
    for shard in range(3):
        config = ReaderConfig(str(test), batch_size=4, mode="test", shard_index=shard, num_shards=3)
        with ImageReader(config) as reader:
            seen.append({int(i) for b in reader for i in b["index"]})
    assert sum(len(s) for s in seen) == n
    assert set().union(*seen) == set(range(n))


def test_balanced_sampling_draws_each_class_about_equally(small_db):
    train, _ = small_db
    meta = records.read_metadata(str(train))
    config = ReaderConfig(str(train), batch_size=8, num_workers=2, balance_classes=True, seed=1)
    with ImageReader(config) as reader:
        draws = [int(i) for _ in range(150) for i in reader.next_batch()["index"]]
    rare = set(meta.class_records[2])
    assert len(rare) < meta.record_count / 3
    # a class is chosen uniformly, then a record holding it: a record holding the rare class is
    # drawn with probability sum_c 1/K * |rare & R_c| / |R_c|
    share_rare = sum(d in rare for d in draws) / len(draws)
    groups = [set(r) for r in meta.class_records.values()]
    expected = sum(len(rare & g) / len(g) for g in groups) / len(groups)
    assert abs(share_rare - expected) < 0.05, (share_rare, expected)
    shuffled = ReaderConfig(str(train), batch_size=8, num_workers=1, seed=1)
    with ImageReader(shuffled) as reader:
        plain = [int(i) for _ in range(150) for i in reader.next_batch()["index"]]
    assert sum(d in rare for d in plain) / len(plain) < share_rare - 0.1


# ---------------------------------------------------------------- augmentation through the reader


@pytest.mark.parametrize("elastic", [0.0, 3.0])
def test_augmented_masks_stay_aligned_and_keep_their_labels(small_db, elastic):
    train, _ = small_db
    config = ReaderConfig(str(train), batch_size=8, num_workers=2, seed=2,
                          normalization=Normalization("none"),
                          augment=augment.AugmentConfig(noise=0.0, blur_max_sigma=0.0, scale=0.2,
                                                        elastic_alpha=elastic, crop_and_resize=0.2))
    wrong = total = 0
    with ImageReader(config) as reader:
        for _ in range(10):
            batch = reader.next_batch()
            masks, images = batch["semantic_mask"], batch["image"][..., 0]
            assert set(np.unique(masks)) <= {0, 1, 2}
            # the image is mask * 1000 + texture < 50: inside a region, the warped image value must
            # say the same class as the warped mask (bilinear mixing only at region borders)
            interior = _interior(masks)
            wrong += int((np.round(images[interior] / 1000) != masks[interior]).sum())
            total += int(interior.sum())
    assert total > 10000
    # Bilinear (image) and nearest (labels) sampling legitimately disagree at a few region corners
    # near the reflected border; a shift of one pixel or more would break thousands of pixels.
    assert wrong <= total * 1e-3, (wrong, total)


def _interior(masks):
    """Pixels whose 3x3 neighbourhood has one label."""
    from scipy import ndimage

    out = np.zeros(masks.shape, bool)
    for b, mask in enumerate(masks):
        lo = ndimage.minimum_filter(mask, size=3)
        hi = ndimage.maximum_filter(mask, size=3)
        out[b] = lo == hi
    return out


def test_instances_boxes_match_warped_labels(tmp_path):
    rng = np.random.default_rng(4)
    images, masks, instances = {}, {}, {}
    for i in range(6):
        inst = np.zeros((48, 48), np.uint16)
        inst[5:20, 5:25] = 1
        inst[20:30, 5:25] = 2  # touches 1
        inst[30:45, 30:46] = 3
        sem = np.where(inst == 2, 2, (inst > 0).astype(np.uint8)).astype(np.uint8)
        images[f"i{i}"] = (inst * 100 + rng.integers(0, 9, inst.shape)).astype(np.uint16)
        masks[f"i{i}"], instances[f"i{i}"] = sem, inst
    train, _ = _build(tmp_path, images, masks, instances)
    config = ReaderConfig(str(train), batch_size=3, num_workers=2, max_instances=2,
                          augment=augment.AugmentConfig(jitter=0.3))
    with ImageReader(config) as reader:
        for _ in range(8):
            batch = reader.next_batch()
            for row in range(3):
                labels = batch["instance_labels"][row]
                n = int(batch["num_instances"][row])
                assert n <= 2 and labels.max() == n
                for k in range(n):
                    ys, xs = np.nonzero(labels == k + 1)
                    np.testing.assert_array_equal(batch["boxes"][row, k],
                                                  [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
                    cls = batch["box_classes"][row, k]
                    assert np.all(batch["semantic_mask"][row][labels == k + 1] == cls)
                assert np.all(batch["boxes"][row, n:] == 0)


# ---------------------------------------------------------------- failures and cleanup


def _children():
    import multiprocessing

    return multiprocessing.active_children()


def _shm_entries():
    return {p for p in os.listdir("/dev/shm") if p.startswith("enki-reader-")} if os.path.isdir("/dev/shm") else set()


def test_worker_exception_reaches_consumer_with_traceback(small_db):
    train, _ = small_db
    # a 2-channel normalization on a 1-channel database raises inside the worker
    config = ReaderConfig(str(train), batch_size=4, num_workers=2,
                          normalization=Normalization("dataset", [0.0, 0.0], [1.0, 1.0]))
    start = time.monotonic()
    with pytest.raises(ReaderError) as info:
        with ImageReader(config) as reader:
            reader.next_batch()
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "dataset normalization has 2 channel(s), image has 1" in message
    assert "worker traceback" in message and "_fill_row" in message
    assert not _children()


def test_worker_killed_by_sigkill_is_reported(small_db):
    train, _ = small_db
    config = ReaderConfig(str(train), batch_size=4, num_workers=2, augment=augment.AugmentConfig())
    with ImageReader(config) as reader:
        reader.next_batch()
        os.kill(reader._processes[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ReaderError, match="SIGKILL"):
            for _ in range(1000):
                reader.next_batch()
        assert time.monotonic() - start < 5
    assert not _children()


def test_workers_outlive_signals_meant_for_the_trainer(small_db):
    """SLURM's SIGUSR1 warning, SIGTERM on preemption and Ctrl-C often reach the trainer's whole process
    group; the workers must keep serving so the trainer can finish its step and write a checkpoint."""
    train, _ = small_db
    config = ReaderConfig(str(train), batch_size=4, num_workers=2)
    with ImageReader(config) as reader:
        reader.next_batch()
        from multiprocessing import forkserver

        forkserver_pid = forkserver._forkserver._forkserver_pid  # the workers' parent with forkserver
        for pid in [proc.pid for proc in reader._processes] + ([forkserver_pid] if forkserver_pid else []):
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                os.kill(pid, sig)
        for _ in range(20):
            reader.next_batch()
        assert all(proc.is_alive() for proc in reader._processes)
        start = time.monotonic()
    assert time.monotonic() - start < 5  # close() still stops them
    assert not _children()


def test_hung_worker_is_reported_after_stall_timeout(small_db):
    train, _ = small_db
    config = ReaderConfig(str(train), batch_size=4, num_workers=2, stall_timeout=2.0)
    with ImageReader(config) as reader:
        reader.next_batch()
        os.kill(reader._processes[1].pid, signal.SIGSTOP)  # alive but never answers
        start = time.monotonic()
        with pytest.raises(ReaderError, match="no batch from reader worker 1 for 2 s although it is alive"):
            for _ in range(1000):
                reader.next_batch()
        assert time.monotonic() - start < 10
    assert not _children()


def _corrupt(db: Path, index: int) -> Path:
    env = lmdb.open(str(db), map_size=1 << 30)
    with env.begin(write=True) as txn:
        value = bytes(txn.get(records.record_key(index)))
        txn.put(records.record_key(index), value[: len(value) // 2])
    env.close()
    return db


def test_corrupt_record_names_its_key_or_is_skipped(small_db, tmp_path, caplog):
    import shutil

    _, test = small_db
    copy = tmp_path / "copy.lmdb"
    shutil.copytree(test, copy)
    _corrupt(copy, 7)
    with pytest.raises(ReaderError, match="record 00000007.*truncated|record 00000007.*past the end"):
        with ImageReader(ReaderConfig(str(copy), batch_size=4, mode="test", num_workers=2)) as reader:
            list(reader)
    caplog.set_level(logging.WARNING)
    # skipped within the shard and within exact-once: every other record of the shard once, the skip counted
    for shard in range(2):
        config = ReaderConfig(str(copy), batch_size=4, mode="test", skip_corrupt=True, shard_index=shard,
                              num_shards=2)
        with ImageReader(config) as reader:
            for _ in range(2):
                indices = [int(i) for b in reader for i in b["index"]]
                expected = [i for i in range(shard, 22, 2) if i != 7]
                assert indices == expected
                assert reader.pass_skipped_records == (1 if shard == 1 else 0)
    with ImageReader(ReaderConfig(str(copy), batch_size=4, mode="test", skip_corrupt=True, shard_index=1,
                                  num_shards=2, batches_per_pass=3)) as reader:  # padded: the row is padding
        batches = list(reader)
        valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
        assert sorted(np.concatenate([b["index"] for b in batches])[valid].tolist()) == [1, 3, 5, 9, 11, 13, 15,
                                                                                          17, 19, 21]
        assert reader.stats()["skipped_records"] == 1
    with ImageReader(ReaderConfig(str(copy), batch_size=4, mode="train", skip_corrupt=True, shard_index=1,
                                  num_shards=2, seed=0)) as reader:  # train: the shard's next record instead
        drawn = [int(i) for _ in range(6) for i in reader.next_batch()["index"]]
        assert 7 not in drawn and all(i % 2 == 1 for i in drawn)
    assert any("00000007" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_consumer_exception_stops_workers_and_frees_memory(small_db):
    train, _ = small_db
    before = _shm_entries()
    config = ReaderConfig(str(train), batch_size=4, num_workers=2, start_method="spawn")
    with pytest.raises(KeyboardInterrupt):
        with ImageReader(config) as reader:
            reader.next_batch()
            pids = [p.pid for p in reader._processes]
            raise KeyboardInterrupt
    assert not _children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _shm_entries() == before


def test_hundred_start_stop_cycles_leave_nothing(small_db):
    train, _ = small_db
    before = _shm_entries()
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(100):
        config = ReaderConfig(str(train), batch_size=2, num_workers=2)
        with ImageReader(config) as reader:
            if i % 2:
                reader.next_batch()
    assert not _children()
    assert _shm_entries() == before
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2


def _run_script(code: str, timeout: float = 60):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_process_that_forgets_close_still_exits(small_db):
    train, _ = small_db
    result = _run_script(f"""
        from imagereader import ImageReader, ReaderConfig
        reader = ImageReader(ReaderConfig({str(train)!r}, batch_size=2, num_workers=2)).start()
        reader.next_batch()
        print("done")
    """, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout


def test_script_without_main_guard_works_and_workers_skip_its_imports(small_db, tmp_path):
    # spawn/forkserver children normally re-run the user's script; reader workers must not
    train, _ = small_db
    marker = tmp_path / "imported"
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        with open({str(marker)!r}, "a") as f:
            f.write(str(os.getpid()) + "\\n")
        from imagereader import ImageReader, ReaderConfig
        with ImageReader(ReaderConfig({str(train)!r}, batch_size=2, num_workers=2)) as reader:
            print(reader.next_batch()["image"].shape)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(2, 32, 32, 1)" in result.stdout
    assert len(marker.read_text().split()) == 1, "a worker re-ran the user's script"


def test_importing_reader_or_augment_does_not_import_tensorflow():
    result = _run_script("""
        import sys, imagereader, augment
        from enki_seg.data import records, normalization
        assert "tensorflow" not in sys.modules, "tensorflow imported"
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_starvation_messages(small_db, caplog):
    train, _ = small_db
    caplog.set_level(logging.WARNING, logger="imagereader")
    config = ReaderConfig(str(train), batch_size=8, num_workers=1, slots_per_worker=4,
                          augment=augment.AugmentConfig(elastic_alpha=3.0))
    with ImageReader(config) as reader:
        for _ in range(12):  # consume as fast as possible: the queue runs dry
            reader.next_batch()
        messages = [r.getMessage() for r in caplog.records]
        assert STARVATION_MESSAGE in messages
        deadline = time.monotonic() + 20
        while STARVATION_OVER_MESSAGE not in [r.getMessage() for r in caplog.records]:
            assert time.monotonic() < deadline
            time.sleep(0.3)  # a slow consumer lets the queue fill up again
            reader.next_batch()
        stats = reader.stats()
        assert stats["starvation_events"] >= 1 and stats["wait_seconds"] > 0
        assert "reader" in reader.suggestion()


def test_config_errors(small_db, tmp_path):
    train, _ = small_db
    with pytest.raises(ValueError, match="mode"):
        ReaderConfig(str(train), mode="eval")
    with pytest.raises(ReaderError, match="not a multiple of the model's size multiple 64"):
        ImageReader(ReaderConfig(str(train), size_multiple=64))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageReader(ReaderConfig(str(tmp_path / "nope.lmdb")))


# ---------------------------------------------------------------- real data


def test_real_nist_data_test_pass_and_determinism(tmp_path, nist_hes):
    argv = ["--image_folder", str(nist_hes / "images"), "--mask_folder", str(nist_hes / "masks"),
            "--output_folder", str(tmp_path), "--dataset_name", "hes", "--quiet", "--workers", "1"]
    assert build_lmdb.main(argv) == 0
    test = tmp_path / "test-hes.lmdb"
    with ImageReader(ReaderConfig(str(test), batch_size=6, num_workers=2, mode="test")) as reader:
        seen = [int(i) for b in reader for i in b["index"]]
        assert seen == list(range(20))
        batch = next(iter(reader))
        image = batch["image"][0, ..., 0]
        assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3  # z-score
    train = str(tmp_path / "train-hes.lmdb")
    config = ReaderConfig(train, batch_size=4, num_workers=1, seed=7, augment=augment.AugmentConfig())
    assert _collect(config, 6) == _collect(ReaderConfig(**{**config.__dict__, "num_workers": 2}), 6)
    with ImageReader(config) as reader:
        counts = Counter()
        for _ in range(5):
            counts.update(np.unique(reader.next_batch()["semantic_mask"]).tolist())
    assert set(counts) <= {0, 1}


def test_padded_test_passes_give_every_shard_the_same_full_batches(small_db):
    """batches_per_pass: every shard yields exactly N full batches; padding rows are valid 0, index -1,
    zeros; the records are each seen once over the shards (what distributed test steps rely on)."""
    from enki_seg.training import loop as trainer

    _, test = small_db  # 22 records
    shards, per_replica, replicas = 3, 2, 2
    n = trainer.test_batches_per_pass(22, shards, per_replica, replicas)
    assert n == 4  # largest shard 8 records = 2 steps of 2 replicas x 2
    seen = []
    for shard in range(shards):
        config = ReaderConfig(str(test), batch_size=per_replica, mode="test", shard_index=shard,
                              num_shards=shards, batches_per_pass=n)
        with ImageReader(config) as reader:
            for _ in range(2):  # two passes, identical
                batches = [{k: v.copy() for k, v in b.items()} for b in reader]
                assert len(batches) == n and all(len(b["index"]) == per_replica for b in batches)
                valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
                index = np.concatenate([b["index"] for b in batches])
                assert np.all(index[~valid] == -1) and np.all(index[valid] >= 0)
                padding = [b["image"][~b["valid"].astype(bool)] for b in batches]
                assert all(np.all(p == 0) for p in padding)
            seen += index[valid].tolist()
    assert sorted(seen) == list(range(22))
    assert trainer.test_batches_per_pass(1, 2, 2, 2) == 2  # one record, an empty shard: still one step
    with ImageReader(ReaderConfig(str(test), batch_size=2, mode="test", shard_index=1, num_shards=30,
                                  batches_per_pass=1)) as reader:
        (batch,) = list(reader)
        assert batch["valid"].tolist() == [1, 0]
    with ImageReader(ReaderConfig(str(test), batch_size=2, mode="test", shard_index=25, num_shards=30,
                                  batches_per_pass=1)) as reader:  # an empty shard: padding only
        (batch,) = list(reader)
        assert batch["valid"].tolist() == [0, 0] and batch["index"].tolist() == [-1, -1]
    with pytest.raises(ReaderError, match="batches_per_pass=1"):
        with ImageReader(ReaderConfig(str(test), batch_size=2, mode="test", batches_per_pass=1)) as reader:
            list(reader)


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_workers_never_outlive_a_killed_consumer(small_db, method):
    """kill -9 of the consumer: its workers (and the forkserver) notice through their pipes and exit;
    no process and no shared-memory entry is left after a few seconds."""
    train, _ = small_db
    before = _shm_entries()
    code = textwrap.dedent(f"""
        import sys, time
        from multiprocessing import forkserver
        from imagereader import ImageReader, ReaderConfig
        reader = ImageReader(ReaderConfig({str(train)!r}, batch_size=2, num_workers=2,
                                          start_method={method!r})).start()
        reader.next_batch()
        pids = [p.pid for p in reader._processes]
        server = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if {method!r} == "forkserver" and server:
            pids.append(server)
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(120)
    """)
    consumer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pids = [int(p) for p in consumer.stdout.readline().split()]
        assert len(pids) == (3 if method == "forkserver" else 2), pids
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait(timeout=10)

        def alive(pid):
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # zombies are gone
            except (FileNotFoundError, IndexError):
                return False

        deadline = time.monotonic() + 8
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "a reader process outlived its consumer"
        assert _shm_entries() <= before
    finally:
        consumer.kill()
        consumer.wait()


def test_boundary_targets_follow_the_augmented_instance_labels(tmp_path):
    """instance_target="boundary": semantic_mask is background/interior/boundary of the warped instances."""
    from enki_seg.data.instance_targets import boundary_classes

    rng = np.random.default_rng(3)
    images, masks, instances = {}, {}, {}
    for i in range(4):
        inst = np.zeros((32, 32), np.uint16)
        inst[4:14, 4:14], inst[4:14, 14:24], inst[18:28, 6:20] = 1, 2, 3
        images[f"b{i}"] = (inst > 0).astype(np.uint16) * 900 + rng.integers(0, 90, (32, 32)).astype(np.uint16)
        masks[f"b{i}"], instances[f"b{i}"] = (inst > 0).astype(np.uint8), inst
    train, _ = _build(tmp_path, images, masks, instances)
    config = ReaderConfig(str(train), batch_size=2, augment=augment.AugmentConfig(), instance_target="boundary",
                          max_instances=8, seed=1)
    with ImageReader(config) as reader:
        for _ in range(4):
            batch = reader.next_batch()
            for row in range(2):
                np.testing.assert_array_equal(batch["semantic_mask"][row],
                                              boundary_classes(batch["instance_labels"][row]))
                assert {0, 1, 2} <= set(np.unique(batch["semantic_mask"][row]).tolist())
    plain, _ = _build(tmp_path / "plain", images, masks)
    with pytest.raises(ReaderError, match="no instance labels.*--instance_folder"):
        ImageReader(ReaderConfig(str(plain), instance_target="boundary"))
    with pytest.raises(ValueError, match="instance_target"):
        ReaderConfig(str(plain), instance_target="stars")


def test_image_scope_normalization_uses_the_source_images_statistics(tmp_path):
    """Tiled records normalized with scope "image" equal the whole source image normalized, then cut
    (the statistics build_lmdb.py stored); per-tile scope differs. Old databases without stored
    statistics are refused naming the fix."""
    rng = np.random.default_rng(7)
    images, masks = {}, {}
    for i in range(4):
        ramp = np.linspace(0, 3000 * (i + 1), 64)[None, :]
        images[f"t{i}"] = (rng.gamma(2.0, 200.0, (64, 64)) + ramp).astype(np.uint16)
        masks[f"t{i}"] = (images[f"t{i}"] > 1500).astype(np.uint8)
    train, _ = _build(tmp_path, images, masks, tile=32)
    meta = records.read_metadata(str(train))
    norm = Normalization("percentile", scope="image", percentiles=[1, 99.8])
    config = ReaderConfig(str(train), batch_size=4, num_workers=1, mode="test", normalization=norm)
    seen = 0
    with ImageReader(config) as reader:
        for batch in reader:
            for row, index in enumerate(batch["index"]):
                src = meta.sources[int(index)]
                image = images[Path(src.image).stem][:, :, None]
                whole = norm.apply(image, affine=norm.affine_from_image(image))
                expected = whole[src.y: src.y + src.height, src.x: src.x + src.width]
                np.testing.assert_allclose(batch["image"][row], expected, rtol=1e-5, atol=1e-5)
                per_tile = Normalization("percentile").apply(image[src.y: src.y + 32, src.x: src.x + 32])
                assert not np.allclose(per_tile, expected, atol=1e-3)
                seen += 1
    assert seen == meta.record_count == 8

    # a database built before per-image statistics existed
    old = tmp_path / "old.lmdb"
    shutil.copytree(train, old)
    meta.source_stats = {}
    with lmdb.open(str(old), map_size=1 << 26) as env, env.begin(write=True) as txn:
        txn.put(records.METADATA_KEY, meta.to_json())
    with pytest.raises(ReaderError, match="no per-image statistics.*rebuild"):
        ImageReader(ReaderConfig(str(old), batch_size=4, num_workers=1, mode="test", normalization=norm))


def _find_window(source: np.ndarray, window: np.ndarray):
    """(y, x) where ``window`` lies in ``source``, or None."""
    h, w = window.shape[:2]
    for y in range(source.shape[0] - h + 1):
        for x in range(source.shape[1] - w + 1):
            if np.array_equal(source[y: y + h, x: x + w], window):
                return y, x
    return None


def test_untiled_records_of_several_sizes_are_cropped_to_one_shape(tmp_path):
    """An untiled database of images of several sizes trains: every example is a seeded window of its
    record (random in train mode, the same in every test pass), labels and boxes follow the window, and
    a record smaller than the crop is zero padded."""
    rng = np.random.default_rng(11)
    images, masks, instances = {}, {}, {}
    for i, (h, w) in enumerate([(40, 56), (64, 64), (48, 80), (72, 44)]):
        labels = np.zeros((h, w), np.uint16)
        for k in range(1, 5):
            y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
            labels[y: y + 8, x: x + 9] = k
        instances[f"v{i}"] = labels
        masks[f"v{i}"] = (labels > 0).astype(np.uint8)
        images[f"v{i}"] = rng.integers(0, 60000, (h, w)).astype(np.uint16)  # unique windows
    train, _ = _build(tmp_path, images, masks, instances, train_fraction="0.75")
    meta = records.read_metadata(str(train))
    assert meta.record_height is None
    with pytest.raises(ReaderError, match="records differ in size; give a crop_shape"):
        ImageReader(ReaderConfig(str(train), batch_size=2, mode="test"))
    shape = records.crop_shape(meta, 0, 8)
    smallest = (min(s.height for s in meta.sources), min(s.width for s in meta.sources))
    assert shape == (smallest[0] - smallest[0] % 8, smallest[1] - smallest[1] % 8)

    def check(batch):
        for row, index in enumerate(batch["index"]):
            stem = Path(meta.sources[int(index)].image).stem
            image = batch["image"][row, ..., 0]
            assert image.shape == shape
            where = _find_window(images[stem].astype(np.float32), image)
            assert where is not None
            y, x = where
            assert tuple(batch["crop_origin"][row]) == (y, x)
            window = (slice(y, y + shape[0]), slice(x, x + shape[1]))
            np.testing.assert_array_equal(batch["semantic_mask"][row], masks[stem][window])
            labels = batch["instance_labels"][row]
            np.testing.assert_array_equal(labels > 0, instances[stem][window] > 0)
            for k in range(1, int(batch["num_instances"][row]) + 1):  # each box is its object's extent
                ys, xs = np.nonzero(labels == k)
                np.testing.assert_array_equal(batch["boxes"][row, k - 1], [ys.min(), xs.min(), ys.max() + 1,
                                                                           xs.max() + 1])

    none = Normalization("none")
    train_config = ReaderConfig(str(train), batch_size=3, num_workers=2, crop_shape=shape, normalization=none,
                                max_instances=8, seed=3)
    with ImageReader(train_config) as reader:
        windows = []
        for _ in range(6):
            batch = reader.next_batch()
            check(batch)
            windows += [batch["image"][r].tobytes() for r in range(3)]
    assert len(set(windows)) > len(meta.sources)  # random windows, not one per record
    one_worker = [(i, h) for i, h in _collect(dataclasses.replace(train_config, num_workers=1), 6)]
    two_workers = [(i, h) for i, h in _collect(train_config, 6)]
    assert one_worker == two_workers  # seeded: the same windows with any number of workers

    test_config = ReaderConfig(str(train), batch_size=2, mode="test", crop_shape=shape, normalization=none,
                               max_instances=8)
    with ImageReader(test_config) as reader:
        passes = [[b["image"].copy() for b in reader] for _ in range(2)]
        for batch in reader:
            check(batch)
    for a, b in zip(*passes):
        np.testing.assert_array_equal(a, b)  # the same windows in every test pass

    padded = ReaderConfig(str(train), batch_size=3, mode="test", crop_shape=(64, 64), normalization=none)
    with ImageReader(padded) as reader:
        batch = {k: v.copy() for k, v in reader.next_batch().items()}  # views die with the reader
    for row, index in enumerate(batch["index"]):
        src = meta.sources[int(index)]
        if src.height < 64:
            assert not batch["image"][row, src.height:].any() and not batch["semantic_mask"][row, src.height:].any()


def test_a_batch_kept_after_close_stays_readable(small_db):
    """Views are documented as valid until the next batch, but a batch used after the reader closed
    (``with ImageReader(...) as r: batch = r.next_batch()``, then ``batch`` below) must not crash the
    process: the mapping outlives close() while a view of it lives. It used to segfault."""
    train, _ = small_db
    code = f"""
        import numpy as np
        from imagereader import ImageReader, ReaderConfig
        with ImageReader(ReaderConfig({str(train)!r}, batch_size=4, num_workers=1)) as reader:
            batch = reader.next_batch()
        print(int(batch["index"].sum()), float(np.abs(batch["image"]).sum()) > 0)
        del batch
        print("ok")
    """
    result = _run_script(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "ok"
