"""Trains a UNet or FC-DenseNet on LMDB databases built by build_lmdb.py, with MirroredStrategy.

    python train_unet.py --train_database lmdb/train-hes.lmdb --test_database lmdb/test-hes.lmdb \\
        --output_dir runs/hes --batch_size 8 --number_classes 2 --learning_rate 1e-4 \\
        --test_every_n_steps 1000 --early_stopping 10 --reader_count 1 --use_augmentation 1

NIST's flags keep their meaning (batch size and reader count are per replica and scale with the
number of GPUs). Every test interval evaluates the whole test database once; training stops when the
monitored value has not improved by 1e-4 for --early_stopping intervals, or at --max_steps. The best
model is exported as model.keras and saved_model/ with config.json (everything inference needs).

SIGTERM or SIGUSR1 (SLURM's warning before a time limit) finishes the current step, writes a full
checkpoint and exits with code 75; the same command (or --resume 1) continues from it. NaN loss
stops the run with code 3, keeping the last good checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import augment
import metrics as seg_metrics
import records
import train_common as common
from imagereader import ImageReader, ReaderConfig
from normalization import METHODS as NORMALIZATIONS
from normalization import Normalization
from train_common import TrainError

logger = logging.getLogger("train_unet")


@dataclass
class TrainConfig:
    """All settings of a run; saved in config.json. Flags map onto these fields one to one."""

    train_database: str = ""
    test_database: str = ""
    output_dir: str = ""
    batch_size: int = 8                  # per replica
    number_classes: int = 2
    learning_rate: float = 1e-4
    test_every_n_steps: int = 1000
    balance_classes: bool = False
    use_augmentation: bool = True
    early_stopping: int = 10             # test intervals without improvement; 0 = never stop early
    reader_count: int = 1                # reader processes per replica
    model: str = "unet"                  # unet | fc-densenet
    depth: int = 4                       # unet: pooling levels
    base_filters: int = 64               # unet: filters of the first level, doubling per level
    dropout: float = 0.5                 # unet: dropout at the deepest levels
    densenet_config: str = "56"          # fc-densenet: 56 | 67 | 103
    augmentation_config: str | None = None
    augmentation: dict = field(default_factory=dict)  # overrides of AugmentConfig fields
    normalization: str = "zscore"
    seed: int = 0
    mixed_precision: bool = False
    max_steps: int | None = None
    loss: str = "cross_entropy"
    class_weights: list[float] | None = None
    optimizer: str = "adam"
    momentum: float = 0.9                # sgd (and rmsprop)
    lr_schedule: str = "constant"
    lr_decay_steps: list[int] | None = None
    warmup_steps: int | None = None      # None: NIST's, the first test interval (at most 1000 steps)
    weight_decay: float = 0.0
    monitor: str = "loss"                # loss | iou | dice
    deterministic: bool = False
    cpu_replicas: int = 0                # >1: MirroredStrategy over that many logical CPUs (no GPU)
    log_every: int = 10
    test_images: int = 3                 # test images shown in TensorBoard each interval

    def resolved_warmup(self) -> int:
        return min(self.test_every_n_steps, 1000) if self.warmup_steps is None else self.warmup_steps

    def augment_config(self) -> augment.AugmentConfig | None:
        if not self.use_augmentation:
            return None
        base = augment.AugmentConfig.from_file(self.augmentation_config) if self.augmentation_config \
            else augment.AugmentConfig()
        return augment.AugmentConfig.from_dict({**base.to_dict(), **self.augmentation})


_BOOL_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("bool",)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_unet", description="Train a UNet/FC-DenseNet segmentation model.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON/YAML file of TrainConfig fields; flags override it")
    p.add_argument("--train_database", help="train LMDB (required)")
    p.add_argument("--test_database", help="test LMDB (required)")
    p.add_argument("--output_dir", help="run folder (required)")
    p.add_argument("--batch_size", type=int, help="per-replica batch size (default 8)")
    p.add_argument("--number_classes", type=int, help="classes including background (default 2)")
    p.add_argument("--learning_rate", type=float, help="default 1e-4")
    p.add_argument("--test_every_n_steps", type=int, help="steps between test intervals (default 1000)")
    p.add_argument("--balance_classes", type=int, choices=(0, 1), help="class-balanced sampling")
    p.add_argument("--use_augmentation", type=int, choices=(0, 1), help="default 1")
    p.add_argument("--early_stopping", type=int, help="intervals without improvement before stopping (10)")
    p.add_argument("--reader_count", type=int, help="reader processes per replica (default 1)")
    p.add_argument("--model", choices=("unet", "fc-densenet"))
    p.add_argument("--depth", type=int, help="unet pooling levels (4)")
    p.add_argument("--base_filters", type=int, help="unet first-level filters (64)")
    p.add_argument("--dropout", type=float, help="unet dropout at the deepest levels (0.5)")
    p.add_argument("--densenet_config", choices=("56", "67", "103"))
    p.add_argument("--augmentation_config", help="JSON/YAML file of augmentation settings")
    p.add_argument("--augment", action="append", metavar="KEY=VALUE",
                   help="override one augmentation setting, e.g. --augment rotation=false --augment jitter=0.2")
    p.add_argument("--normalization", choices=NORMALIZATIONS)
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed_precision", type=int, choices=(0, 1))
    p.add_argument("--max_steps", type=int)
    p.add_argument("--loss", choices=("cross_entropy", "dice", "cross_entropy+dice"))
    p.add_argument("--class_weights", type=float, nargs="+")
    p.add_argument("--optimizer", choices=("adam", "sgd", "rmsprop"))
    p.add_argument("--momentum", type=float)
    p.add_argument("--lr_schedule", choices=("constant", "cosine", "step", "polynomial"))
    p.add_argument("--lr_decay_steps", type=int, nargs="+", help="steps of the 'step' schedule")
    p.add_argument("--warmup_steps", type=int, help="steps at a tenth of the learning rate")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--monitor", choices=("loss", "iou", "dice"), help="early-stopping value (loss)")
    p.add_argument("--deterministic", type=int, choices=(0, 1), help="TF op determinism + seeded reader")
    p.add_argument("--cpu_replicas", type=int, help="MirroredStrategy over N logical CPUs (no GPU)")
    p.add_argument("--log_every", type=int)
    p.add_argument("--test_images", type=int)
    p.add_argument("--resume", type=int, choices=(0, 1), default=0,
                   help="continue the run in --output_dir (also automatic when the settings match)")
    return p.parse_args(argv)


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def build_config(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise TrainError(f"--config {path} does not exist")
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise TrainError(f"--config {path} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainError(f"--config {args.config}: unknown setting(s) {unknown}; valid: {sorted(known)}")
    for key, value in vars(args).items():
        if key in known:
            values[key] = bool(value) if key in _BOOL_FIELDS else value
    for item in getattr(args, "augment", None) or []:
        if "=" not in item:
            raise TrainError(f"--augment {item!r} must be KEY=VALUE")
        key, value = item.split("=", 1)
        values.setdefault("augmentation", {})
        values["augmentation"] = {**values["augmentation"], key.strip(): _parse_value(value)}
    config = TrainConfig(**values)
    for name in ("train_database", "test_database", "output_dir"):
        if not getattr(config, name):
            raise TrainError(f"--{name} is required")
    try:
        config.augment_config()
    except (ValueError, OSError) as exc:
        raise TrainError(f"augmentation settings: {exc}") from None
    if config.monitor not in ("loss", "iou", "dice"):
        raise TrainError(f"--monitor {config.monitor!r} must be loss, iou or dice")
    if config.class_weights is not None and len(config.class_weights) != config.number_classes:
        raise TrainError(f"--class_weights has {len(config.class_weights)} values but --number_classes is "
                         f"{config.number_classes}")
    if config.lr_schedule != "constant" and config.max_steps is None:
        raise TrainError(f"--lr_schedule {config.lr_schedule} needs --max_steps")
    return config


def check_databases(config: TrainConfig):
    """Errors before any work: missing databases, mismatched channels/dtype, too few classes."""
    metas = {}
    for name in ("train_database", "test_database"):
        path = getattr(config, name)
        if not Path(path).is_dir():
            raise TrainError(f"--{name} {path} does not exist (build it with build_lmdb.py)")
        try:
            metas[name] = records.read_metadata(path)
        except records.RecordError as exc:
            raise TrainError(f"--{name}: {exc}") from None
    train, test = metas["train_database"], metas["test_database"]
    if (train.channels, train.image_dtype) != (test.channels, test.image_dtype):
        raise TrainError(
            f"train database {config.train_database} has {train.channels} channel(s) of {train.image_dtype} but "
            f"test database {config.test_database} has {test.channels} of {test.image_dtype}; build both "
            "from the same kind of images"
        )
    found = sorted(set(train.class_ids) | set(test.class_ids))
    if found and max(found) >= config.number_classes:
        raise TrainError(
            f"the databases hold class ids {found} but --number_classes is {config.number_classes}; "
            f"use --number_classes {max(found) + 1}"
        )
    return train, test


def build_model(config: TrainConfig, channels: int):
    import models

    if config.model == "unet":
        options = dict(depth=config.depth, base_filters=config.base_filters, dropout=config.dropout)
    else:
        options = dict(config=config.densenet_config)
    return models.build_model(config.model, input_channels=channels, num_classes=config.number_classes,
                              **options)


def make_optimizer(config: TrainConfig):
    import keras

    kwargs = dict(learning_rate=config.learning_rate)
    if config.weight_decay:
        kwargs["weight_decay"] = config.weight_decay
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**kwargs)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=config.momentum, **kwargs)
    else:
        optimizer = keras.optimizers.RMSprop(momentum=config.momentum, **kwargs)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class Trainer:
    """One training run: strategy, model, readers, loop, checkpoints, logs, exports."""

    def __init__(self, config: TrainConfig, train_meta, test_meta, resume: bool):
        self.config = config
        self.train_meta, self.test_meta = train_meta, test_meta
        self.folder = common.RunFolder(config.output_dir)
        self.resume = resume
        self.readers: list[ImageReader] = []

    # -- setup

    def setup(self):
        cfg = self.config
        tf = common.configure_devices(cfg.cpu_replicas, cfg.deterministic, cfg.seed, cfg.mixed_precision)
        import losses

        self.tf = tf
        self.strategy = common.make_strategy(cfg.cpu_replicas)
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = cfg.batch_size * self.replicas
        self.normalization = Normalization.from_metadata(cfg.normalization, self.train_meta)
        with self.strategy.scope():
            self.model = build_model(cfg, self.train_meta.channels)
            size_multiple = int(getattr(self.model, "size_multiple", 1))
            for meta, name in ((self.train_meta, cfg.train_database), (self.test_meta, cfg.test_database)):
                if meta.record_height is None or meta.record_height % size_multiple or \
                        meta.record_width % size_multiple:
                    raise TrainError(
                        f"{name}: records are {meta.record_height}x{meta.record_width}, not a multiple of the "
                        f"model's size multiple {size_multiple}; rebuild with --use_tiling 1 and a "
                        f"--tile_size that is a multiple of {size_multiple}")
            self.optimizer = make_optimizer(cfg)
            self.optimizer.build(self.model.trainable_variables)
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.size_multiple = size_multiple
        self.loss_fn = losses.make_loss(cfg.loss, cfg.number_classes, cfg.class_weights)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step_var)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.folder.checkpoints), max_to_keep=2)
        self.best_checkpoint = tf.train.Checkpoint(model=self.model)
        self.best_manager = tf.train.CheckpointManager(self.best_checkpoint, str(self.folder.best), max_to_keep=1)
        self.state = common.TrainerState(early_stopping=dataclasses.asdict(self._new_early_stopping()))
        if self.resume:
            self.state = common.TrainerState.load(self.folder.state)
            self.checkpoint.restore(self.state.checkpoint).assert_existing_objects_matched()
            if int(self.step_var.numpy()) != self.state.step:
                raise TrainError(f"checkpoint {self.state.checkpoint} is at step {int(self.step_var.numpy())} "
                                 f"but {self.folder.state} says {self.state.step}")
            logger.info("resumed from %s at step %d (interval %d)", self.state.checkpoint, self.state.step,
                        self.state.interval)
        self.early = common.EarlyStopping(**self.state.early_stopping)
        self._build_steps()
        self._build_data()
        self.writers = {k: tf.summary.create_file_writer(str(self.folder.tensorboard / k)) for k in ("train", "test")}
        self.metrics_log = common.MetricsLog(self.folder)

    def _new_early_stopping(self):
        mode = "min" if self.config.monitor == "loss" else "max"
        return common.EarlyStopping(patience=self.config.early_stopping, mode=mode)

    def _reader_config(self, mode: str, ctx) -> ReaderConfig:
        cfg = self.config
        per_replica = ctx.get_per_replica_batch_size(self.global_batch)
        replicas_here = max(1, self.replicas // ctx.num_input_pipelines)
        start = self.state.step * per_replica * replicas_here if mode == "train" else 0
        return ReaderConfig(
            cfg.train_database if mode == "train" else cfg.test_database, batch_size=per_replica,
            num_workers=max(1, cfg.reader_count * replicas_here), mode=mode,
            augment=cfg.augment_config() if mode == "train" else None,
            normalization=self.normalization, balance_classes=cfg.balance_classes and mode == "train",
            seed=cfg.seed, shard_index=ctx.input_pipeline_id, num_shards=ctx.num_input_pipelines,
            start_position=start, size_multiple=self.size_multiple,
        )

    def _build_data(self):
        def dataset_fn(mode):
            def fn(ctx):
                reader = ImageReader(self._reader_config(mode, ctx)).start()
                self.readers.append(reader)
                return reader.as_tf_dataset()
            return fn

        self.train_dataset = self.strategy.distribute_datasets_from_function(dataset_fn("train"))
        self.test_dataset = self.strategy.distribute_datasets_from_function(dataset_fn("test"))
        self.train_iterator = iter(self.train_dataset)

    def _build_steps(self):
        tf, strategy, model, cfg = self.tf, self.strategy, self.model, self.config
        optimizer, loss_fn, global_batch = self.optimizer, self.loss_fn, self.global_batch
        mixed = cfg.mixed_precision
        num_classes = cfg.number_classes

        def train_step(batch):
            images, labels = batch["image"], batch["semantic_mask"]
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                per_example = loss_fn(labels, logits)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                scaled = optimizer.scale_loss(loss) if mixed else loss
            variables = model.trainable_variables
            gradients = tape.gradient(scaled, variables)
            optimizer.apply(gradients, variables)
            return loss

        def test_step(batch):
            images, labels = batch["image"], tf.cast(batch["semantic_mask"], tf.int32)
            logits = model(images, training=False)
            per_example = loss_fn(labels, logits)
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            cm = tf.math.confusion_matrix(tf.reshape(labels, [-1]), tf.reshape(predictions, [-1]),
                                          num_classes=num_classes, dtype=tf.int64)
            return tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32), cm

        @tf.function
        def distributed_train(iterator):
            losses = strategy.run(train_step, args=(next(iterator),))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        @tf.function
        def distributed_test(batch):
            loss_sum, count, cm = strategy.run(test_step, args=(batch,))
            reduce = lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
            return reduce(loss_sum), reduce(count), reduce(cm)

        self.distributed_train = distributed_train
        self.distributed_test = distributed_test

    # -- loop

    def evaluate(self) -> dict:
        tf = self.tf
        accumulator = seg_metrics.ConfusionAccumulator(self.config.number_classes)
        loss_sum = count = 0.0
        samples = None
        for batch in self.test_dataset:
            if samples is None:
                local = self.strategy.experimental_local_results(batch)[0]
                samples = {k: local[k].numpy()[: self.config.test_images] for k in ("image", "semantic_mask")}
            s, n, cm = self.distributed_test(batch)
            loss_sum += float(s)
            count += float(n)
            accumulator.update_matrix(cm.numpy())
        expected = self.test_meta.record_count
        if int(round(count)) != expected:
            raise TrainError(f"test pass saw {int(count)} examples, the test database has {expected}")
        scores = accumulator.result()
        result = {"loss": loss_sum / max(count, 1.0), "examples": int(count), "scores": scores}
        if samples is not None and len(samples["image"]):
            predictions = np.argmax(self.model(tf.constant(samples["image"]), training=False).numpy(), axis=-1)
            result["overlays"] = [
                np.concatenate([common.overlay(samples["image"][i, ..., 0], predictions[i], self.config.number_classes),
                                common.overlay(samples["image"][i, ..., 0], samples["semantic_mask"][i],
                                               self.config.number_classes)], axis=1)
                for i in range(len(samples["image"]))
            ]
        return result

    def run(self) -> int:
        cfg, tf = self.config, self.tf
        state = self.state
        started = time.perf_counter() - state.elapsed_seconds
        interval_losses: list[float] = []
        window_start, window_steps = time.perf_counter(), 0
        warmup = cfg.resolved_warmup()
        exit_code = 0
        stop_reason = None
        with common.PreemptionGuard() as guard:
            while True:
                if cfg.max_steps is not None and state.step >= cfg.max_steps:
                    stop_reason = f"reached --max_steps {cfg.max_steps}"
                    break
                lr = common.learning_rate_at(state.step, cfg.learning_rate, cfg.lr_schedule, warmup,
                                             cfg.max_steps, cfg.lr_decay_steps)
                self.optimizer.learning_rate.assign(lr)
                loss = float(self.distributed_train(self.train_iterator))
                if not math.isfinite(loss):
                    logger.error("loss is %s at step %d; stopping. The last good checkpoint is %s (step %d); "
                                 "lower --learning_rate or check the data", loss, state.step + 1,
                                 state.checkpoint, state.step if state.checkpoint else 0)
                    return common.NAN_EXIT_CODE
                state.step += 1
                self.step_var.assign(state.step)
                interval_losses.append(loss)
                window_steps += 1
                if state.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    rate = window_steps * self.global_batch / max(now - window_start, 1e-9)
                    reader = self.readers[0].stats() if self.readers else {}
                    logger.info("step %d  loss %.4f  lr %.3g  %.1f img/s  reader wait %.0f%%", state.step, loss, lr,
                                rate, 100 * reader.get("wait_fraction", 0.0))
                    with self.writers["train"].as_default(step=state.step):
                        tf.summary.scalar("loss", loss)
                        tf.summary.scalar("learning_rate", lr)
                        tf.summary.scalar("examples_per_second", rate)
                        if reader:
                            tf.summary.scalar("reader/queue_depth", reader["queue_depth"])
                            tf.summary.scalar("reader/wait_seconds", reader["wait_seconds"])
                    window_start, window_steps = now, 0
                if state.step % cfg.test_every_n_steps == 0:
                    if self._interval(interval_losses, started):
                        stop_reason = (f"early stopping: no improvement of test {cfg.monitor} for "
                                       f"{cfg.early_stopping} intervals")
                        interval_losses = []
                        break
                    interval_losses = []
                if guard.triggered:
                    self._save_checkpoint(started)
                    logger.warning("checkpoint written at step %d; exiting with code %d so the job can be "
                                   "requeued and resumed", state.step, common.PREEMPTED_EXIT_CODE)
                    return common.PREEMPTED_EXIT_CODE
        if interval_losses and not (cfg.max_steps is not None and state.step % cfg.test_every_n_steps == 0):
            self._interval(interval_losses, started)  # a final partial interval is tested too
        self._save_checkpoint(started)
        self._finish(stop_reason, started)
        return exit_code

    def _interval(self, train_losses: list[float], started: float) -> bool:
        """Test, log, checkpoint; returns True when early stopping says stop."""
        cfg, tf, state = self.config, self.tf, self.state
        result = self.evaluate()
        overlays = result.get("overlays")
        scores = result["scores"]
        state.interval += 1
        macro_dice = float(scores.averages["macro"]["dice"])
        value = {"loss": result["loss"], "iou": scores.mean_iou, "dice": macro_dice}[cfg.monitor]
        improved = self.early.update(float(value), state.step)
        row = {"step": state.step, "interval": state.interval,
               "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
               "test_loss": result["loss"], "test_accuracy": float(scores.accuracy),
               "test_mean_iou": float(scores.mean_iou), "test_foreground_iou": float(scores.foreground_iou),
               "test_macro_dice": macro_dice,
               "learning_rate": float(self.optimizer.learning_rate.numpy())}
        for c in range(cfg.number_classes):
            row[f"test_iou_class{c}"] = float(scores.iou[c])
            row[f"test_dice_class{c}"] = float(scores.dice[c])
        state.history.append(row)
        logger.info("test interval %d (step %d): loss %.4f  mean IoU %.4f  foreground IoU %.4f  %s",
                    state.interval, state.step, row["test_loss"], row["test_mean_iou"] or float("nan"),
                    row["test_foreground_iou"] or float("nan"),
                    "best so far" if improved else f"no improvement for {self.early.bad_intervals}")
        with self.writers["test"].as_default(step=state.step):
            for key, val in row.items():
                if key.startswith("test_") and val is not None and math.isfinite(val):
                    tf.summary.scalar(key[5:], val)
            if overlays:
                tf.summary.image("prediction | truth", np.stack(overlays), max_outputs=len(overlays))
        self.metrics_log.write(state.history)
        if improved:
            self.best_manager.save(checkpoint_number=state.step)
        self._save_checkpoint(started)
        return self.early.should_stop

    def _save_checkpoint(self, started: float) -> None:
        state = self.state
        if state.checkpoint and state.checkpoint.endswith(f"-{state.step}"):
            return  # already saved at this step
        path = self.manager.save(checkpoint_number=state.step)
        state.checkpoint = path
        state.early_stopping = dataclasses.asdict(self.early)
        state.reader_position = state.step * self.global_batch
        state.starvation_events = sum(r.stats()["starvation_events"] for r in self.readers)
        state.elapsed_seconds = time.perf_counter() - started
        state.save(self.folder.state)

    def _finish(self, stop_reason: str | None, started: float) -> None:
        if self.best_manager.latest_checkpoint:
            self.best_checkpoint.restore(self.best_manager.latest_checkpoint).expect_partial()
        common.export_model(self.model, self.folder)
        seconds = time.perf_counter() - started
        best_row = next((r for r in self.state.history if r["step"] == self.early.best_step), None)
        summary = {"stop_reason": stop_reason, "steps": self.state.step, "intervals": self.state.interval,
                   "best_step": self.early.best_step, f"best_test_{self.config.monitor}": self.early.best,
                   "best_interval": best_row, "seconds": round(seconds, 1),
                   "starvation_events": self.state.starvation_events,
                   "exports": {"keras": str(self.folder.keras_model), "saved_model": str(self.folder.saved_model)}}
        common.atomic_write_text(self.folder.summary, json.dumps(summary, indent=1))
        logger.info("done (%s) after %d steps in %.0f s; best test %s %.4f at step %s; exported %s and %s",
                    stop_reason, self.state.step, seconds, self.config.monitor, self.early.best or float("nan"),
                    self.early.best_step, self.folder.keras_model, self.folder.saved_model)

    def close(self) -> None:
        # drop TF's iterators over the readers before the readers, and before interpreter shutdown
        # (a generator dataset finalized after it logs "Python interpreter state is not initialized")
        for name in ("train_iterator", "train_dataset", "test_dataset"):
            self.__dict__.pop(name, None)
        import gc

        gc.collect()
        for reader in self.readers:
            reader.close()
        self.readers = []


def run_config_json(config: TrainConfig, trainer: Trainer) -> dict:
    """config.json: everything inference needs to rebuild and run the model."""
    meta = trainer.train_meta
    return {
        "train": dataclasses.asdict(config),
        "model": {"name": config.model, "config": trainer.model.get_config(),
                  "size_multiple": trainer.size_multiple},
        "classes": {"number_classes": config.number_classes,
                    "names": {str(k): v for k, v in meta.class_names.items()}},
        "input": {"channels": meta.channels, "dtype": meta.image_dtype, "tile_size": meta.tile_size,
                  "record_height": meta.record_height, "record_width": meta.record_width},
        "normalization": trainer.normalization.to_dict(),
        "augmentation": (config.augment_config().to_dict() if config.use_augmentation else None),
        "data": {"train_database": str(Path(config.train_database).resolve()),
                 "test_database": str(Path(config.test_database).resolve()),
                 "train_records": meta.record_count, "test_records": trainer.test_meta.record_count},
        "replicas": trainer.replicas,
        "versions": common.versions(),
    }


# Settings that may differ between a run and its continuation without making it "a different run".
_RESUME_IGNORED = ("max_steps", "log_every", "cpu_replicas", "reader_count", "test_images")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):  # per-step INFO chatter of tf.distribute and checkpointing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    trainer = None
    try:
        config = build_config(args)
        train_meta, test_meta = check_databases(config)
        folder = common.RunFolder(config.output_dir)
        resume = folder.prepare(dataclasses.asdict(config), bool(args.resume), _RESUME_IGNORED)
        handler = common.log_to_file(folder)
        trainer = Trainer(config, train_meta, test_meta, resume)
        trainer.setup()
        payload = run_config_json(config, trainer)
        common.atomic_write_text(folder.config, json.dumps(payload, indent=1, default=str))
        code = trainer.run()
        logging.getLogger().removeHandler(handler)
        return code
    except TrainError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
