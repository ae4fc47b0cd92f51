"""Mask R-CNN anchor sizes and the inference overlap from the objects of the training data.

Pure functions of the training database's ``object_stats`` (``enki_seg.data.object_sizes``) and the
model settings; no TensorFlow. The anchor side at pyramid level l is ``anchor_scale * 2**l`` (times
``2**(s / num_scales)`` for scale s, ``models.maskrcnn.MaskRCNNConfig``), so with the levels fixed by the
preset one number sizes every anchor:

* the smallest anchor should not exceed the 5th-percentile box side (a small object inside a large
  anchor has IoU (object / anchor)**2 and never becomes a positive RPN sample):
  ``anchor_scale <= p5 / 2**min_level``;
* the largest anchor should cover the largest object: ``anchor_scale >= max / largest level side``.

When the preset's scale satisfies both it is kept; otherwise it is moved to the nearest bound. When no
scale satisfies both (objects span more octaves than the pyramid), the small objects win: they are
most of the objects in nuclei images, and a large object still gets its best anchor as a positive.

The inference overlap (pixels shared by neighbouring tiles) is at least the largest box side, so that
every object lies whole in the tile whose core holds its centre (``enki_seg.inference.instance``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from enki_seg.data.tiling import max_overlap


@dataclass
class ObjectScale:
    """What the trainer decided from the object statistics; recorded in config.json (``object_scale``).

    Attributes:
        anchor_scale: the MaskRCNNConfig.anchor_scale the model is built with.
        anchor_source: "data" (derived here), "user" (--maskrcnn anchor_scale=... or a --config file),
            or "preset" (the preset's value: the database records no object sizes).
        smallest_anchor, largest_anchor: anchor sides in pixels at the lowest and highest level.
        inference_overlap: default ``inference.py --overlap`` in pixels; None when unknown.
        warnings: the warnings logged.
        object_stats: the training database's ``object_stats``.
    """

    anchor_scale: float
    anchor_source: str
    smallest_anchor: float
    largest_anchor: float
    inference_overlap: int | None = None
    warnings: list[str] = field(default_factory=list)
    object_stats: dict = field(default_factory=dict)
    max_num_instances: int | None = None  # objects per training tile kept (the trainer's crowding())
    detection_caps: dict = field(default_factory=dict)  # test-time caps per training tile (CAP_FIELDS)

    def to_dict(self) -> dict:
        return asdict(self)


def anchor_range(anchor_scale: float, min_level: int, max_level: int, num_scales: int = 1) -> tuple[float, float]:
    """(smallest, largest) anchor side in pixels: ``scale * 2**min_level`` and the largest scale of max_level."""
    top_octave = 2.0 ** ((num_scales - 1) / num_scales)
    return anchor_scale * 2.0**min_level, anchor_scale * 2.0**max_level * top_octave


def derive_anchor_scale(small_side: float, large_side: float, min_level: int, max_level: int, num_scales: int = 1,
                        default: float = 8.0) -> float:
    """The anchor scale nearest ``default`` whose smallest anchor is <= ``small_side`` (pixels; e.g. the
    5th-percentile box side) and whose largest is >= ``large_side`` (the largest box side); when both
    cannot hold, the largest scale whose smallest anchor is <= ``small_side``. Rounded to 3 decimals."""
    if small_side <= 0 or large_side <= 0:
        raise ValueError(f"object sides must be > 0, got {small_side} and {large_side}")
    per_unit_small, per_unit_large = anchor_range(1.0, min_level, max_level, num_scales)
    upper = small_side / per_unit_small
    lower = large_side / per_unit_large
    scale = min(max(default, lower), upper) if lower <= upper else upper
    return max(round(scale, 3), 0.001)


def inference_overlap(large_side: float, tile_size: int | None, size_multiple: int = 1) -> int | None:
    """Tile overlap for inference: max(a quarter tile, the largest box side), at most what leaves the
    tile a stride (``enki_seg.data.tiling.tile_stride``); None without a tile size."""
    if tile_size is None:
        return None
    return min(max(tile_size // 4, int(math.ceil(large_side))), max_overlap(tile_size, size_multiple))


def plan_object_scale(object_stats: dict, min_level: int, max_level: int, num_scales: int, preset_scale: float,
                      user_scale: float | None = None, tile_size: int | None = None,
                      size_multiple: int = 1) -> ObjectScale:
    """Anchor scale, inference overlap and warnings for a run (module docstring).

    ``object_stats``: ``DatasetMetadata.object_stats`` ({} = unknown: the preset's anchors, no overlap);
    ``user_scale``: the scale the user set, kept as is; ``tile_size``: the training tile (None: untiled).
    """
    stats = dict(object_stats or {})
    known = bool(stats.get("count"))
    if user_scale is not None:
        scale, source = float(user_scale), "user"
    elif known:
        scale = derive_anchor_scale(stats["box_side"]["p5"], stats["box_side"]["max"], min_level, max_level,
                                    num_scales, preset_scale)
        source = "data"
    else:
        scale, source = float(preset_scale), "preset"
    smallest, largest = anchor_range(scale, min_level, max_level, num_scales)
    warnings: list[str] = []
    overlap = None
    if known:
        small, large = stats["box_side"]["p5"], stats["box_side"]["max"]
        if small < smallest:
            warnings.append(f"5% of the training objects have a box side under {small:g} px, smaller than the "
                            f"smallest anchor ({smallest:g} px): the RPN will miss many of them; lower "
                            "--maskrcnn anchor_scale (or drop it to derive it from the data)")
        if large > largest:
            warnings.append(f"the largest training object has a box side of {large:g} px, beyond the largest "
                            f"anchor ({largest:g} px): such objects are found less reliably; a preset with more "
                            "pyramid levels (--maskrcnn max_level=...) covers them")
        if tile_size is not None and large > tile_size:
            warnings.append(f"the largest training object ({large:g} px box side) is larger than the training "
                            f"tile ({tile_size} px): tiles cut it; build the databases with a larger --tile_size")
        overlap = inference_overlap(large, tile_size, size_multiple)
    return ObjectScale(scale, source, smallest, largest, overlap, warnings, stats)


# ----------------------------------------------------------------------------- caps per tile

#: The MaskRCNNConfig fields that cap the objects found in one tile at test time.
CAP_FIELDS = ("test_detections_per_image", "rpn_post_nms_topn_test", "rpn_pre_nms_topn_test")


def objects_per_tile(object_stats: dict, tile_area: int) -> int | None:
    """The most objects a tile of ``tile_area`` pixels should be expected to hold: the most crowded training
    record's objects per pixel (pieces cut by its edges included) times the area; None when the statistics
    predate per-record counts."""
    density = (object_stats or {}).get("per_record", {}).get("per_megapixel_max")
    if density is None:
        return None
    return int(math.ceil(density * tile_area / 1e6))


def detection_caps(detections: int, preset: dict) -> dict:
    """``test_detections_per_image`` = ``detections`` and the proposal counts that keep the preset's ratios
    (``rpn_post_nms_topn_test`` per detection, ``rpn_pre_nms_topn_test`` per proposal; at least 2 each)
    when ``detections`` exceeds the preset's, else the preset's proposals. ``preset``: those three MaskRCNNConfig fields."""
    base_detections = preset["test_detections_per_image"]
    base_post, base_pre = preset["rpn_post_nms_topn_test"], preset["rpn_pre_nms_topn_test"]
    post, pre = base_post, base_pre
    if detections > base_detections:
        post = max(base_post, int(math.ceil(detections * max(2.0, base_post / base_detections))))
        pre = max(base_pre, int(math.ceil(post * max(2.0, base_pre / base_post))))
    return {"test_detections_per_image": int(detections), "rpn_post_nms_topn_test": post,
            "rpn_pre_nms_topn_test": pre}


def scaled_caps(model_caps: dict, trained_tile: int | None, tile: int, detections: int | None = None) -> dict:
    """The caps of an inference tile of ``tile`` px a side: ``detections`` when given (``--max_detections``),
    else the model's ``test_detections_per_image`` (set for its training tile ``trained_tile``) times the
    ratio of the tiles' areas, never fewer; proposals follow (:func:`detection_caps`)."""
    if detections is None:
        ratio = 1.0 if not trained_tile else max(1.0, (tile / trained_tile) ** 2)
        detections = int(math.ceil(model_caps["test_detections_per_image"] * ratio))
    return detection_caps(detections, model_caps)
