"""The instance-segmentation trainer: Mask R-CNN settings and flags, RPN + box + mask losses, and COCO
box/mask AP (pycocotools) over the whole test database at each test interval.

The command line is ``train_maskrcnn.py``; the loop, checkpoints, resume and exports are
``loop.Trainer``'s. Model settings: ``preset`` (``small``: GroupNorm backbone, FPN P2-P4 at 64
channels, for CPU runs and small tiles; ``resnet50`` / ``resnet101``: TAO-like, FPN P2-P6 at 256
channels) overridden field by field by the ``maskrcnn`` mapping (``--maskrcnn KEY=VALUE``).

Object scale: unless ``anchor_scale`` is set in that mapping, the anchors are sized from the training
database's object statistics (``object_scale.plan_object_scale``: smallest anchor <= the 5th-percentile
box side, largest >= the largest box side, the preset's value when it already fits). The choice, the
default inference overlap (at least the largest box side) and warnings (objects larger than the tile,
smaller than the smallest anchor) are logged and recorded in config.json (``object_scale``,
``input.inference_overlap``); the model config in config.json holds the anchor scale it was built with.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enki_seg.cli import parse_key_values
from enki_seg.data import records
from enki_seg.evaluation import coco_ap
from enki_seg.training import loop
from enki_seg.training.config import BaseTrainConfig, add_common_arguments
from enki_seg.training.config import build_config as build_base_config
from enki_seg.training.errors import TrainError
from enki_seg.training.object_scale import (CAP_FIELDS, ObjectScale, detection_caps,
                                            objects_per_tile, plan_object_scale)
from enki_seg.visualize import overlay

logger = logging.getLogger(__name__)

MONITORS = {"loss": "min", "mask_ap": "max", "box_ap": "max", "mask_ap50": "max", "box_ap50": "max"}


@dataclass
class MaskRCNNTrainConfig(BaseTrainConfig):
    """All settings of a Mask R-CNN run; saved in config.json. Flags map onto these fields one to one."""

    batch_size: int = 4                  # per replica
    learning_rate: float = 1e-3
    monitor: str = "mask_ap"             # loss | mask_ap | box_ap | mask_ap50 | box_ap50
    preset: str = "small"                # small | resnet50 | resnet101
    maskrcnn: dict = field(default_factory=dict)  # overrides of MaskRCNNConfig fields
    max_num_instances: int | None = None  # objects per training tile kept (largest first); None: from the data
    eval_score_threshold: float = 0.05   # COCO evaluation keeps detections above this score
    gradient_clip_norm: float = 10.0     # global norm; early RPN/ROI losses spike without it (0 = off)

    def model_config(self):
        from models.maskrcnn import MaskRCNNConfig

        base = MaskRCNNConfig.preset(self.preset).to_dict()
        values = {**base, **self.maskrcnn}
        if self.max_num_instances is not None:
            values["max_num_instances"] = self.max_num_instances
        return MaskRCNNConfig.from_dict(values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The common flags plus Mask R-CNN's."""
    add_common_arguments(p, tuple(MONITORS), MaskRCNNTrainConfig())
    p.add_argument("--preset", choices=("small", "resnet50", "resnet101"), help="model size (small)")
    p.add_argument("--maskrcnn", action="append", metavar="KEY=VALUE",
                   help="override one MaskRCNNConfig field, e.g. --maskrcnn rpn_batch_size_per_im=128")
    p.add_argument("--backbone_weights", help="local weights file for the ResNet backbone (default: from scratch)")
    p.add_argument("--max_num_instances", type=int,
                   help="objects per training tile kept, largest first (default: from the data, at least 100)")
    p.add_argument("--eval_score_threshold", type=float, help="detections scored in COCO evaluation (0.05)")
    p.add_argument("--gradient_clip_norm", type=float, help="clip gradients to this global norm (10; 0 = off)")


