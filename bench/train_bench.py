"""Benchmark: UNet training steps/s fed by the reader against the same loop fed from memory.

    python bench/train_bench.py [--data ../shared/data/nist-hes] [--steps 40]

One process, one TensorFlow import. A small UNet (depth 3, 16 base filters) trains on the NIST data
(256x256, batch 8) with train_unet's loss and optimizer, fed (1) by ImageReader.as_tf_dataset()
with NIST's default augmentation and 1 reader, and (2) by an in-memory dataset repeating one batch
of identical shape; the two are interleaved twice and the better of each kept. Then examples/s of
the full-size NIST UNet (depth 4, 64 filters) at 256x256 on this CPU. Then, in the same run:

* float32 against mixed_bfloat16 (the Keras policy ``--precision mixed_bfloat16`` sets) for the NIST
  UNet and the small UNet at 256x256 from memory (``bf16_vs_fp32_nist_unet``, ``bf16_vs_fp32_small_unet``;
  > 1 means bfloat16 is faster; the log says whether this CPU computes bfloat16 natively), and
  ``reader_vs_inmemory_bf16``: the reader feeding the small UNet in bfloat16;
* a tiny, dispatch-bound model (depth 1, 4 filters, 32x32, batch 2) run as the trainer runs it with
  ``--steps_per_execution`` 8 against 1 (``steps_per_execution_8_vs_1``: steps/s ratio).

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import augment  # noqa: E402
import build_lmdb  # noqa: E402
from imagereader import ImageReader, ReaderConfig  # noqa: E402


def _loop(tf, model, dataset, steps: int, batch: int) -> float:
    import keras

    from enki_seg.training import losses

    loss_fn = losses.make_loss("cross_entropy", 2)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_fn(labels, model(images, training=True)),
                                              global_batch_size=batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    iterator = iter(dataset)
    for _ in range(3):  # trace and warm up
        b = next(iterator)
        step(b["image"], b["semantic_mask"]).numpy()
    start = time.perf_counter()
    for _ in range(steps):
        b = next(iterator)
        loss = step(b["image"], b["semantic_mask"])
    loss.numpy()
    return steps / (time.perf_counter() - start)


def _steps_per_call(tf, model, batch, k: int, calls: int) -> float:
    """Steps/s of the trainer's pattern: k steps in one tf.function (tf.range loop, learning rates in)."""
    import keras

    from enki_seg.training import losses

    loss_fn = losses.make_loss("cross_entropy", 2)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    images, labels = tf.constant(batch["image"]), tf.constant(batch["semantic_mask"])
    dataset = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())

    def one(learning_rate):
        optimizer.learning_rate.assign(learning_rate)
        x, y = next(dataset)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    @tf.function(reduce_retracing=True)
    def call(rates):
        out = tf.TensorArray(tf.float32, size=tf.shape(rates)[0]).write(0, one(rates[0]))
        for i in tf.range(1, tf.shape(rates)[0]):
            out = out.write(i, one(rates[i]))
        return out.stack()

    rates = tf.constant([1e-4] * k, tf.float32)
    for _ in range(3):
        call(rates).numpy()
    start = time.perf_counter()
    for _ in range(calls):
        call(rates).numpy()  # the trainer reads the losses back once per call
    return calls * k / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nist-hes"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    import tensorflow as tf

    import models

    with tempfile.TemporaryDirectory() as tmp:
        assert build_lmdb.main(["--image_folder", f"{args.data}/images", "--mask_folder", f"{args.data}/masks",
                                "--output_folder", tmp, "--dataset_name", "b", "--quiet", "--workers", "1"]) == 0
        db = f"{tmp}/train-b.lmdb"
        config = ReaderConfig(db, batch_size=args.batch, num_workers=1, augment=augment.AugmentConfig(), seed=0)
        rates = {"reader": [], "memory": []}
        with ImageReader(config) as reader:
            first = {k: v.copy() for k, v in reader.next_batch().items()}
            reader_ds = reader.as_tf_dataset()
            memory_ds = tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in first.items()}).repeat()
            for _ in range(2):
                for name, dataset in (("memory", memory_ds), ("reader", reader_ds)):
                    tf.keras.utils.set_random_seed(0)
                    model = models.build_model("unet", input_channels=1, num_classes=2, depth=3, base_filters=16)
                    rates[name].append(_loop(tf, model, dataset, args.steps, args.batch))
            stats = reader.stats()
        best = {k: max(v) for k, v in rates.items()}
        full = models.build_model("unet", input_channels=1, num_classes=2)
        memory_full = tf.data.Dataset.from_tensors({k: tf.constant(v[:2]) for k, v in first.items()}).repeat()
        full_steps_s = _loop(tf, full, memory_full, 5, 2)
        import keras

        from enki_seg.training.distribution import native_bfloat16

        native, why = native_bfloat16()
        memory_8 = tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in first.items()}).repeat()
        precision = {}
        for policy in ("float32", "mixed_bfloat16"):
            keras.mixed_precision.set_global_policy(policy)
            tf.keras.utils.set_random_seed(0)
            small = models.build_model("unet", input_channels=1, num_classes=2, depth=3, base_filters=16)
            precision[f"small_{policy}"] = _loop(tf, small, memory_8, args.steps // 2, args.batch)
            if policy == "mixed_bfloat16":
                tf.keras.utils.set_random_seed(0)
                small = models.build_model("unet", input_channels=1, num_classes=2, depth=3, base_filters=16)
                with ImageReader(config) as bf16_reader:
                    precision["small_reader_mixed_bfloat16"] = _loop(tf, small, bf16_reader.as_tf_dataset(),
                                                                     args.steps // 2, args.batch)
            nist = models.build_model("unet", input_channels=1, num_classes=2)
            precision[f"nist_{policy}"] = _loop(tf, nist, memory_full, 5, 2)
        keras.mixed_precision.set_global_policy("float32")
        tiny_batch = {k: v[:2, :32, :32] if v.ndim >= 3 else v[:2] for k, v in first.items()}
        dispatch = {}
        for k in (1, 8):
            tf.keras.utils.set_random_seed(0)
            tiny = models.build_model("unet", input_channels=1, num_classes=2, depth=1, base_filters=4)
            dispatch[k] = _steps_per_call(tf, tiny, tiny_batch, k, calls=max(4, 400 // k))
    ratio = best["reader"] / best["memory"]
    print(f"small UNet (depth 3, 16 filters), 256x256, batch {args.batch}, {args.steps} steps, best of 2")
    print(f"{'fed by':18s} {'steps/s':>8s}")
    print(f"{'in-memory batch':18s} {best['memory']:8.2f}")
    print(f"{'reader (1 worker)':18s} {best['reader']:8.2f}   ratio {ratio:.3f}   "
          f"reader wait {100 * stats['wait_fraction']:.1f}% of its life")
    print(f"full NIST UNet (depth 4, 64 filters) at 256x256 on CPU: {full_steps_s * 2:.2f} img/s (batch 2)")
    print(f"bfloat16 natively: {native} ({why})")
    for name in ("nist", "small"):
        print(f"{name} UNet steps/s: float32 {precision[name + '_float32']:.3f}, mixed_bfloat16 "
              f"{precision[name + '_mixed_bfloat16']:.3f}")
    print(f"small UNet, mixed_bfloat16, reader-fed {precision['small_reader_mixed_bfloat16']:.3f} steps/s")
    print(f"tiny model, steps/s: 1 step per call {dispatch[1]:.1f}, 8 per call {dispatch[8]:.1f}")
    print(json.dumps({"reader_vs_inmemory": round(ratio, 3), "unet256_img_s": round(full_steps_s * 2, 3),
                      "reader_steps_s": round(best["reader"], 3), "inmemory_steps_s": round(best["memory"], 3),
                      "batch": args.batch, "bfloat16_native": native,
                      "bf16_vs_fp32_nist_unet": round(precision["nist_mixed_bfloat16"] / precision["nist_float32"], 3),
                      "bf16_vs_fp32_small_unet": round(precision["small_mixed_bfloat16"] / precision["small_float32"], 3),
                      "reader_vs_inmemory_bf16": round(precision["small_reader_mixed_bfloat16"]
                                                       / precision["small_mixed_bfloat16"], 3),
                      "steps_per_execution_8_vs_1": round(dispatch[8] / dispatch[1], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
