"""Mask R-CNN (He et al. 2017) with FPN as a Keras 3 model: detections from ``call``, losses from ``compute_losses``."""
from __future__ import annotations

import keras
import tensorflow as tf

from ..common import check_input_size
from . import box_ops
from .anchors import level_anchors_tf
from .backbone import build_resnet_backbone, build_small_backbone
from .config import MaskRCNNConfig
from .fpn import build_fpn
from .heads import build_box_head, build_mask_head
from .postprocess import detect_boxes
from .proposals import generate_proposals
from .roi_align import multilevel_roi_align
from .rpn import build_rpn_head, flatten_level_outputs, rpn_losses, rpn_targets
from .targets import mask_targets, sample_rois


@keras.saving.register_keras_serializable(package="enki")
class MaskRCNN(keras.Model):
    """Mask R-CNN: backbone, FPN, RPN, ROIAlign, box head and mask head.

    ``model(images, training=False)`` with images ``(B, H, W, input_channels)`` float32 (normalized; H and W
    multiples of ``size_multiple``) returns a dict of fixed-shape tensors, D = ``test_detections_per_image``,
    R = ``mrcnn_resolution``; rows beyond ``num_detections`` are zero:

    - "boxes": (B, D, 4) float32 pixels ``[y0, x0, y1, x1]`` (end exclusive)
    - "scores": (B, D) float32 class probabilities
    - "classes": (B, D) int32 in 1..num_classes-1
    - "num_detections": (B,) int32
    - "masks": (B, D, R, R) float32 sigmoid probabilities of the detected class, relative to the box
      (only with ``include_mask``; ``paste_masks`` places them in the image)

    ``compute_losses(...)`` returns per-image training losses (see there); the trainer averages them and adds
    weight decay. Their anchor and ROI sampling is seeded by ``sampling_step``, a non-trainable int64
    variable that every training call advances; it is one of the model's weights, so checkpoints and saved
    models carry it and a resumed run samples what the uninterrupted run would have.

    Args:
        config: ``MaskRCNNConfig`` or its ``to_dict()``.
        input_channels: int, channels of the input images.
        num_classes: int, classes INCLUDING background (TAO convention): object classes are
            1..num_classes-1.
        **kwargs: passed to ``keras.Model`` (``name``, ``trainable``).

    Example:
        model = MaskRCNN(MaskRCNNConfig.preset("small"), input_channels=1, num_classes=3)
        detections = model(np.zeros((2, 128, 128, 1), np.float32))  # detections["boxes"]: (2, 100, 4)
    """

    def __init__(self, config: dict | MaskRCNNConfig, input_channels: int, num_classes: int, **kwargs):
        if isinstance(config, dict):
            config = MaskRCNNConfig.from_dict(config)
        elif not isinstance(config, MaskRCNNConfig):
            raise TypeError(f"config must be a MaskRCNNConfig or a dict, got {type(config).__name__}")
        if input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {input_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background counts), got {num_classes}")
        kwargs.setdefault("name", "mask_rcnn")
        super().__init__(**kwargs)
        self.config = config
        self.input_channels = int(input_channels)
        self.num_classes = int(num_classes)

        if config.backbone == "small":
            self.backbone = build_small_backbone(input_channels, config.min_level, config.backbone_max_level)
        else:
            self.backbone = build_resnet_backbone(config.backbone, input_channels, config.min_level,
                                                  config.backbone_weights)
        backbone_channels = {config.min_level + i: int(output.shape[-1])
                             for i, output in enumerate(self.backbone.outputs)}
        self.fpn = build_fpn(backbone_channels, config.min_level, config.max_level, config.fpn_channels)
        self.rpn_head = build_rpn_head(config.fpn_channels, config.anchors_per_location)
        self.box_head = build_box_head(config.fpn_channels, config.roi_pool_size, config.fast_rcnn_fc_dim,
                                       num_classes)
        self.mask_head = (build_mask_head(config.fpn_channels, config.mrcnn_resolution, config.mask_head_convs,
                                          config.mask_head_channels, num_classes)
                          if config.include_mask else None)
        # only_first_replica: every replica advances it in step and all keep the first one's value
        self.sampling_step = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False,
                                             aggregation="only_first_replica", name="sampling_step")
        # every weight exists now (the parts are functional models), so record the input signature that
        # model.export() and load_model() use: any batch and tile size
        self.build((None, None, None, self.input_channels))

    def build(self, input_shape):
        pass  # the parts were built in __init__

    @property
    def size_multiple(self) -> int:
        """Height and width of the input must be multiples of this (``2**max_level``)."""
        return 2**self.config.max_level

    def check_input(self, height: int | None, width: int | None) -> None:
        """Raise ValueError unless ``height`` x ``width`` fits this model (see ``models.check_input_size``)."""
        check_input_size(height, width, self.size_multiple)

    def _first_stage(self, images, training):
        """Pyramid features and RPN outputs: dicts by level of features, logits, deltas and anchors."""
        shape = images.shape
        if len(shape) == 4:
            self.check_input(shape[1], shape[2])
        config = self.config
        pyramid = self.fpn(self.backbone(images, training=training), training=training)
        features, scores, deltas, anchors = {}, {}, {}, {}
        for level, feature in zip(range(config.min_level, config.max_level + 1), pyramid):
            features[level] = feature
            level_scores, level_deltas = self.rpn_head(feature, training=training)
            scores[level], deltas[level] = flatten_level_outputs(level_scores, level_deltas)
            feature_shape = tf.shape(feature)
            anchors[level] = level_anchors_tf(feature_shape[1], feature_shape[2], level, config.num_scales,
                                              config.aspect_ratios, config.anchor_scale)
        return features, scores, deltas, anchors

    def _pool(self, features, boxes, output_size):
        """(B, K, 4) boxes to (B * K, output_size, output_size, C) ROIAlign features."""
        pooled = multilevel_roi_align(features, boxes, output_size, self.config.roi_canonical_size,
                                      self.config.roi_canonical_level)
        return tf.reshape(pooled, (-1, output_size, output_size, self.config.fpn_channels))

    def _class_mask_logits(self, features, boxes, classes, training):
        """(B, K, R, R) mask logits of ``classes`` (B, K) for ``boxes`` (B, K, 4)."""
        batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
        resolution = self.config.mrcnn_resolution
        logits = self.mask_head(self._pool(features, boxes, resolution // 2), training=training)
        logits = tf.reshape(logits, (batch, count, resolution, resolution, self.num_classes))
        logits = tf.transpose(logits, (0, 1, 4, 2, 3))  # (B, K, C, R, R)
        return tf.gather(logits, classes, batch_dims=2)

    # autograph would rewrite these (and everything they call) on every trace for nothing: they hold no
    # data-dependent Python control flow. Converting them tripled the trace time of a training step.
    @tf.autograph.experimental.do_not_convert
    def call(self, images, training=False):
        config = self.config
        images = tf.convert_to_tensor(images)
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        features, scores, deltas, anchors = self._first_stage(images, training)
        proposals, _, proposal_valid = generate_proposals(
            scores, deltas, anchors, height, width, config.rpn_pre_nms_topn_test, config.rpn_post_nms_topn_test,
            config.rpn_nms_threshold, config.rpn_min_size)
        batch, num_rois = tf.shape(proposals)[0], tf.shape(proposals)[1]
        class_logits, box_deltas = self.box_head(self._pool(features, proposals, config.roi_pool_size),
                                                 training=training)
        detections = detect_boxes(
            proposals, proposal_valid, tf.reshape(class_logits, (batch, num_rois, self.num_classes)),
            tf.reshape(box_deltas, (batch, num_rois, 4 * self.num_classes)), height, width,
            config.bbox_reg_weights, config.test_detections_per_image, config.test_nms, config.box_score_threshold)
        if self.mask_head is not None:
            mask_logits = self._class_mask_logits(features, detections["boxes"], detections["classes"], training)
            valid = tf.range(config.test_detections_per_image)[None, :] < detections["num_detections"][:, None]
            detections["masks"] = tf.where(valid[:, :, None, None], tf.sigmoid(mask_logits), 0.0)
        return detections

    def _next_sampling_seed(self, advance: bool) -> tf.Tensor:
        """(2,) int64 seed (replica id, sampling_step); then ``sampling_step += 1`` when ``advance``.

        The replica id keeps replicas that see images of one global batch from sharing random keys.
        """
        context = tf.distribute.get_replica_context()
        replica = 0 if context is None else context.replica_id_in_sync_group  # None: cross-replica context
        seed = tf.stack([tf.cast(replica, tf.int64), tf.convert_to_tensor(self.sampling_step)])
        if advance:
            self.sampling_step.assign_add(1)
        return seed

    @tf.autograph.experimental.do_not_convert
    def compute_losses(self, images, gt_boxes, gt_classes, num_instances, instance_labels, training=True,
                       seed=None) -> dict[str, tf.Tensor]:
        """Per-image training losses; the caller averages them over the global batch.

        Args:
            images: (B, H, W, C) float32, normalized.
            gt_boxes: (B, M, 4) float32 pixels ``[y0, x0, y1, x1]``; slots at or beyond ``num_instances``
                (or of zero size) are padding.
            gt_classes: (B, M) int32 in 1..num_classes-1.
            num_instances: (B,) int32; 0 is valid (an all-background image).
            instance_labels: (B, H, W) int32 (or (B, H, W, 1)); id k is ``gt_boxes[:, k - 1]``.
            training: passed to the layers.
            seed: (2,) int seed of the anchor (RPN) and ROI sampling, or None for (replica id,
                ``sampling_step``), the step then advanced by one when ``training``. The same batch, weights
                and seed give the same samples (with deterministic ops, the same losses).

        Returns:
            dict of (B,) float32: "rpn_score", "rpn_box", "box_class", "box_regression", "mask" (zero when
            ``include_mask`` is False) and "total" (their sum).
        """
        config = self.config
        images = tf.convert_to_tensor(images)
        gt_boxes = tf.cast(gt_boxes, tf.float32)
        gt_classes = tf.cast(gt_classes, tf.int32)
        num_instances = tf.cast(num_instances, tf.int32)
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        if seed is None:
            seed = self._next_sampling_seed(advance=training)
        rpn_seed, roi_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        features, scores, deltas, anchors = self._first_stage(images, training)

        levels = sorted(scores)
        rpn_target = rpn_targets(tf.concat([anchors[level] for level in levels], axis=0), gt_boxes, num_instances,
                                 config.rpn_positive_overlap, config.rpn_negative_overlap,
                                 config.rpn_batch_size_per_im, config.rpn_fg_fraction, seed=rpn_seed)
        rpn_score, rpn_box = rpn_losses(tf.concat([scores[level] for level in levels], axis=1),
                                        tf.concat([deltas[level] for level in levels], axis=1), rpn_target)

        proposals, _, proposal_valid = generate_proposals(
            scores, deltas, anchors, height, width, config.rpn_pre_nms_topn_train, config.rpn_post_nms_topn_train,
            config.rpn_nms_threshold, config.rpn_min_size)
        sample = sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, num_instances,
                             config.batch_size_per_im, config.fg_fraction, config.fg_thresh, config.bg_thresh_hi,
                             config.bg_thresh_lo, config.bbox_reg_weights, seed=roi_seed)
        batch, num_rois = tf.shape(gt_boxes)[0], config.batch_size_per_im
        class_logits, box_deltas = self.box_head(self._pool(features, sample["rois"], config.roi_pool_size),
                                                 training=training)
        class_logits = tf.reshape(tf.cast(class_logits, tf.float32), (batch, num_rois, self.num_classes))
        box_deltas = tf.reshape(tf.cast(box_deltas, tf.float32), (batch, num_rois, self.num_classes, 4))
        sampled = tf.cast(sample["sampled"], tf.float32)
        foreground = tf.cast(sample["foreground"], tf.float32)
        normalizer = tf.maximum(tf.reduce_sum(sampled, axis=1), 1.0)
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=sample["classes"], logits=class_logits)
        box_class = tf.reduce_sum(cross_entropy * sampled, axis=1) / normalizer
        class_deltas = tf.gather(box_deltas, sample["classes"], batch_dims=2)  # (B, S, 4)
        box_error = tf.reduce_sum(box_ops.smooth_l1(class_deltas - sample["box_targets"], 1.0), axis=-1)
        box_regression = tf.reduce_sum(box_error * foreground, axis=1) / normalizer

        if self.mask_head is not None:
            # foreground rows come first in the sample and are at most this many
            num_mask_rois = max(int(round(config.batch_size_per_im * config.fg_fraction)), 1)
            mask_rois = sample["rois"][:, :num_mask_rois]
            mask_fg = foreground[:, :num_mask_rois]
            mask_logits = self._class_mask_logits(features, mask_rois, sample["classes"][:, :num_mask_rois],
                                                  training)
            if len(instance_labels.shape) == 4:
                instance_labels = instance_labels[..., 0]
            targets = mask_targets(instance_labels, mask_rois, sample["matched_gt"][:, :num_mask_rois],
                                   config.mrcnn_resolution)
            pixel_loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets,
                                                                 logits=tf.cast(mask_logits, tf.float32))
            per_roi = tf.reduce_mean(pixel_loss, axis=(2, 3))
            mask = tf.reduce_sum(per_roi * mask_fg, axis=1) / tf.maximum(tf.reduce_sum(mask_fg, axis=1), 1.0)
        else:
            mask = tf.zeros_like(box_class)

        losses = {"rpn_score": rpn_score, "rpn_box": rpn_box, "box_class": box_class,
                  "box_regression": box_regression, "mask": mask}
        losses["total"] = tf.add_n(list(losses.values()))
        return losses

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """``keras.Model.export`` serving ``call`` on images of any batch and tile size.

        Keras infers the signature of a subclassed model from a previous call; this model knows it
        up front, so a freshly built or loaded model exports too.
        """
        if input_signature is None:
            input_signature = [tf.TensorSpec((None, None, None, self.input_channels), tf.float32, name="images")]
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    def get_config(self) -> dict:
        config = self.config.to_dict()
        # a saved model carries its trained weights: rebuilding it must not need (or reload) the
        # initialisation file, which the machine running inference may not have
        config["backbone_weights"] = None
        return {
            "name": self.name,
            "trainable": self.trainable,
            "config": config,
            "input_channels": self.input_channels,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_config(cls, config: dict) -> "MaskRCNN":
        return cls(**config)