def build_config(args: argparse.Namespace) -> MaskRCNNTrainConfig:
    """MaskRCNNTrainConfig from --config and flags (--maskrcnn/--backbone_weights go into ``maskrcnn``);
    TrainError on bad settings."""
    import yaml

    overrides = {key: yaml.safe_load(value)
                 for key, value in parse_key_values(getattr(args, "maskrcnn", None), "--maskrcnn", TrainError).items()}
    if getattr(args, "backbone_weights", None):
        overrides["backbone_weights"] = args.backbone_weights
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("maskrcnn", "backbone_weights")})
    config = build_base_config(flags, MaskRCNNTrainConfig)
    config.maskrcnn = {**config.maskrcnn, **overrides}
    if config.monitor not in MONITORS:
        raise TrainError(f"--monitor {config.monitor!r} must be one of {', '.join(MONITORS)}")
    if config.number_classes < 2:
        raise TrainError("--number_classes counts background too: use 2 for one object class")
    if config.max_num_instances is not None and config.max_num_instances < 1:
        raise TrainError("--max_num_instances must be >= 1")
    try:
        config.model_config()
    except (ValueError, TypeError) as exc:
        raise TrainError(f"Mask R-CNN settings: {exc}") from None
    weights = config.maskrcnn.get("backbone_weights")
    if weights and not Path(weights).is_file():
        raise TrainError(f"--backbone_weights {weights} does not exist")
    return config


def object_scale_of(config: MaskRCNNTrainConfig, train_meta: records.DatasetMetadata) -> ObjectScale:
    """``plan_object_scale`` for a run: the user's ``anchor_scale`` if set, else derived from the training
    database's ``object_stats`` (the preset's when it has none); logs the choice and the warnings."""
    model = config.model_config()
    # the side of the training examples: the crop (--crop_size, or the smallest record when records
    # differ in size), else the records'
    tile = config.crop_size or train_meta.tile_size
    if not tile and train_meta.record_height is not None and train_meta.record_width is not None:
        tile = min(train_meta.record_height, train_meta.record_width)
    if not tile and train_meta.sources:
        tile = min(min(s.height, s.width) for s in train_meta.sources)
    # size multiple: MaskRCNN.size_multiple, 2**max_level
    plan = plan_object_scale(getattr(train_meta, "object_stats", {}), model.min_level, model.max_level,
                             model.num_scales, model.anchor_scale,
                             user_scale=model.anchor_scale if "anchor_scale" in config.maskrcnn else None,
                             tile_size=tile, size_multiple=2 ** model.max_level)
    stats = plan.object_stats
    if stats:
        logger.info("objects of %s: %d, box side p5 %g / median %g / max %g px", config.train_database,
                    stats["count"], stats["box_side"]["p5"], stats["box_side"]["p50"], stats["box_side"]["max"])
    else:
        logger.info("%s records no object sizes (built before they were measured): anchors of the preset",
                    config.train_database)
    logger.info("anchor_scale %g (%s): anchors %g to %g px; default inference overlap %s", plan.anchor_scale,
                plan.anchor_source, plan.smallest_anchor, plan.largest_anchor,
                "unknown" if plan.inference_overlap is None else f"{plan.inference_overlap} px")
    crowding(plan, config, model, tile)
    for warning in plan.warnings:
        logger.warning("%s", warning)
    return plan


def crowding(plan: ObjectScale, config: MaskRCNNTrainConfig, model, tile: int | None) -> None:
    """The caps from the data's crowding (``object_stats.per_record``): ``--max_num_instances`` when not given
    is the most objects of any training record, times the area the scale augmentation may add (at least the
    preset's 100), and the test-time caps
    (detections and proposals per tile, ``detection_caps``) cover the most crowded record's objects per
    pixel on a training tile, unless set in ``--maskrcnn``; recorded in ``plan`` and logged."""
    crowded = plan.object_stats.get("per_record", {})
    expected = objects_per_tile(plan.object_stats, tile * tile) if tile else None
    user = config.max_num_instances
    # the scale augmentation zooms out by up to (1 - scale) on each axis: the view then holds up to
    # 1 / (1 - scale)**2 times the record's area (beyond its edges, reflected objects)
    augment = config.augment_config()
    zoom_out = 1.0 / (1.0 - augment.scale) ** 2 if augment is not None and augment.scale > 0 else 1.0
    most = int(math.ceil(crowded.get("max", 0) * zoom_out))
    plan.max_num_instances = user if user is not None else max(model.max_num_instances, most)
    preset = {k: getattr(model, k) for k in CAP_FIELDS}
    caps = detection_caps(max(model.test_detections_per_image, expected or 0), preset)
    plan.detection_caps = {k: v for k, v in caps.items() if k not in config.maskrcnn}
    final = {k: config.maskrcnn.get(k, caps[k]) for k in CAP_FIELDS}
    logger.info("%s: max_num_instances %d%s; at test time at most %d detections from %d proposals per %s px tile "
                "(inference scales them with its tile's area)",
                "the records hold no object counts (built before they were recorded)" if not crowded else
                f"the most crowded training record holds {crowded['max']} objects "
                f"({crowded['per_megapixel_max']:.0f} per megapixel"
                + (f"; x{zoom_out:.2f} for the scale augmentation's zoom-out" if zoom_out > 1 else "") + ")",
                plan.max_num_instances,
                " (--max_num_instances)" if user is not None else "", final["test_detections_per_image"],
                final["rpn_post_nms_topn_test"], tile or "?")
    if user is not None and crowded and user < crowded["max"]:
        plan.warnings.append(f"--max_num_instances {user} is below the {crowded['max']} objects of the most crowded "
                             "training record: the smallest objects of such records are not trained on")


