"""Benchmark: what the multi-worker loop's per-step agreement costs next to a training step.

    python bench/multiworker_bench.py [--steps 60]

Starts 2 workers on this machine with launch/local.py (MultiWorkerMirroredStrategy, TF_CONFIG on
loopback, one CPU replica each). Each builds loop.Trainer's agreement function (one scalar
all-reduce, so that a SIGUSR1 reaching one worker stops all; the trainer holds it every
preemption.PREEMPTION_CHECK_STEPS steps) and a small UNet train
step (depth 2, 8 filters, batch 2 of 64x64 per worker, synthetic in-memory data), then times both.
Loopback understates a network's latency and a CPU step overstates a GPU step, so read the ratio as a
lower bound for clusters with fast GPUs. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tensorflow as tf

    from enki_seg.training import losses
    import models

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = models.build_model("unet", input_channels=1, num_classes=2, depth=2, base_filters=8, dropout=0.0)
        import keras

        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(model.trainable_variables)
    loss_fn = losses.make_loss("cross_entropy", 2)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(2, 64, 64, 1)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 2, (2, 64, 64)).astype(np.int32))
    global_batch = 2 * strategy.num_replicas_in_sync

    def step_fn():
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_fn(labels, model(images, training=True)),
                                              global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def train_step():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn), axis=None)

    @tf.function
    def agree(values):  # as loop.Trainer._build_steps
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    flag = tf.constant([0.0], tf.float32)

    def timed(fn, count):
        for _ in range(3):
            fn().numpy()
        start = time.perf_counter()
        for _ in range(count):
            fn().numpy()  # the loop reads both every step (float(loss), the flag)
        return (time.perf_counter() - start) / count

    step_s = timed(train_step, steps)
    agree_s = timed(lambda: agree(flag), steps * 4)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    print(f"RESULT {index} {json.dumps({'step_ms': 1000 * step_s, 'agree_ms': 1000 * agree_s})}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.steps)
        return 0
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--num_workers", "2", "--timeout",
                             "500", "--", sys.executable, __file__, "--worker", "--steps", str(args.steps)],
                            capture_output=True, text=True, env=env, timeout=560)
    found = {int(i): json.loads(text) for i, text in re.findall(r"RESULT (\d) (\{.*\})", result.stdout)}
    if result.returncode != 0 or len(found) != 2:
        print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
        return 1
    step_ms = max(r["step_ms"] for r in found.values())
    agree_ms = max(r["agree_ms"] for r in found.values())
    print(f"2 workers on loopback: small UNet step {step_ms:.1f} ms, per-step agreement all-reduce "
          f"{agree_ms:.2f} ms ({100 * agree_ms / step_ms:.1f}% of a step)")
    sys.path.insert(0, str(ROOT))
    from enki_seg.training.preemption import PREEMPTION_CHECK_STEPS as every  # stdlib only: no TensorFlow

    print(f"amortized over the trainer's check every {every} steps: {100 * agree_ms / step_ms / every:.2f}% of step time")
    print(json.dumps({"step_ms": round(step_ms, 2), "agree_ms": round(agree_ms, 3),
                      "agree_vs_step": round(agree_ms / step_ms, 4),
                      "amortized_vs_step": round(agree_ms / step_ms / every, 5)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
