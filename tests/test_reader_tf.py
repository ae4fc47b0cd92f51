"""The tf.data adapter: fixed signature, exact test passes, and real MirroredStrategy over 2 CPUs.

This file imports TensorFlow (one import for the whole file); the reader itself never does.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tf():
    # imported here, not at collection: a process that has imported TensorFlow makes readers use
    # the forkserver start method, which would slow every other reader test in the session
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    from conftest import write_pairs

    import build_lmdb

    root = tmp_path_factory.mktemp("tfdb")
    images, masks = write_pairs(root / "src", count=10, size=32, classes=3)
    assert build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                            str(root / "lmdb"), "--dataset_name", "t", "--quiet", "--workers", "1",
                            "--train_fraction", "0.5"]) == 0
    return str(root / "lmdb" / "train-t.lmdb"), str(root / "lmdb" / "test-t.lmdb")


def test_tf_dataset_matches_direct_reader(databases, tf):
    from imagereader import ImageReader, ReaderConfig

    _, test = databases
    config = ReaderConfig(test, batch_size=2, num_workers=2, mode="test")
    with ImageReader(config) as direct:
        expected = [{k: v.copy() for k, v in b.items()} for b in direct]
    with ImageReader(config) as reader:
        dataset = reader.as_tf_dataset()
        spec = dataset.element_spec
        assert spec["image"].shape.as_list() == [None, 32, 32, 1] and spec["image"].dtype == tf.float32
        assert spec["semantic_mask"].dtype == tf.uint8
        for _ in range(2):  # one dataset iteration = one test pass, repeatable
            got = list(dataset.as_numpy_iterator())
            assert len(got) == len(expected) == 3
            for g, e in zip(got, expected):
                for key in e:
                    np.testing.assert_array_equal(g[key], e[key])


def test_tf_dataset_lends_slots_and_kept_batches_stay_intact(databases, tf):
    # batches reach TensorFlow without a copy (the slot is lent until its tensors are gone); a consumer
    # that keeps every tensor must still see each batch unchanged, and the reader must not stall
    from imagereader import ImageReader, ReaderConfig

    train, _ = databases
    config = ReaderConfig(train, batch_size=2, num_workers=2, seed=3)
    with ImageReader(config) as direct:
        expected = [{k: v.copy() for k, v in direct.next_batch().items()} for _ in range(14)]
    with ImageReader(config) as reader:
        kept = list(reader.as_tf_dataset().take(14))  # more batches than slots, all kept
        assert reader._lender.lent_batches >= 2 and reader._lender.copied_batches >= 1
        for got, want in zip(kept, expected):
            for key in want:
                np.testing.assert_array_equal(got[key].numpy(), want[key])
    with ImageReader(config) as reader:
        iterator = iter(reader.as_tf_dataset())
        for want in expected:
            got = next(iterator)
            np.testing.assert_array_equal(got["image"].numpy(), want["image"])
        del got
        lender = reader._lender
        assert lender.lent_batches > lender.copied_batches, (lender.lent_batches, lender.copied_batches)


MIRRORED_SCRIPT = """
import sys
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from imagereader import ImageReader, ReaderConfig

strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")][:2])
assert strategy.num_replicas_in_sync == 2
readers = []

def dataset_fn(input_context):
    per_replica = input_context.get_per_replica_batch_size(4)
    reader = ImageReader(ReaderConfig(sys.argv[1], batch_size=per_replica, num_workers=1, seed=0,
                                      shard_index=input_context.input_pipeline_id,
                                      num_shards=input_context.num_input_pipelines))
    readers.append(reader)
    return reader.start().as_tf_dataset()

dist = strategy.distribute_datasets_from_function(dataset_fn)

@tf.function
def step(batch):
    def replica_fn(b):
        return tf.shape(b["image"])[0], tf.reduce_sum(tf.cast(b["index"] >= 0, tf.int32))
    sizes, valid = strategy.run(replica_fn, args=(batch,))
    return (strategy.reduce(tf.distribute.ReduceOp.SUM, sizes, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, valid, axis=None))

iterator = iter(dist)
for _ in range(3):
    total, valid = step(next(iterator))
    assert int(total) == 4 and int(valid) == 4, (int(total), int(valid))  # 2 per replica x 2 replicas
del iterator, dist
for reader in readers:
    reader.close()
print("mirrored ok")
"""


def test_mirrored_strategy_distributes_reader_batches(databases, tmp_path):
    # its own process: logical devices can only be configured before TensorFlow initializes, and
    # other test files in this session may already have initialized it with one CPU
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    train, _ = databases
    result = subprocess.run([sys.executable, str(script), train], capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mirrored ok" in result.stdout