class MaskRCNNTrainer(loop.Trainer):
    """Instance segmentation: RPN + box + mask losses; COCO AP on the test database at each interval."""

    MONITOR_MODES = MONITORS

    def __init__(self, config: MaskRCNNTrainConfig, train_meta, test_meta, resume: bool, cluster=None):
        super().__init__(config, train_meta, test_meta, resume, cluster)
        self.object_scale = object_scale_of(config, train_meta)

    def model_config(self):
        """The MaskRCNNConfig the model is built with: the run's, with the anchor scale of ``object_scale``."""
        plan = self.object_scale
        return dataclasses.replace(self.config.model_config(), anchor_scale=plan.anchor_scale,
                                   max_num_instances=plan.max_num_instances, **plan.detection_caps)

    def run_config(self):
        run = super().run_config()
        run.input.inference_overlap = self.object_scale.inference_overlap
        run.extra["object_scale"] = self.object_scale.to_dict()
        return run

    @property
    def reader_options(self) -> dict:
        return {"max_instances": self.object_scale.max_num_instances}

    @staticmethod
    def check_databases(config):
        train, test = loop.Trainer.check_databases(config)
        for meta, name in ((train, "train_database"), (test, "test_database")):
            if not meta.has_instances:
                raise TrainError(
                    f"--{name} {getattr(config, name)} holds no instance labels; Mask R-CNN needs them: build it "
                    "with build_lmdb.py --instance_folder FOLDER (one label image per image, 0 = background) or "
                    "--coco_json FILE")
        return train, test

    def create_model(self):
        from models.maskrcnn import MaskRCNN

        return MaskRCNN(self.model_config(), input_channels=self.train_meta.channels,
                        num_classes=self.config.number_classes)

    def compute_loss(self, batch: dict):
        tf = self.tf
        per_image = self.model.compute_losses(batch["image"], batch["boxes"], batch["box_classes"],
                                              batch["num_instances"], batch["instance_labels"], training=True)
        terms = {k: tf.nn.compute_average_loss(v, global_batch_size=self.global_batch) for k, v in per_image.items()}
        return terms.pop("total"), terms

    def _build_steps(self):
        super()._build_steps()
        tf, model = self.tf, self.model

        # one trace for full and partial test batches alike (a Mask R-CNN graph takes seconds to trace)
        meta, m = self.test_meta, self.object_scale.max_num_instances
        height, width = self.example_shapes["test"]
        image = tf.TensorSpec((None, height, width, meta.channels), tf.float32)
        signature = [image, tf.TensorSpec((None, m, 4), tf.float32), tf.TensorSpec((None, m), tf.int32),
                     tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None, height, width), tf.int32)]

        @tf.function(input_signature=[image])
        def detect(images):
            return model(images, training=False)

        @tf.function(input_signature=signature)
        def test_losses(images, boxes, classes, counts, labels):
            return model.compute_losses(images, boxes, classes, counts, labels, training=False)["total"]

        self.detect, self.test_losses = detect, test_losses

    def _build_data(self):
        # training is distributed (each worker its shard); evaluation runs on every worker over the
        # whole test database with its own copy of the weights: no collectives, equal results everywhere
        from imagereader import ImageReader

        self.train_dataset = self.strategy.distribute_datasets_from_function(self.reader_dataset_fn("train"))
        self.train_iterator = iter(self.train_dataset)
        self.test_reader = ImageReader(self.reader_config("test")).start()
        self.readers.append(self.test_reader)

    def evaluate(self) -> dict:
        cfg = self.config
        names = {int(k): v for k, v in self.train_meta.class_names.items()}
        evaluator = coco_ap.CocoEvaluator(list(range(1, cfg.number_classes)), names or None)
        loss_sum, count, overlays = 0.0, 0, []
        # AP is scored against the database's objects, all of them: the reader's instance targets keep
        # only the max_num_instances largest per record (the test loss still uses those targets)
        with records.Database(cfg.test_database) as truth:
            for batch in self.test_reader:
                loss_sum, count = self._evaluate_batch(batch, truth, evaluator, overlays, loss_sum, count)
        if count != self.test_meta.record_count:
            raise TrainError(f"test pass saw {count} examples, the test database has {self.test_meta.record_count}")
        scores = evaluator.evaluate()
        loss = loss_sum / max(count, 1)
        row = {f"test_{k}": float(scores[k]) for k in
               ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")}
        monitor = {"loss": loss, "mask_ap": scores["mask_AP"], "box_ap": scores["box_AP"],
                   "mask_ap50": scores["mask_AP50"], "box_ap50": scores["box_AP50"]}
        return {"loss": loss, "monitor": monitor, "row": row, "overlays": overlays}

    def _evaluate_batch(self, batch, truth, evaluator, overlays, loss_sum, count):
        """One test batch: loss, detections, and COCO matching against the records' full truth."""
        from models.maskrcnn import paste_masks

        tf, cfg = self.tf, self.config
        images = tf.constant(batch["image"])
        loss_sum += float(tf.reduce_sum(self.test_losses(
            images, tf.constant(batch["boxes"]), tf.constant(batch["box_classes"]),
            tf.constant(batch["num_instances"]), tf.constant(batch["instance_labels"]))))
        out = {k: v.numpy() for k, v in self.detect(images).items()}
        height, width = batch["image"].shape[1:3]
        for i in range(len(batch["image"])):
            n = int(out["num_detections"][i])
            keep = np.flatnonzero(out["scores"][i, :n] >= cfg.eval_score_threshold)
            boxes = out["boxes"][i, keep]
            masks = paste_masks(boxes, out["masks"][i, keep], height, width)
            record = truth.read(int(batch["index"][i]))  # the test reader does not augment: same pixels
            labels, gt_classes = record.instance_labels, record.instance_classes
            if "crop_origin" in batch:  # the window the reader cut (zero padded where the record is smaller)
                y, x = (int(v) for v in batch["crop_origin"][i])
                window = np.zeros((height, width), labels.dtype)
                part = labels[y: y + height, x: x + width]
                window[: part.shape[0], : part.shape[1]] = part
                labels = window
            evaluator.add_image(count, height, width, labels, gt_classes, boxes, out["scores"][i, keep],
                                out["classes"][i, keep], masks)
            if len(overlays) < cfg.test_images:
                overlays.append(self._overlay(batch["image"][i, ..., 0], masks, out["classes"][i, keep],
                                              out["scores"][i, keep], labels, gt_classes))
            count += 1
        return loss_sum, count

    def _overlay(self, image, masks, classes, scores, labels, gt_classes):
        """prediction | truth, objects tinted by class (detections above 0.5 score)."""
        predicted = np.zeros(labels.shape, np.int32)
        for k in np.argsort(scores):  # low to high: where objects overlap the higher score shows
            if scores[k] >= 0.5:
                predicted[masks[k]] = classes[k]
        lut = np.concatenate([[0], gt_classes]).astype(np.int32)
        truth = lut[np.clip(labels, 0, len(lut) - 1)]
        n = self.config.number_classes
        return np.concatenate([overlay(image, predicted, n), overlay(image, truth, n)], axis=1)

    @property
    def model_name(self) -> str:
        return "maskrcnn"
