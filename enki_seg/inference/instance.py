"""Detects object instances in images of any size with a Mask R-CNN run: tiled, merged across tiles, written.

``inference.py`` hands runs whose config.json names the model ``maskrcnn`` to this module:

    python inference.py --model runs/maskrcnn --image_folder imgs --output_folder preds \\
        --mask_folder instance_masks --save_overlay 1 --score_threshold 0.5

For each input ``a.tif`` it writes ``OUT/a.tif`` (instance labels: 0 background, ids 1..N by
descending score, uint16, uint32 above 65,535 objects; for a slide read by region a tiled, pyramidal
OME-TIFF painted band by band, :func:`instance_label_bands`), with ``--save_overlay 1``
``OUT/overlays/a.png`` (instance outlines coloured by class), and for the folder
``OUT/detections.json``: COCO-shaped (``images`` with ids = position in the sorted file list and
file names, ``categories``, ``annotations`` = the COCO results with ``score`` and an ``id``), so
``COCO(path)`` loads it and ``gt.loadRes(data["annotations"])`` evaluates it. With
``--mask_folder`` of instance-label images (matched by file stem) it writes ``OUT/metrics.json``
(COCO box and mask AP, :class:`coco_ap.CocoEvaluator`); every instance is class 1 for a run of
one foreground class, otherwise ``--class_folder`` holds semantic masks and an instance's class is
the most frequent foreground class under it (``enki_seg.data.labels.majority_classes``).

Tiles. The model sees tiles of ``tile_size`` (default: the training tile) cut as the semantic path
cuts them (``enki_seg.data.tiling.plan_tiles``: starts on the size multiple, reflection beyond the border,
each tile normalized on its own window as in training), overlapping by ``overlap`` pixels (default
the run's ``input.inference_overlap``, at least its largest training object, else a quarter tile); an
image within one tile is padded by reflection to the size multiple and seen whole. Each tile has a
*core*: the part of the image nearer to it than to its neighbours (the half-overlap split of the
semantic path); the cores partition the image.

Merging rule (no object twice, none cut at a seam):
  1. a detection whose box centre lies outside the real image (a mirrored copy in the reflected
     padding) is dropped; boxes and masks are clipped to the image;
  2. a detection is *cut* when its box touches an edge of its tile that is not an image edge;
     a cut detection whose centre lies outside its tile's core is dropped (it is the piece of an
     object that the neighbouring tile, owning the object's centre, sees whole);
  3. the rest are taken in order: uncut first, then centre-in-core first, then higher score; each
     is dropped when its mask covers more than half of the smaller of itself and an already kept
     detection of another tile (intersection over the smaller area, so the piece of an object
     is matched with the whole). Detections of one tile never suppress each other: the model's own
     NMS decided those, so an image of one tile gives exactly the model's detections.
An object no wider than ``overlap`` is seen whole by the tile whose core holds its centre, so it is
kept once and whole; larger objects may come out cut at a seam. Masks are kept as crops with
offsets, so memory grows with the objects' area, never with N x H x W.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enki_seg.data import image_io, tiling
from enki_seg.data.labels import majority_classes, paint_instances
from enki_seg.data.tiling import Tile
from enki_seg.evaluation import coco_ap, instance_matching
from enki_seg.files import atomic_path, atomic_write_text
from enki_seg.inference import core
from enki_seg.inference.core import InferenceError
from enki_seg.training import object_scale

logger = logging.getLogger("inference")

#: The model name in config.json that inference.py hands to this module.
MODEL_NAME = "maskrcnn"
#: A detection overlapping a kept one of another tile by more than this fraction of the smaller
#: mask is the same object.
DUPLICATE_OVERLAP = 0.5


# ----------------------------------------------------------------------------- detections


@dataclass
class Detections:
    """The N instances found in one image, sorted by descending score.

    ``boxes``: (N, 4) float32 [y0, x0, y1, x1] image pixels, end exclusive; ``scores``: (N,)
    float32; ``classes``: (N,) int32 (1..K-1); ``masks``: N (h_i, w_i) bool crops whose top-left
    pixels lie at ``offsets``: (N, 2) int64 (y, x).
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: list[np.ndarray]
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def dense_masks(self, height: int, width: int) -> np.ndarray:
        """(N, H, W) bool masks (N * H * W bytes: for tests and small images)."""
        dense = np.zeros((len(self), height, width), bool)
        for i, (crop, (y, x)) in enumerate(zip(self.masks, self.offsets)):
            dense[i, y : y + crop.shape[0], x : x + crop.shape[1]] = crop
        return dense

    def rles(self, height: int, width: int) -> list[dict]:
        """COCO RLEs of the masks in a ``height`` x ``width`` image (``coco_ap.crop_to_rle``)."""
        return [coco_ap.crop_to_rle(crop, y, x, height, width) for crop, (y, x) in zip(self.masks, self.offsets)]


