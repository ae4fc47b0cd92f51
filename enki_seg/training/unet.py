"""The semantic-segmentation trainer: UNet / FC-DenseNet settings and flags, the per-pixel loss, and
confusion-matrix metrics (IoU, Dice) over the whole test database at each test interval.

The command line is ``train_unet.py``; the loop, checkpoints, resume and exports are ``loop.Trainer``'s.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from enki_seg.evaluation import metrics as seg_metrics
from enki_seg.training import loop
from enki_seg.data import instance_targets
from enki_seg.training.config import BaseTrainConfig, add_common_arguments, check_databases
from enki_seg.training.config import build_config as build_base_config
from enki_seg.training.errors import TrainError
from enki_seg.visualize import overlay

MONITORS = {"loss": "min", "iou": "max", "dice": "max"}


@dataclass
class TrainConfig(BaseTrainConfig):
    """All settings of a run; saved in config.json. Flags map onto these fields one to one."""

    model: str = "unet"                  # unet | fc-densenet
    depth: int = 4                       # unet: pooling levels
    base_filters: int = 64               # unet: filters of the first level, doubling per level
    dropout: float = 0.5                 # unet: dropout at the deepest levels
    densenet_config: str = "56"          # fc-densenet: 56 | 67 | 103
    loss: str = "cross_entropy"
    class_weights: list[float] | None = None
    monitor: str = "loss"                # loss | iou | dice
    precision: str = "auto"              # mixed_bfloat16 where native and the UNet has >= 16 base filters, else float32
    instance_target: str = ""            # "" or boundary: learn background/interior/boundary from the
                                         # instance labels (3 classes); inference.py makes instances by watershed


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The common flags plus the model's."""
    add_common_arguments(p, tuple(MONITORS), TrainConfig())
    p.add_argument("--model", choices=("unet", "fc-densenet"))
    p.add_argument("--depth", type=int, help="unet pooling levels (4)")
    p.add_argument("--base_filters", type=int, help="unet first-level filters (64)")
    p.add_argument("--dropout", type=float, help="unet dropout at the deepest levels (0.5)")
    p.add_argument("--densenet_config", choices=("56", "67", "103"))
    p.add_argument("--loss", choices=("cross_entropy", "dice", "cross_entropy+dice"))
    p.add_argument("--class_weights", type=float, nargs="+")
    p.add_argument("--instance_target", choices=instance_targets.TARGETS,
                   help="instance segmentation with this model: train on background/interior/boundary classes "
                        "derived from the databases' instance labels (--number_classes 3); inference.py turns "
                        "the predictions into instances with a seeded watershed")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config and flags; TrainError on bad settings."""
    config = build_base_config(args, TrainConfig)
    if config.monitor not in MONITORS:
        raise TrainError(f"--monitor {config.monitor!r} must be loss, iou or dice")
    if config.instance_target and config.number_classes != instance_targets.BOUNDARY_CLASSES:
        raise TrainError(f"--instance_target {config.instance_target} learns {instance_targets.BOUNDARY_CLASSES} "
                         f"classes (background, interior, boundary); use --number_classes "
                         f"{instance_targets.BOUNDARY_CLASSES}, not {config.number_classes}")
    if config.class_weights is not None and len(config.class_weights) != config.number_classes:
        raise TrainError(f"--class_weights has {len(config.class_weights)} values but --number_classes is "
                         f"{config.number_classes}")
    return config


def build_model(config: TrainConfig, channels: int):
    import models

    if config.model == "unet":
        options = dict(depth=config.depth, base_filters=config.base_filters, dropout=config.dropout)
    else:
        options = dict(config=config.densenet_config)
    return models.build_model(config.model, input_channels=channels, num_classes=config.number_classes,
                              **options)


class UNetTrainer(loop.Trainer):
    """Semantic segmentation: per-pixel loss, confusion-matrix metrics at each test interval."""

    MONITOR_MODES = MONITORS

    #: bfloat16 against float32 per training step on a CPU with AMX (bench/train_bench.py, README):
    #: base_filters 64: 1.99x, 16: 1.42x, 8: 0.70x (casts dominate); smaller models stay float32 under auto.
    MIN_BFLOAT16_FILTERS = 16

    def bfloat16_unsuited(self) -> str | None:
        cfg = self.config
        if cfg.model != "unet":
            return f"bfloat16 was not measured for {cfg.model} (pass --precision mixed_bfloat16 to use it)"
        if cfg.base_filters < self.MIN_BFLOAT16_FILTERS:
            return (f"a UNet of {cfg.base_filters} base filters is too small to gain (casts dominate below "
                    f"{self.MIN_BFLOAT16_FILTERS})")
        return None

    @staticmethod
    def check_databases(config: TrainConfig):
        """As every trainer's, and with --instance_target the databases must hold instance labels (their
        semantic class ids do not matter: the classes are derived)."""
        train, test = check_databases(config, check_class_ids=not config.instance_target)
        if config.instance_target:
            for meta, path in ((train, config.train_database), (test, config.test_database)):
                if not meta.has_instances:
                    raise TrainError(f"{path} has no instance labels, which --instance_target "
                                     f"{config.instance_target} learns from; rebuild it with --instance_folder "
                                     "(or --coco_json)")
        return train, test

    @property
    def reader_options(self) -> dict:
        return {"instance_target": self.config.instance_target} if self.config.instance_target else {}

    def create_model(self):
        from enki_seg.training import losses

        self.loss_fn = losses.make_loss(self.config.loss, self.config.number_classes, self.config.class_weights)
        return build_model(self.config, self.train_meta.channels)

    def compute_loss(self, batch: dict):
        logits = self.model(batch["image"], training=True)
        per_example = self.loss_fn(batch["semantic_mask"], logits)
        return self.tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch), {}

    def _build_steps(self):
        super()._build_steps()
        tf, strategy, model, num_classes = self.tf, self.strategy, self.model, self.config.number_classes
        loss_fn = self.loss_fn

        def test_step(batch):
            # every replica gets a full batch; padding rows (valid 0) count nowhere
            images, labels = batch["image"], tf.cast(batch["semantic_mask"], tf.int32)
            valid = tf.cast(batch["valid"], tf.float32)
            logits = model(images, training=False)
            per_example = loss_fn(labels, logits)
            predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
            pixel_weights = tf.broadcast_to(tf.cast(batch["valid"], tf.int64)[:, None, None], tf.shape(labels))
            cm = tf.math.confusion_matrix(tf.reshape(labels, [-1]), tf.reshape(predictions, [-1]),
                                          num_classes=num_classes, weights=tf.reshape(pixel_weights, [-1]),
                                          dtype=tf.int64)
            return tf.reduce_sum(per_example * valid), tf.reduce_sum(valid), cm

        @tf.function
        def distributed_test(batch):
            loss_sum, count, cm = strategy.run(test_step, args=(batch,))
            reduce = lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
            return reduce(loss_sum), reduce(count), reduce(cm)

        self.distributed_test = distributed_test

    def evaluate(self) -> dict:
        tf, cfg = self.tf, self.config
        accumulator = seg_metrics.ConfusionAccumulator(cfg.number_classes)
        loss_sum = count = 0.0
        samples = None
        for batch in self.test_dataset:
            if samples is None:
                local = self.strategy.experimental_local_results(batch)[0]
                rows = np.flatnonzero(local["valid"].numpy())[: cfg.test_images]
                samples = {k: local[k].numpy()[rows] for k in ("image", "semantic_mask")}
            s, n, cm = self.distributed_test(batch)
            loss_sum += float(s)
            count += float(n)
            accumulator.update_matrix(cm.numpy())
        expected = self.test_meta.record_count
        if int(round(count)) != expected:
            raise TrainError(f"test pass saw {int(count)} examples, the test database has {expected}")
        scores = accumulator.result()
        macro_dice = float(scores.averages["macro"]["dice"])
        loss = loss_sum / max(count, 1.0)
        row = {"test_accuracy": float(scores.accuracy), "test_mean_iou": float(scores.mean_iou),
               "test_foreground_iou": float(scores.foreground_iou), "test_macro_dice": macro_dice}
        for c in range(cfg.number_classes):
            row[f"test_iou_class{c}"] = float(scores.iou[c])
            row[f"test_dice_class{c}"] = float(scores.dice[c])
        overlays = []
        if samples is not None and len(samples["image"]):
            predictions = np.argmax(self.model(tf.constant(samples["image"]), training=False).numpy(), axis=-1)
            overlays = [
                np.concatenate([overlay(samples["image"][i, ..., 0], predictions[i], cfg.number_classes),
                                overlay(samples["image"][i, ..., 0], samples["semantic_mask"][i],
                                        cfg.number_classes)], axis=1)
                for i in range(len(samples["image"]))
            ]
        return {"loss": loss, "monitor": {"loss": loss, "iou": scores.mean_iou, "dice": macro_dice},
                "row": row, "overlays": overlays}

    @property
    def model_name(self) -> str:
        return self.config.model
