"""Mask R-CNN hyper-parameters: one typed dataclass with TAO ``maskrcnn_config`` names and two presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("small", "resnet50", "resnet101")


@dataclass
class MaskRCNNConfig:
    """Everything that shapes a Mask R-CNN; names follow NVIDIA TAO's ``maskrcnn_config`` where they exist.

    Boxes are in pixels of the (already tiled) input image. Defaults are TAO's (ResNet-50 FPN, P2-P6);
    ``MaskRCNNConfig.preset("small")`` gives a ~1.5M-parameter model for 128x128 tiles.

    Attributes:
        backbone: "small" (GroupNorm conv stack, C2..C4 or C5), "resnet50" or "resnet101" (C2..C5).
        backbone_weights: None (random init) or the path of a local weights file for the ResNet backbone,
            loaded by layer name; layers whose shapes differ (the first conv with other than 3 input
            channels) are skipped.
        fpn_channels: channels of every pyramid level and of the RPN head.
        min_level, max_level: pyramid levels P_min..P_max (stride 2**level); levels above the backbone's
            last come from stride-2 max pooling.
        num_scales: anchor scales per octave.
        aspect_ratios: anchor width/height ratios (TAO/Model Garden convention: 2.0 is a wide box).
        anchor_scale: anchor side at level l is ``anchor_scale * 2**l`` (times ``2**(s/num_scales)``).
        rpn_positive_overlap, rpn_negative_overlap: anchor IoU with a gt at/above which an anchor is
            positive, below which it is negative (between: ignored).
        rpn_batch_size_per_im, rpn_fg_fraction: anchors sampled per image for the RPN loss and their
            positive fraction.
        rpn_min_size: proposals with a side not above this many pixels are dropped.
        rpn_pre_nms_topn_train/test: proposals kept per level before NMS.
        rpn_post_nms_topn_train/test: proposals kept per image after NMS, over all levels.
        rpn_nms_threshold: IoU of proposal NMS.
        batch_size_per_im, fg_fraction: ROIs sampled per image for the box/mask heads, fraction foreground.
        fg_thresh: IoU at/above which a ROI is foreground; bg_thresh_lo <= IoU < bg_thresh_hi: background.
        bbox_reg_weights: (wy, wx, wh, ww) scaling of the box head's regression targets.
        fast_rcnn_fc_dim: width of the box head's two fully connected layers.
        mask_head_convs, mask_head_channels: 3x3 convolutions of the mask head and their width.
        mrcnn_resolution: side of the predicted masks (the mask head's ROIAlign samples half of it).
        roi_pool_size: side of the box head's ROIAlign output.
        roi_canonical_size, roi_canonical_level: a ROI of side ``roi_canonical_size`` pixels is pooled from
            ``roi_canonical_level`` (FPN paper: 224 on P4); each halving of the side goes one level down.
        test_detections_per_image: detections returned per image (D; rows beyond the count are zero).
        test_nms: IoU of the per-class detection NMS.
        box_score_threshold: detections scoring below this are dropped.
        max_num_instances: gt objects per image the trainer pads/caps to.
        include_mask: predict masks (the mask head and its loss); False gives a Faster R-CNN.
    """

    backbone: str = "resnet50"
    backbone_weights: str | None = None
    fpn_channels: int = 256
    min_level: int = 2
    max_level: int = 6
    num_scales: int = 1
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 0.5])
    anchor_scale: float = 8.0
    rpn_positive_overlap: float = 0.7
    rpn_negative_overlap: float = 0.3
    rpn_batch_size_per_im: int = 256
    rpn_fg_fraction: float = 0.5
    rpn_min_size: float = 0.0
    rpn_pre_nms_topn_train: int = 2000
    rpn_pre_nms_topn_test: int = 1000
    rpn_post_nms_topn_train: int = 1000
    rpn_post_nms_topn_test: int = 1000
    rpn_nms_threshold: float = 0.7
    batch_size_per_im: int = 512
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.0
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    fast_rcnn_fc_dim: int = 1024
    mask_head_convs: int = 4
    mask_head_channels: int = 256
    mrcnn_resolution: int = 28
    roi_pool_size: int = 7
    roi_canonical_size: float = 224.0
    roi_canonical_level: int = 4
    test_detections_per_image: int = 100
    test_nms: float = 0.5
    box_score_threshold: float = 0.05
    max_num_instances: int = 100
    include_mask: bool = True

    def __post_init__(self):
        self.aspect_ratios = [float(r) for r in self.aspect_ratios]
        self.bbox_reg_weights = tuple(float(w) for w in self.bbox_reg_weights)
        self.validate()

    @property
    def anchors_per_location(self) -> int:
        """Anchors at every feature-map position: ``num_scales * len(aspect_ratios)``."""
        return self.num_scales * len(self.aspect_ratios)

    @property
    def backbone_max_level(self) -> int:
        """Last level the backbone computes (C4 for "small" up to max_level 4, else C5)."""
        if self.backbone == "small":
            return min(self.max_level, 5)
        return 5

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        def fail(name, rule):
            raise ValueError(f"MaskRCNNConfig.{name}={getattr(self, name)!r}: {rule}")

        if self.backbone not in BACKBONES:
            fail("backbone", f"choose one of {', '.join(BACKBONES)}")
        if self.backbone == "small" and self.backbone_weights is not None:
            fail("backbone_weights", "only the ResNet backbones load a weights file")
        for name in ("fpn_channels", "num_scales", "rpn_batch_size_per_im", "rpn_pre_nms_topn_train",
                     "rpn_pre_nms_topn_test", "rpn_post_nms_topn_train", "rpn_post_nms_topn_test",
                     "batch_size_per_im", "fast_rcnn_fc_dim", "mask_head_channels", "roi_pool_size",
                     "test_detections_per_image", "max_num_instances"):
            if int(getattr(self, name)) < 1:
                fail(name, "must be >= 1")
        if self.mask_head_convs < 0:
            fail("mask_head_convs", "must be >= 0")
        if self.mrcnn_resolution < 2 or self.mrcnn_resolution % 2:
            fail("mrcnn_resolution", "must be an even number >= 2 (the mask head upsamples by 2)")
        if not 2 <= self.min_level <= self.max_level:
            fail("min_level", f"need 2 <= min_level <= max_level (max_level={self.max_level})")
        if self.max_level > 7:
            fail("max_level", "must be <= 7")
        if self.backbone != "small" and self.max_level < 5:
            fail("max_level", "ResNet backbones end at C5: use max_level >= 5")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            fail("aspect_ratios", "need at least one ratio, all > 0")
        if self.anchor_scale <= 0:
            fail("anchor_scale", "must be > 0")
        for name in ("rpn_positive_overlap", "rpn_negative_overlap", "rpn_fg_fraction", "rpn_nms_threshold",
                     "fg_fraction", "fg_thresh", "bg_thresh_hi", "bg_thresh_lo", "test_nms",
                     "box_score_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must be in [0, 1]")
        if self.rpn_negative_overlap > self.rpn_positive_overlap:
            fail("rpn_negative_overlap", "must be <= rpn_positive_overlap")
        if self.bg_thresh_lo > self.bg_thresh_hi:
            fail("bg_thresh_lo", "must be <= bg_thresh_hi")
        if len(self.bbox_reg_weights) != 4 or any(w <= 0 for w in self.bbox_reg_weights):
            fail("bbox_reg_weights", "need 4 positive weights (wy, wx, wh, ww)")
        if self.rpn_min_size < 0:
            fail("rpn_min_size", "must be >= 0")
        if self.roi_canonical_size <= 0:
            fail("roi_canonical_size", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (lists, not tuples)."""
        values = dataclasses.asdict(self)
        values["bbox_reg_weights"] = list(self.bbox_reg_weights)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MaskRCNNConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them, missing keys take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown MaskRCNNConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> "MaskRCNNConfig":
        """A named configuration, fields in ``overrides`` replacing its values.

        "small": P2-P4 at 64 channels on a GroupNorm backbone; anchors of 8, 16, 32 px for 128x128 tiles
        with objects of ~8-40 px; smaller sample sizes (few objects per tile). About 1.5M parameters.
        "resnet50" / "resnet101": TAO's defaults (P2-P6, 256 channels, anchors 32..512 px).
        """
        if name == "small":
            values = dict(
                backbone="small", fpn_channels=64, min_level=2, max_level=4,
                # anchor side 2 * 2**level: 8, 16, 32 px on P2..P4 covers objects of ~6-45 px
                anchor_scale=2.0,
                # a 128x128 tile holds tens of objects, not hundreds: far fewer samples and proposals than
                # TAO's, and the mask head (the costliest part on a CPU) sees at most 16 ROIs per tile
                rpn_batch_size_per_im=128, rpn_pre_nms_topn_train=500, rpn_pre_nms_topn_test=500,
                rpn_post_nms_topn_train=256, rpn_post_nms_topn_test=256,
                batch_size_per_im=64, fast_rcnn_fc_dim=256, mask_head_convs=2, mask_head_channels=64,
                # pooled level matches the anchor level: a 32 px ROI on P4, 16 px on P3, 8 px on P2
                roi_canonical_size=32.0, roi_canonical_level=4,
            )
        elif name in ("resnet50", "resnet101"):
            values = dict(backbone=name)
        else:
            raise ValueError(f"unknown MaskRCNNConfig preset {name!r}; choose small, resnet50 or resnet101")
        values.update(overrides)
        return cls(**values)