def instance_labels(detections: Detections, height: int, width: int) -> np.ndarray:
    """(H, W) int32 instance labels: detection i (in score order) gets id i + 1; overlaps go to the higher score."""
    return paint_instances(detections.scores, detections.masks, detections.offsets, (height, width))


def instance_label_bands(detections: Detections, height: int, width: int, rows: int, dtype=np.int32):
    """Yield the rows of :func:`instance_labels` ``rows`` at a time, as (h, W) ``dtype``, never the whole image.

    The same ids (score rank + 1, over all detections of the image) and the same overlap rule; each
    band paints only the detections whose crops reach into it.
    """
    scores = np.asarray(detections.scores, np.float64).reshape(-1)
    rank = np.empty(len(scores), np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    offsets = np.asarray(detections.offsets, np.int64).reshape(-1, 2)
    tops = offsets[:, 0]
    bottoms = tops + np.array([crop.shape[0] for crop in detections.masks], np.int64)
    for b0 in range(0, height, rows):
        b1 = min(b0 + rows, height)
        band = np.zeros((b1 - b0, width), dtype)
        hits = np.flatnonzero((tops < b1) & (bottoms > b0))
        for index in hits[np.argsort(-rank[hits], kind="stable")]:  # the worst first: better ones paint over it
            crop = np.asarray(detections.masks[index], bool)
            y, x = offsets[index]
            top, bottom = max(y, b0), min(y + crop.shape[0], b1)
            band[top - b0 : bottom - b0, x : x + crop.shape[1]][crop[top - y : bottom - y]] = rank[index] + 1
        yield band


@dataclass
class _Candidates:
    """Detections of tiles before merging; the arrays as in :class:`Detections` plus the merge facts."""

    tiles: np.ndarray      # (N,) int: index of the tile that found each one
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: list[np.ndarray]
    offsets: np.ndarray
    in_core: np.ndarray    # (N,) bool: box centre in the tile's core
    cut: np.ndarray        # (N,) bool: box touches a tile edge that is not an image edge

    @classmethod
    def concatenate(cls, parts: list["_Candidates"]) -> "_Candidates":
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int32), [], np.zeros((0, 2), np.int64), np.zeros(0, bool), np.zeros(0, bool))
        return cls(*(sum((p.masks for p in parts), []) if name == "masks"
                     else np.concatenate([getattr(p, name) for p in parts])
                     for name in cls.__dataclass_fields__))


def merge(candidates: _Candidates) -> Detections:
    """Apply rule 3 of the module docstring to eligible candidates; returns them sorted by descending score."""
    n = len(candidates.scores)
    areas = np.array([crop.sum() for crop in candidates.masks], np.int64)
    ends = candidates.offsets + np.array([crop.shape for crop in candidates.masks], np.int64).reshape(-1, 2)
    kept = np.zeros(n, bool)
    for c in np.lexsort((-candidates.scores, ~candidates.in_core, candidates.cut)):  # last key sorts first
        (y0, x0), (y1, x1) = candidates.offsets[c], ends[c]
        others = np.flatnonzero(kept & (candidates.tiles != candidates.tiles[c])
                                & (candidates.offsets[:, 0] < y1) & (ends[:, 0] > y0)
                                & (candidates.offsets[:, 1] < x1) & (ends[:, 1] > x0))
        kept[c] = not any(_overlap(candidates, c, o, ends) > DUPLICATE_OVERLAP * min(areas[c], areas[o])
                          for o in others)
    order = [i for i in np.argsort(-candidates.scores, kind="stable") if kept[i]]
    return Detections(candidates.boxes[order], candidates.scores[order], candidates.classes[order],
                      [candidates.masks[i] for i in order], candidates.offsets[order])


