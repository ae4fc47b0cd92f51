"""``--gradient_clip_norm`` clips the global norm of the gradient summed over replicas (what the
optimizer applies), with the same threshold for 1 and 2 replicas, and under mixed_float16 loss scaling.

Runs in one subprocess with 2 logical CPU replicas (one TensorFlow device setup).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = r"""
import json
import numpy as np
from enki_seg.training import distribution
tf = distribution.configure_devices(cpu_replicas=2)
import keras
from enki_seg.training.distribution import clip_summed_gradients

CLIP = 1.0
# replica r's gradient for the one variable; their sum [6, 8] has norm 10, each part norm 5
PARTS = np.array([[3.0, 4.0], [3.0, 4.0]], np.float32)


def step(replicas, loss_scale=None):
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    with strategy.scope():
        var = tf.Variable([0.0, 0.0])
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
        optimizer.build([var])
    parts = PARTS if replicas == 2 else PARTS.sum(0, keepdims=True)

    @tf.function
    def run():
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            gradient = tf.gather(tf.constant(parts), r)
            if loss_scale is not None:
                gradient = gradient * loss_scale
            clipped = clip_summed_gradients([gradient], CLIP, loss_scale)
            if loss_scale is not None:
                clipped = [g / loss_scale for g in clipped]
            optimizer.apply(clipped, [var])
        strategy.run(replica_fn)
    run()
    return (-var.numpy()).tolist()  # SGD with rate 1: the applied (summed, clipped) gradient


def keras_global_clipnorm(replicas):
    # what the trainer did before: Keras clips each replica's part before the sum
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    with strategy.scope():
        var = tf.Variable([0.0, 0.0])
        optimizer = keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=CLIP)
        optimizer.build([var])

    @tf.function
    def run():
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            optimizer.apply([tf.gather(tf.constant(PARTS), r)], [var])
        strategy.run(replica_fn)
    run()
    return (-var.numpy()).tolist()


print(json.dumps({"one": step(1), "two": step(2), "two_scaled": step(2, 1024.0),
                  "keras_two": keras_global_clipnorm(2)}))
"""


def test_clip_applies_to_the_gradient_summed_over_replicas():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [0.6, 0.8]  # [6, 8] clipped to norm 1
    for name in ("one", "two", "two_scaled"):
        assert out[name] == pytest.approx(expected, abs=1e-5), (name, out)
    # the replica-wise clipping this replaces: each part clipped to norm 1, then summed -> norm 2
    assert out["keras_two"] == pytest.approx([1.2, 1.6], abs=1e-5)