def _overlap(candidates: _Candidates, a: int, b: int, ends: np.ndarray) -> int:
    """Pixels shared by the masks of candidates ``a`` and ``b``."""
    top, left = np.maximum(candidates.offsets[a], candidates.offsets[b])
    bottom, right = np.minimum(ends[a], ends[b])
    if bottom <= top or right <= left:
        return 0
    pieces = [candidates.masks[i][top - candidates.offsets[i][0] : bottom - candidates.offsets[i][0],
                                  left - candidates.offsets[i][1] : right - candidates.offsets[i][1]] for i in (a, b)]
    return int(np.count_nonzero(pieces[0] & pieces[1]))


# ----------------------------------------------------------------------------- the detector


class Detector:
    """A detection model ready for whole images: normalization, tiling, batching, merging across tiles.

    Args:
        predict_fn: (B, h, w, C) float32 normalized tiles -> dict of numpy arrays ``boxes`` (B, D, 4)
            float32 [y0, x0, y1, x1] tile pixels, ``scores`` (B, D), ``classes`` (B, D) int,
            ``num_detections`` (B,) int and ``masks`` (B, D, R, R) float box-relative probabilities.
        paste_fn: ``paste_fn(boxes (n, 4), masks (n, R, R), height, width) -> (n, height, width) bool``
            (``models.maskrcnn.paste_masks``).
        normalize: the run's ``Normalization`` (scope "image": every tile gets the whole image's
            statistics), or a function ``normalize(raw (h, w, C) tile, out=(h, w, C) float32)`` applied
            to each tile on its own.
        tile_size: model input tile (pixels a side), a multiple of ``size_multiple``.
        overlap: pixels shared by neighbouring tiles (default a quarter tile); at least the
            largest object's size.
        batch_size: tiles per model call.
        score_threshold: detections scoring below it are ignored.
        size_multiple: tile starts and sizes are multiples of it (the model's pooling grid).
    """

    def __init__(self, predict_fn, paste_fn, normalize, tile_size: int, overlap: int | None = None,
                 batch_size: int = 4, score_threshold: float = 0.5, size_multiple: int = 1):
        if tile_size < size_multiple or tile_size % size_multiple:
            raise ValueError(f"tile size {tile_size} is not a multiple of the model's size multiple {size_multiple}")
        overlap = tile_size // 4 if overlap is None else overlap
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {overlap}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.margin = -(-overlap // 2)
        self.stride = tiling.tile_stride(tile_size, self.margin, size_multiple)  # ValueError when none is left
        self.predict_fn, self.paste_fn, self.normalize = predict_fn, paste_fn, normalize
        self.tile_size, self.overlap, self.batch_size = tile_size, overlap, batch_size
        self.score_threshold, self.size_multiple = score_threshold, size_multiple

    def plan(self, height: int, width: int) -> list[Tile]:
        """Tiles for an image of ``height`` x ``width`` (unpadded) pixels; their kept parts are the cores."""
        padded_h, padded_w = tiling.padded_size(height, width, self.size_multiple)
        return tiling.plan_tiles(padded_h, padded_w, self.tile_size, self.margin, self.size_multiple)

    def for_image(self, path: Path) -> "Detector":
        """The detector of the image at ``path``: this one (``blocks.AssembledDetector`` answers per image)."""
        return self

    def detect(self, image: np.ndarray, progress=None) -> Detections:
        """Instances of an (H, W, C) image, merged across tiles; ``progress`` gets ``update(n)`` per batch."""
        return merge(self.candidates(image, progress))

    def candidates(self, image: np.ndarray, progress=None, wanted=None) -> _Candidates:
        """The tiles' detections before merging (rules 1 and 2), in plan order; ``wanted``: only these tile indices."""
        height, width = image.shape[:2]
        tiles = self.plan(height, width)
        padded = tiling.padded_size(height, width, self.size_multiple)
        parts = []
        # a Normalization with scope "image" takes the whole image's statistics for every tile
        normalize = self.normalize.for_image(image) if hasattr(self.normalize, "for_image") else self.normalize
        for start, group, batch in core.normalized_batches(image, tiles, normalize, self.batch_size, wanted):
            outputs = self.predict_fn(batch)
            for j, tile in enumerate(group):
                if wanted is None or start + j in wanted:
                    parts.append(self._tile_candidates(outputs, j, tile, start + j, (height, width), padded))
            if progress is not None:
                progress.update(len(group))
        return _Candidates.concatenate(parts)

    def _tile_candidates(self, outputs: dict, j: int, tile: Tile, index: int, shape, padded) -> _Candidates:
        """Rules 1 and 2 of the module docstring on the detections of batch entry ``j`` (``tile``)."""
        count = int(outputs["num_detections"][j])
        scores = np.asarray(outputs["scores"][j, :count], np.float32)
        keep = np.flatnonzero(scores >= self.score_threshold)
        boxes = np.asarray(outputs["boxes"][j, :count], np.float32)[keep]
        origin = np.array([tile.y, tile.x, tile.y, tile.x], np.float32)
        centres_y, centres_x = (boxes[:, 0] + boxes[:, 2]) / 2 + tile.y, (boxes[:, 1] + boxes[:, 3]) / 2 + tile.x
        inside = (centres_y < shape[0]) & (centres_x < shape[1])
        in_core = ((tile.keep_y0 <= centres_y) & (centres_y < tile.keep_y1)
                   & (tile.keep_x0 <= centres_x) & (centres_x < tile.keep_x1))
        cut = (((boxes[:, 0] < 1) & (tile.y > 0)) | ((boxes[:, 1] < 1) & (tile.x > 0))
               | ((boxes[:, 2] > tile.height - 1) & (tile.y + tile.height < padded[0]))
               | ((boxes[:, 3] > tile.width - 1) & (tile.x + tile.width < padded[1])))
        eligible = np.flatnonzero(inside & (in_core | ~cut))
        masks = (self.paste_fn(boxes[eligible], np.asarray(outputs["masks"][j, :count])[keep][eligible],
                               tile.height, tile.width) if eligible.size else [])
        # the part of the tile inside the image; masks are kept as crops of it
        rows, cols = min(tile.height, shape[0] - tile.y), min(tile.width, shape[1] - tile.x)
        chosen, crops, offsets = [], [], []
        for mask, i in zip(masks, eligible):
            ys, xs = np.nonzero(np.asarray(mask)[:rows, :cols])
            if ys.size == 0:
                continue  # nothing of it inside the image
            y0, x0 = ys.min(), xs.min()
            crops.append(np.ascontiguousarray(mask[y0 : ys.max() + 1, x0 : xs.max() + 1], dtype=bool))
            offsets.append((tile.y + y0, tile.x + x0))
            chosen.append(i)
        chosen = np.asarray(chosen, np.int64)
        image_boxes = np.clip(boxes[chosen] + origin, 0, np.array([*shape, *shape], np.float32))
        return _Candidates(np.full(len(chosen), index), image_boxes.astype(np.float32), scores[keep][chosen],
                           np.asarray(outputs["classes"][j, :count], np.int32)[keep][chosen], crops,
                           np.asarray(offsets, np.int64).reshape(-1, 2), in_core[chosen], cut[chosen])


# ----------------------------------------------------------------------------- outputs


def write_instance_labels(path: Path, labels: np.ndarray) -> Path:
    """(H, W) instance labels as uint16 (uint32 above 65,535 ids) TIFF or PNG (``core.write_labels``)."""
    dtype = np.uint16 if int(labels.max(initial=0)) < 2**16 else np.uint32
    if dtype == np.uint32 and path.suffix.lower() == ".png":
        raise image_io.InputError(f"{path}: {int(labels.max())} instances do not fit a PNG (16 bits); "
                                  "use --output_format tif")
    return core.write_labels(path, labels.astype(dtype, copy=False))


def write_instance_overlay(path: Path, image: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                           num_classes: int, step: int | None = None) -> Path:
    """PNG of channel 0 with each instance's outline tinted by its class (``classes``: (N,) class of id k at k - 1).

    ``step``: ``labels`` is already ``full_labels[::step, ::step]`` (a slide, gathered band by band).
    """
    from skimage.segmentation import find_boundaries

    if step is None:
        step = max(1, -(-max(labels.shape) // core.OVERLAY_MAX_SIDE))  # outlines of the preview, not thinned out
        small = labels[::step, ::step]
    else:
        small = labels
    class_of_id = np.concatenate([[0], np.asarray(classes, np.int64)])
    outlines = np.where(find_boundaries(small, mode="inner"), class_of_id[small], 0)
    return core.write_overlay(path, core.subsample(image, step), outlines, num_classes)


def _json_safe(value):
    """NaN -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data) -> Path:
    """``data`` as strict JSON (NaN written as null), atomically."""
    atomic_write_text(path, json.dumps(_json_safe(data), indent=1))
    return path


def coco_results_file(images: list[dict], categories: list[dict], results: list[dict]) -> dict:
    """The ``detections.json`` document: COCO-shaped, the results numbered as annotations."""
    return {"images": images, "categories": categories,
            "annotations": [dict(result, id=i + 1) for i, result in enumerate(results)]}


# ----------------------------------------------------------------------------- the CLI path


def check_arguments(run: core.RunInfo, args: argparse.Namespace) -> None:
    """InferenceError for flags that do not fit a Mask R-CNN run (before any model is loaded)."""
    if getattr(args, "save_probabilities", 0):
        raise InferenceError("--save_probabilities is for semantic runs; a maskrcnn run writes instance labels "
                             "and detections.json — drop the flag")
    if getattr(args, "margin", None) is not None:
        raise InferenceError("--margin is for semantic runs; use --overlap (pixels shared by tiles, at least the "
                             "largest object) for a maskrcnn run")
    if args.mask_folder and run.num_classes > 2 and not args.class_folder:
        raise InferenceError(f"{run.folder / 'config.json'} has {run.num_classes - 1} object classes: with "
                             "--mask_folder (instance labels) pass --class_folder (semantic masks) to give each "
                             "instance its class")


def model_functions(run: core.RunInfo, tile: int | None = None, max_detections: int | None = None):
    """(predict_fn, paste_fn) of the run's model: a traced call returning numpy, and ``models.maskrcnn.paste_masks``.

    With ``tile``, the model's caps per tile (detections and proposals, set for its training tile) are
    scaled to a ``tile`` px tile by area (:func:`object_scale.scaled_caps`), or set from
    ``max_detections`` (``--max_detections``): a tile four times the training tile's area holds four
    times the objects, and a cap of the training tile's would drop the rest of a crowded tile's."""
    import dataclasses

    import tensorflow as tf

    from models.maskrcnn import paste_masks

    model = core.load_model(run, check_outputs=False)
    if tile is not None:
        trained = {k: getattr(model.config, k) for k in object_scale.CAP_FIELDS}
        caps = object_scale.scaled_caps(trained, run.tile_size, tile, max_detections)
        model.config = dataclasses.replace(model.config, **caps)
        logger.info("at most %d detections from %d proposals per %d px tile (%s)", caps["test_detections_per_image"],
                    caps["rpn_post_nms_topn_test"], tile,
                    "--max_detections" if max_detections is not None else
                    f"the run's {trained['test_detections_per_image']} per {run.tile_size} px training tile, "
                    "scaled by area; --max_detections changes it")
    # no input signature: the model may need static tile sizes; reduce_retracing covers the last, smaller batch
    traced = tf.function(lambda images: model(images, training=False), reduce_retracing=True, autograph=False)

    def predict(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.asarray(value) for name, value in traced(tf.constant(batch)).items()}

    return predict, paste_masks


def default_overlap(run: core.RunInfo, tile: int) -> int | None:
    """The overlap when --overlap is not given: the run's ``inference_overlap`` (at least its largest training
    object) capped to what ``tile`` allows, else None (a quarter tile)."""
    recorded = run.inference_overlap
    if recorded is None:
        return None
    allowed = tiling.max_overlap(tile, run.size_multiple)
    if recorded > allowed:
        logger.warning("%s recommends an overlap of %d px (its largest training object) but a %d px tile allows "
                       "at most %d: objects wider than that may be cut; pass a larger --tile_size",
                       run.folder / "config.json", recorded, tile, allowed)
        return allowed
    logger.info("tile overlap %d px (the run's largest training object; --overlap changes it)", recorded)
    return recorded


def load_detector(run: core.RunInfo, args: argparse.Namespace) -> Detector:
    """A :class:`Detector` of the run's model with the CLI's tile, overlap, batch and threshold settings."""
    tile = args.tile_size or run.tile_size
    if tile is None:
        raise InferenceError(f"{run.folder / 'config.json'} records no tile size; pass --tile_size")
    overlap = args.overlap if args.overlap is not None else default_overlap(run, tile)
    max_detections = getattr(args, "max_detections", None)
    if max_detections is not None and max_detections < 1:
        raise InferenceError(f"--max_detections must be >= 1, got {max_detections}")
    predict, paste = model_functions(run, tile, max_detections)
    try:
        return Detector(predict, paste, run.normalization, tile, overlap=overlap,
                        batch_size=args.batch_size,
                        score_threshold=0.5 if args.score_threshold is None else args.score_threshold,
                        size_multiple=run.size_multiple)
    except ValueError as exc:
        raise InferenceError(f"{exc}; change --tile_size, --overlap or --batch_size") from None


def instance_classes(instances: np.ndarray, semantic_mask: np.ndarray | None, num_classes: int) -> np.ndarray:
    """(N,) int class of each ground-truth instance id 1..N for scoring (``majority_classes``).

    1 without a semantic mask, else the majority foreground class under the instance. An object
    without a class (entirely on background in the class mask, or an id that does not occur) is
    scored as class 1, as without a class mask: the score stays defined where the builder would
    refuse the data. Class-mask labels beyond the run's classes count as its last class.
    """
    if semantic_mask is not None:
        semantic_mask = np.clip(semantic_mask.astype(np.int64), 0, num_classes - 1)
    classes, _ = majority_classes(instances, semantic_mask)
    return np.where(classes[1:] > 0, classes[1:], 1)


def _write_labels(path: Path, image, detections: Detections, output: Path, args, num_classes: int) -> np.ndarray:
    """Today's outputs of an image: the whole (H, W) label image, written at once (and its overlay)."""
    labels = instance_labels(detections, *image.shape[:2])
    write_instance_labels(output / f"{path.stem}.{args.output_format}", labels)
    if args.save_overlay:
        write_instance_overlay(output / "overlays" / f"{path.stem}.png", image, labels, detections.classes,
                               num_classes)
    return labels


def _write_slide_labels(path: Path, source, detections: Detections, output: Path, args, num_classes: int) -> None:
    """A slide read by region: its labels painted band by band into a pyramidal OME-TIFF ``OUT/NAME.tif``.

    Ids as in :func:`instance_labels` (unique over the slide; objects cut by tile seams were merged
    by the detector); uint16, uint32 when the slide has 65,536 detections or more. The overlay is
    gathered from the bands, subsampled.
    """
    from enki_seg.inference import pyramid

    height, width = source.shape[:2]
    if args.output_format != "tif":
        logger.warning("%s is read by region: its labels are written as a pyramidal OME-TIFF %s.tif, not %s",
                       path.name, path.stem, args.output_format)
    dtype = np.uint16 if len(detections) < 2**16 else np.uint32
    step = max(1, -(-max(height, width) // core.OVERLAY_MAX_SIDE))
    preview: list[np.ndarray] = []
    target = output / f"{path.stem}.tif"
    with atomic_path(target) as tmp, pyramid.PyramidWriter(tmp, height, width, dtype, "nearest") as writer:
        y = 0
        for band in instance_label_bands(detections, height, width, 2 * pyramid.TILE, dtype):
            writer.add(band)
            if args.save_overlay:
                preview.append(band[-(-y // step) * step - y :: step, ::step])
            y += band.shape[0]
        writer.finish()
    if args.save_overlay:
        write_instance_overlay(output / "overlays" / f"{path.stem}.png", source, np.concatenate(preview),
                               detections.classes, num_classes, step=step)


def detect_folder(job: core.Job, detector, args: argparse.Namespace, categories: list[dict] | None = None) -> int:
    """Detect, write and evaluate every file of ``job`` with ``detector`` (anything with
    ``detect(image) -> Detections``); returns the exit code (0, or 1 on failures). ``categories`` (COCO
    ``{"id", "name"}``) default to the run's classes 1..K-1.

    With ``--mask_folder``, metrics.json holds COCO box/mask AP and ``instance_matching``: the per-image
    object matching at IoU 0.5 ... 0.95 (``enki_seg.evaluation.instance_matching``), summed over the
    folder and averaged over images, with the DSB2018 score."""
    run, output = job.run, job.output
    if categories is None:
        categories = [{"id": k, "name": run.class_names[k]} for k in range(1, run.num_classes)]
    matchings: list = []
    evaluator = (coco_ap.CocoEvaluator([c["id"] for c in categories], {c["id"]: c["name"] for c in categories})
                 if job.masks is not None else None)
    class_masks = job.class_masks if evaluator is not None else None
    image_ids = {path: i for i, path in enumerate(job.files)}
    images: list[dict] = []
    results: list[dict] = []
    unmatched: list[str] = []

    def handle(path: Path, image: np.ndarray) -> None:
        height, width = image.shape[:2]
        detections = detector.for_image(path).detect(image)
        if getattr(image, "tile_wise", False) and evaluator is None:
            _write_slide_labels(path, image, detections, output, args, run.num_classes)
            labels = None
        else:
            labels = _write_labels(path, image, detections, output, args, run.num_classes)
        image_id = image_ids[path]
        rles = detections.rles(height, width)
        images.append({"id": image_id, "file_name": path.name, "height": height, "width": width})
        results.extend(coco_ap.detections_to_coco_results(detections.boxes, detections.scores,
                                                            detections.classes, rles, image_id))
        if evaluator is None:
            return
        if path.stem not in job.masks or (class_masks is not None and path.stem not in class_masks):
            unmatched.append(path.name)
            return
        truth = image_io.read_labels(job.masks[path.stem], "instance mask")
        semantic = image_io.read_labels(class_masks[path.stem], "class mask") if class_masks else None
        if truth.shape != (height, width):
            raise image_io.InputError(f"{path}: instance mask {job.masks[path.stem]} is {truth.shape[0]}x"
                                      f"{truth.shape[1]} but the image is {height}x{width}")
        try:
            classes = instance_classes(truth, semantic, run.num_classes)
        except ValueError as exc:
            raise image_io.InputError(f"{path}: {class_masks[path.stem]}: {exc}") from None
        evaluator.add_image(image_id, height, width, truth, classes, detections.boxes, detections.scores,
                            detections.classes, rles)
        matchings.append(instance_matching.match_image(truth, labels))

    started = time.perf_counter()
    done = core.process_images(job, handle)
    seconds = time.perf_counter() - started
    write_json(output / "detections.json", coco_results_file(sorted(images, key=lambda i: i["id"]),
                                                             categories, results))
    logger.info("%d detection(s) in %d image(s): %s", len(results), len(images), output / "detections.json")
    if evaluator is not None:
        core.warn_unmatched(unmatched, args.mask_folder)
        if evaluator.images:
            scores = evaluator.evaluate()
            scores["instance_matching"] = instance_matching.folder_summary(matchings)
            write_json(output / "metrics.json", scores)
            print(instance_matching.format_summary(scores["instance_matching"]), flush=True)
            print(f"COCO over {scores['images']} image(s), {scores['ground_truth']} objects: box AP "
                  f"{scores['box_AP']:.3f} (AP50 {scores['box_AP50']:.3f}, AP75 {scores['box_AP75']:.3f}), mask AP "
                  f"{scores['mask_AP']:.3f} (AP50 {scores['mask_AP50']:.3f}, AP75 {scores['mask_AP75']:.3f})"
                  + (f" — {scores['note']}" if "note" in scores else ""), flush=True)
            logger.info("metrics: %s", output / "metrics.json")
        else:
            logger.warning("no image was evaluated: no image had a mask in %s", args.mask_folder)
    return core.finish(job, done, seconds)
