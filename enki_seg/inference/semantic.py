"""Segments a folder of images of any size with a trained run: tiled, stitched, written, evaluated.

    python inference.py --model runs/hes --image_folder imgs --output_folder preds \\
        --image_format tif --mask_folder masks --save_overlay 1

``--model`` is a run folder of train_unet.py (or the ``model.keras`` inside it); the model, classes,
channels, normalization and default tile size come from its ``config.json``. For each input
``a.tif`` the run writes ``OUT/a.tif`` (label mask, smallest integer type: uint8 for < 256 classes,
zlib-compressed TIFF, or ``--output_format png``), with ``--save_overlay 1`` ``OUT/overlays/a.png``
(image with the classes tinted), with ``--save_probabilities 1`` ``OUT/probabilities/a.tif``
(float16 softmax, one page per class, (K, H, W)), and with ``--mask_folder`` (masks matched by file
stem) ``OUT/metrics.json``, ``OUT/metrics.csv`` (per class precision/recall/F1/IoU/Dice and
micro/macro/weighted averages over all pixels of all images) and ``OUT/metrics_per_image.csv``.

Runs of Mask R-CNN (config.json ``"model": {"name": "maskrcnn", ...}``) go to instance_inference.py:
tiled detection merged across tiles, ``OUT/a.tif`` instance labels, ``OUT/detections.json`` (COCO
results), overlays of instance outlines, and with ``--mask_folder`` of instance labels (plus
``--class_folder`` of semantic masks when there are several object classes) COCO box/mask AP in
``OUT/metrics.json``; ``--score_threshold`` and ``--overlap`` tune it.

Normalization. NIST's inference z-scored each whole image, while training z-scored each tile: a
model then sees statistics at inference it never saw in training. Here the recorded method is
applied to every model input tile exactly as the reader applies it to a record in training
(``Normalization.apply`` on the raw tile): ``zscore`` and ``minmax`` per tile and channel (with
NIST's std <= 1 rule), ``dataset`` with the fixed training statistics, ``none`` unchanged. An image
of exactly one training tile therefore gets the trainer's test-interval prediction (tested).
Neighbouring tiles overlap and each is normalized on its own window; of each tile only the part
near its centre is kept (see below), so every output pixel comes from a tile whose statistics were
taken around it, as in training.

Tiling and margin. Images are cut into tiles of ``--tile_size`` (default: the training tile or
record size) whose starts are multiples of the model's size multiple, so pooling grids line up with
those of the whole image. An output pixel is kept only from a tile in which it lies at least
``margin`` pixels from the tile edge (the middle of each overlap is the seam), except at the image
border, where the border tile is the only choice. The margin is the model's receptive-field
radius, measured once at start: a pixel of a random input is perturbed at every alignment modulo
the size multiple and the farthest logit that changes gives the radius (a depth-2 UNet: 23 px,
depth 3: 51 px; exact, so tiled and whole-image logits agree within float rounding wherever the
normalization does not depend on the window, which is tested). The radius is capped at a quarter of
the tile (stride >= tile / 2, at most ~4x the work of non-overlapping tiles): NIST's UNet (depth 4)
reaches 102 px, but a pixel more than 64 px away moves a logit by < 1e-5 of a near pixel's effect
(measured on random weights). ``--margin`` overrides the measurement. Tile starts step by
``tile - 2 * margin`` (rounded down to the size multiple); images whose sides are not multiples of
the size multiple, or that are smaller than a tile, are padded by reflection (``np.pad`` "reflect")
and cropped back.

Memory. The image being segmented is held as read (and the next one, read ahead in a thread); tiles
are cut from it (reflection by index, no padded copy), normalized into one float32 batch
(``--batch_size`` tiles) while the model runs the previous one, and only the running label image
(uint8 for < 256 classes) is kept for the whole image. Logits of all classes are never materialized
for a whole image; probabilities go, tile by tile, into a memory-mapped float16 TIFF whose written
pages are flushed and dropped from memory after each row of tiles. A 10,000 x 10,000 uint16 image
with every output on peaks at 1.3 GB RSS on a CPU (``bench/inference_bench.py``). Overlays of images
larger than 2048 px a side are subsampled by an integer step to at most 2048 px (a preview; masks
keep full resolution; ``train_common.overlay`` needs ~60 bytes per overlay pixel). Evaluation counts
pixels in row chunks.

Files are written under a hidden temporary name and renamed when complete, so a killed run never
leaves a mask that looks finished; leftovers of killed runs are removed at the next start.

Exit codes: 0 every image done; 1 some images failed (each reported in one line naming the file,
the rest processed, a summary at the end); 2 nothing done: bad arguments, a missing or incomplete
run, an empty image folder, images whose channel count does not match the model's.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import struct
import sys
import time
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enki_seg.data import image_io
from enki_seg.evaluation import metrics as seg_metrics
from enki_seg.data import records
from enki_seg.data import tiling
from enki_seg.data.normalization import Normalization

logger = logging.getLogger("inference")

#: Overlays are a preview: images larger than this (pixels a side) are subsampled to fit.
OVERLAY_MAX_SIDE = 2048
#: Evaluation counts at most this many pixels at a time (int64 pair codes: 8 bytes each).
EVAL_CHUNK_PIXELS = 1 << 22
#: Above this many bytes a TIFF is written as BigTIFF (classic TIFF offsets are 32-bit).
BIGTIFF_BYTES = 2**31 - 2**25
#: Files written under this pattern are incomplete; a later run removes them.
_TEMP_PATTERN = re.compile(r"^\..+\.tmp-\d+(\.[A-Za-z0-9]+)?$")
#: Amplitude of the probe pixel in the receptive-field measurement (model input units).
_PROBE_AMPLITUDE = 100.0


class InferenceError(RuntimeError):
    """A problem found before any image is processed; the message says what to change (exit 2)."""


# ----------------------------------------------------------------------------- the run


@dataclass
class RunInfo:
    """What config.json of a training run says about its model (no TensorFlow needed)."""

    folder: Path
    model_path: Path
    config: dict
    model_name: str
    num_classes: int
    class_names: list[str]
    channels: int
    input_dtype: str | None
    normalization: Normalization
    size_multiple: int
    tile_size: int | None

    @property
    def label_dtype(self) -> np.dtype:
        return records.smallest_label_dtype(self.num_classes - 1)


def load_run_info(path: str | os.PathLike) -> RunInfo:
    """Read ``RUN/config.json`` for ``path`` = a run folder, its ``model.keras`` or its ``config.json``."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"--model {path} does not exist; pass a run folder of train_unet.py "
                             "(with config.json and model.keras) or the model.keras inside it")
    if path.is_dir():
        folder, model_path = path, path / "model.keras"
    elif path.name == "config.json":
        folder, model_path = path.parent, path.parent / "model.keras"
    else:
        folder, model_path = path.parent, path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InferenceError(f"{config_path} is missing; --model must be a run folder written by "
                             "train_unet.py (or the model.keras inside one)")
    if not model_path.is_file():
        raise InferenceError(f"{model_path} is missing; train_unet.py exports it when a run finishes — "
                             "let the run finish (or resume it) first")
    try:
        config = json.loads(config_path.read_text())
        model, classes, inputs = config["model"], config["classes"], config["input"]
        num_classes = int(classes["number_classes"])
        names = classes.get("names") or {}
        normalization = Normalization.from_dict(config["normalization"])
        channels = int(inputs["channels"])
        tile = inputs.get("tile_size")
        if tile is None and inputs.get("record_height") is not None:
            tile = min(int(inputs["record_height"]), int(inputs["record_width"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"{config_path} is not a run config of train_unet.py ({type(exc).__name__}: "
                             f"{exc})") from None
    return RunInfo(
        folder=folder, model_path=model_path, config=config, model_name=str(model.get("name", "?")),
        num_classes=num_classes, class_names=[str(names.get(str(k), f"class_{k}")) for k in range(num_classes)],
        channels=channels, input_dtype=inputs.get("dtype"), normalization=normalization,
        size_multiple=int(model.get("size_multiple", 1)), tile_size=None if tile is None else int(tile),
    )


# ----------------------------------------------------------------------------- tiles (pure functions)


@dataclass(frozen=True)
class Tile:
    """One model input window and the part of it that goes to the output, in padded-image pixels.

    The window is ``[y, y + height) x [x, x + width)``; the kept part ``[keep_y0, keep_y1) x
    [keep_x0, keep_x1)`` lies inside it. Kept parts of a plan's tiles partition the padded image.
    """

    y: int
    x: int
    height: int
    width: int
    keep_y0: int
    keep_y1: int
    keep_x0: int
    keep_x1: int


def padded_size(height: int, width: int, size_multiple: int) -> tuple[int, int]:
    """Height and width rounded up to multiples of ``size_multiple``."""
    return (-(-height // size_multiple) * size_multiple, -(-width // size_multiple) * size_multiple)


def tile_stride(tile: int, margin: int, size_multiple: int) -> int:
    """``tile - 2 * margin`` rounded down to a multiple of ``size_multiple``; ValueError if < 1 multiple."""
    stride = (tile - 2 * margin) // size_multiple * size_multiple
    if stride < size_multiple:
        raise ValueError(f"tile {tile} leaves no stride for a margin of {margin} px at size multiple "
                         f"{size_multiple}; use a larger --tile_size or a smaller --margin")
    return stride


def _axis_plan(length: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(start, size, keep0, keep1) along one axis; seams in the middle of each overlap."""
    if length <= tile:
        return [(0, length, 0, length)]
    starts = tiling.tile_starts(length, tile, overlap=tile - stride)
    seams = [0] + [following + (start + tile - following) // 2 for start, following in zip(starts, starts[1:])]
    seams.append(length)
    return [(start, tile, seams[i], seams[i + 1]) for i, start in enumerate(starts)]


def plan_tiles(height: int, width: int, tile: int, margin: int, size_multiple: int) -> list[Tile]:
    """Tiles covering a padded ``height`` x ``width`` image (multiples of ``size_multiple``), row-major.

    Windows are ``tile`` a side (or the whole axis where it is shorter), start at multiples of
    ``size_multiple`` and step by ``tile_stride(tile, margin, size_multiple)``; each pixel is kept
    from exactly one tile, at least ``margin`` pixels from that window's edges unless the pixel is
    within ``margin`` of the image border.
    """
    for side in (height, width, tile):
        if side < 1 or side % size_multiple:
            raise ValueError(f"{side} is not a positive multiple of the size multiple {size_multiple}")
    stride = tile_stride(tile, margin, size_multiple)
    rows = _axis_plan(height, tile, stride)
    cols = _axis_plan(width, tile, stride)
    return [Tile(y, x, th, tw, ky0, ky1, kx0, kx1)
            for (y, th, ky0, ky1) in rows for (x, tw, kx0, kx1) in cols]


def reflect_index(index: np.ndarray, length: int) -> np.ndarray:
    """Map indices outside [0, length) into it as ``np.pad(mode="reflect")`` does (edge not repeated)."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    folded = np.mod(index, period)
    return np.where(folded < length, folded, period - folded)


def read_window(image: np.ndarray, y: int, x: int, height: int, width: int) -> np.ndarray:
    """The (height, width, C) window at (y, x) of ``image`` reflection-padded beyond its border.

    A view when the window lies inside the image, a small copy otherwise (no padded image is made).
    """
    rows, cols = image.shape[:2]
    if y >= 0 and x >= 0 and y + height <= rows and x + width <= cols:
        return image[y : y + height, x : x + width]
    ys = reflect_index(np.arange(y, y + height), rows)
    xs = reflect_index(np.arange(x, x + width), cols)
    return image[np.ix_(ys, xs)]


def normalized_batches(image: np.ndarray, tiles: list[Tile], normalize, batch_size: int):
    """Yield (tiles, (B, h, w, C) float32 batch) of ``image``, preparing the next batch while the caller runs one.

    ``normalize(raw_tile, out=float32 array)`` fills ``out`` (``Normalization.apply``): each tile is
    normalized on its own window, as the reader normalizes a record in training. All tiles of a
    group must have one size (those of :func:`plan_tiles` do).
    """
    groups = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]

    def prepare(group):
        batch = np.empty((len(group), group[0].height, group[0].width, image.shape[2]), np.float32)
        for j, tile in enumerate(group):
            # the reader's exact operation on a record: copy the raw tile to float32, normalize
            normalize(read_window(image, tile.y, tile.x, tile.height, tile.width), out=batch[j])
        return batch

    with ThreadPoolExecutor(1, thread_name_prefix="tiles") as pool:
        pending = pool.submit(prepare, groups[0])
        for i, group in enumerate(groups):
            batch = pending.result()
            if i + 1 < len(groups):
                pending = pool.submit(prepare, groups[i + 1])
            yield group, batch


# ----------------------------------------------------------------------------- the model


class Segmenter:
    """A run's model ready to segment whole images: normalization, tiling, batching, stitching.

    Args:
        run: from :func:`load_run_info`.
        tile_size: model input tile (pixels a side); default the run's training tile/record size.
        batch_size: tiles per model call.
        margin: pixels kept away from tile edges; None measures the receptive field (capped at a
            quarter of the tile).

    Attributes: ``tile_size``, ``margin``, ``stride`` (pixels between tile starts), ``size_multiple``,
    ``receptive_radius`` (measured radius in pixels, cap + 1 when it exceeds the cap, None when
    ``margin`` was given), ``label_dtype``.
    """

    def __init__(self, run: RunInfo, tile_size: int | None = None, batch_size: int = 4,
                 margin: int | None = None):
        self.run = run
        tile = run.tile_size if tile_size is None else tile_size
        if tile is None:
            raise InferenceError(f"{run.folder / 'config.json'} records no tile size (records of several "
                                 "sizes); pass --tile_size")
        if batch_size < 1:
            raise InferenceError(f"--batch_size must be >= 1, got {batch_size}")
        self.model = _load_model(run)
        self.size_multiple = int(getattr(self.model, "size_multiple", run.size_multiple))
        if tile < self.size_multiple or tile % self.size_multiple:
            nearest = max(1, round(tile / self.size_multiple)) * self.size_multiple
            raise InferenceError(f"--tile_size {tile} is not a multiple of the model's size multiple "
                                 f"{self.size_multiple}; use {nearest}")
        self.tile_size = tile
        self.batch_size = batch_size
        self.num_classes = run.num_classes
        self.channels = run.channels
        self.normalization = run.normalization
        self.label_dtype = run.label_dtype
        self._functions: dict[str, object] = {}
        self.receptive_radius = None
        cap = min(tile // 4, (tile - self.size_multiple) // 2)
        if margin is None:
            self.receptive_radius = self.measure_receptive_radius(limit=cap)
            margin = min(self.receptive_radius, cap)
            if self.receptive_radius > cap:
                logger.info("receptive field radius > %d px, the cap of a quarter tile: margin %d px", cap, margin)
            else:
                logger.info("receptive field radius %d px (measured): margin %d px", self.receptive_radius, margin)
        elif margin < 0:
            raise InferenceError(f"--margin must be >= 0, got {margin}")
        try:
            self.stride = tile_stride(tile, margin, self.size_multiple)
        except ValueError as exc:
            raise InferenceError(str(exc)) from None
        self.margin = margin

    # -- model functions

    def _function(self, kind: str):
        """A traced model call on (B, h, w, C) float32 tiles, any h and w, returning ``kind``'s outputs."""
        if kind not in self._functions:
            import tensorflow as tf

            model = self.model
            spec = [tf.TensorSpec([None, None, None, self.channels], tf.float32)]

            if kind == "logits":
                def call(images):
                    return (model(images, training=False),)
            elif kind == "labels":
                def call(images):
                    # tf.argmax as in the trainer's test step: identical tie-breaking
                    return (tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32),)
            else:  # labels + probabilities
                def call(images):
                    logits = model(images, training=False)
                    return (tf.argmax(logits, axis=-1, output_type=tf.int32),
                            tf.cast(tf.nn.softmax(logits, axis=-1), tf.float16))
            self._functions[kind] = tf.function(call, input_signature=spec)
        return self._functions[kind]

    def predict_tiles(self, tiles: np.ndarray, kind: str = "logits") -> tuple[np.ndarray, ...]:
        """The model on normalized (B, h, w, C) float32 tiles; ``kind`` "logits" -> ((B, h, w, K) float32,)."""
        return tuple(out.numpy() for out in self._function(kind)(tiles))

    def measure_receptive_radius(self, limit: int) -> int:
        """Farthest distance (pixels, Chebyshev) at which one input pixel changes a logit; > ``limit`` stops.

        One pixel of a random input is raised by a large amount at each alignment modulo the size
        multiple (along the diagonal: the two axes are independent); each input is a separate
        batch-of-one call because oneDNN's results differ in the last bits between batch positions.
        Returns ``limit + 1`` when the radius exceeds ``limit``.
        """
        m = self.size_multiple
        side = -(-(2 * limit + 2 * m + 2) // m) * m
        centre = side // 2 // m * m
        rng = np.random.default_rng(0)
        base = rng.normal(size=(1, side, side, self.channels)).astype(np.float32)
        (reference,) = self.predict_tiles(base)
        radius = 0
        for offset in range(m):
            probe = base.copy()
            py = px = centre + offset
            probe[0, py, px, :] += _PROBE_AMPLITUDE
            (logits,) = self.predict_tiles(probe)
            ys, xs = np.nonzero((logits[0] != reference[0]).any(axis=-1))
            if ys.size:
                radius = max(radius, int(np.abs(ys - py).max()), int(np.abs(xs - px).max()))
            if radius > limit:
                return limit + 1
        return radius

    # -- whole images

    def plan(self, height: int, width: int) -> list[Tile]:
        """Tiles for an image of ``height`` x ``width`` (unpadded) pixels."""
        padded_h, padded_w = padded_size(height, width, self.size_multiple)
        return plan_tiles(padded_h, padded_w, self.tile_size, self.margin, self.size_multiple)

    def _normalized_batches(self, image: np.ndarray, tiles: list[Tile]):
        """:func:`normalized_batches` with this run's normalization and batch size."""
        return normalized_batches(image, tiles, self.normalization.apply, self.batch_size)

    def _run(self, image: np.ndarray, kind: str, progress=None):
        """Yield (tile, kept outputs cropped to the image) for every tile of ``image``."""
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image of shape {image.shape} does not have the model's {self.channels} channel(s)")
        height, width = image.shape[:2]
        tiles = self.plan(height, width)
        for group, batch in self._normalized_batches(image, tiles):
            outputs = self.predict_tiles(batch, kind)
            for j, tile in enumerate(group):
                y1, x1 = min(tile.keep_y1, height), min(tile.keep_x1, width)
                if y1 <= tile.keep_y0 or x1 <= tile.keep_x0:
                    continue  # a tile that only keeps padding
                window = (j, slice(tile.keep_y0 - tile.y, y1 - tile.y), slice(tile.keep_x0 - tile.x, x1 - tile.x))
                yield tile, (slice(tile.keep_y0, y1), slice(tile.keep_x0, x1)), [out[window] for out in outputs]
            if progress is not None:
                progress.update(len(group))

    def segment(self, image: np.ndarray, probabilities: np.ndarray | None = None, progress=None) -> np.ndarray:
        """Label image of an (H, W, C) image -> (H, W) ``label_dtype`` (uint8 for < 256 classes).

        ``probabilities``, when given, is a (K, H, W) float16 array (e.g. a memory-mapped TIFF) that
        receives the softmax of every kept pixel; a ``np.memmap`` is flushed and its pages dropped
        from memory after each row of tiles. ``progress`` gets ``update(n)`` per batch of n tiles.
        """
        labels = np.zeros(image.shape[:2], self.label_dtype)
        kind = "labels" if probabilities is None else "labels+probabilities"
        row = None
        for tile, where, outputs in self._run(image, kind, progress):
            labels[where] = outputs[0]
            if probabilities is not None:
                if row is not None and tile.y != row:
                    _release_pages(probabilities)
                row = tile.y
                probabilities[(slice(None), *where)] = np.moveaxis(outputs[1], -1, 0)
        if probabilities is not None:
            _release_pages(probabilities)
        return labels

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Stitched (H, W, K) float32 logits of an (H, W, C) image (H*W*K*4 bytes: for tests and small images)."""
        out = np.zeros((*image.shape[:2], self.num_classes), np.float32)
        for _, where, (logits,) in self._run(image, "logits"):
            out[where] = logits
        return out


def _load_model(run: RunInfo, check_outputs: bool = True):
    """The run's model.keras; ``import models`` first registers the model classes with Keras.

    ``check_outputs`` compares a segmenter's output channels with the run's class count.
    """
    import models  # noqa: F401  (registers UNet / FCDenseNet for deserialization)
    import keras

    try:
        model = keras.models.load_model(run.model_path, compile=False)
    except Exception as exc:  # Keras raises many types for corrupt or foreign files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InferenceError(f"cannot load {run.model_path}: {detail}") from None
    outputs = model.output_shape[-1] if check_outputs else run.num_classes
    if outputs != run.num_classes:
        raise InferenceError(f"{run.model_path} has {outputs} outputs but config.json says "
                             f"{run.num_classes} classes; the run folder is inconsistent")
    return model


def _release_pages(array: np.ndarray) -> None:
    """Flush a memmap and drop its (now clean) pages from this process's resident memory."""
    if not isinstance(array, np.memmap):
        return
    array.flush()
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        import mmap

        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # advice only; the data is already on disk
            pass


# ----------------------------------------------------------------------------- inputs


def probe_channels(path: Path) -> int | None:
    """Channels of an image from its header alone (TIFF, PNG, JPEG); None when not cheaply known."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = list(series.shape), series.axes
            if len(shape) > 3:  # as image_io: length-1 axes other than Y, X are dropped
                keep = [i for i, n in enumerate(shape) if n != 1 or axes[i] in "YX"]
                shape, axes = [shape[i] for i in keep], "".join(axes[i] for i in keep)
            if len(shape) == 2:
                return 1
            if len(shape) == 3:
                return shape[0] if axes.endswith("YX") else shape[2]
            return None
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        if suffix == ".png" and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return {0: 1, 2: 3, 4: 2, 6: 4}.get(head[25])  # palette (3) decodes to RGB(A): read it
        if suffix in (".jpg", ".jpeg"):
            return _jpeg_components(head)
    except Exception:  # an unreadable file is reported when it is read
        return None
    return None


def _jpeg_components(data: bytes) -> int | None:
    """Number of colour components from a JPEG's start-of-frame marker."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[position + 9] if position + 9 < len(data) else None
        position += 2 + length
    return None


def list_inputs(image_folder: Path, image_format: str, output_folder: Path) -> list[Path]:
    """Images to segment: ``image_io.list_images`` minus anything inside the output folder."""
    files = image_io.list_images(image_folder, image_format)
    output = output_folder.resolve()
    kept = [p for p in files if output not in p.resolve().parents]
    if not kept:
        raise InferenceError(f"every .{image_format} file in {image_folder} lies in the output folder "
                             f"{output_folder}; choose another --output_folder")
    stems: dict[str, Path] = {}
    for p in kept:  # outputs are named by stem: a.tif and a.tiff would write the same mask
        if p.stem in stems:
            raise InferenceError(f"{image_folder} has two images named {p.stem!r} ({stems[p.stem].name} and "
                                 f"{p.name}); their outputs would collide — rename one")
        stems[p.stem] = p
    return kept


def check_channels(files: list[Path], channels: int, model: str) -> None:
    """InferenceError naming the files and both channel counts when an image does not fit the model."""
    bad = [(p, n) for p in files if (n := probe_channels(p)) is not None and n != channels]
    if bad:
        shown = ", ".join(f"{p.name} ({n})" for p, n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InferenceError(
            f"{len(bad)} image(s) do not have the model's channel count: {shown} channel(s), but {model} "
            f"takes {channels}; pass images with {channels} channel(s) (or the model trained on them)")


def _read_ahead(paths: list[Path]):
    """Yield (path, image or InputError), reading the next file in a thread while the caller works."""
    def read(path):
        try:
            return image_io.read_image(path)
        except image_io.InputError as exc:
            return exc

    if not paths:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
        pending = pool.submit(read, paths[0])
        for i, path in enumerate(paths):
            result = pending.result()
            pending = None
            if i + 1 < len(paths):
                pending = pool.submit(read, paths[i + 1])
            yield path, result
            del result


# ----------------------------------------------------------------------------- outputs


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def remove_leftovers(folder: Path) -> int:
    """Delete the temporary files of killed runs (``.NAME.tmp-PID.EXT``) in ``folder``; returns the count."""
    removed = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and _TEMP_PATTERN.match(p.name):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


class _Atomic:
    """``with _Atomic(path) as tmp:`` write ``tmp``; renamed to ``path`` on success, removed on failure."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = _temp_path(path)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_labels(path: Path, labels: np.ndarray) -> Path:
    """(H, W) labels as a zlib TIFF (BigTIFF when large) or PNG (by suffix), written atomically."""
    with _Atomic(path) as tmp:
        if path.suffix.lower() == ".png":
            import imagecodecs

            imagecodecs.imwrite(str(tmp), labels)
        else:
            import tifffile

            tifffile.imwrite(tmp, labels, photometric="minisblack", compression="zlib",
                             bigtiff=labels.nbytes > BIGTIFF_BYTES)
    return path


def open_probabilities(path: Path, num_classes: int, height: int, width: int) -> np.memmap:
    """A (K, H, W) float16 memory-mapped TIFF (one page per class) at the temporary name of ``path``."""
    import tifffile

    nbytes = num_classes * height * width * 2
    return tifffile.memmap(_temp_path(path), shape=(num_classes, height, width), dtype=np.float16,
                           photometric="minisblack", bigtiff=nbytes > BIGTIFF_BYTES, metadata={"axes": "CYX"})


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, num_classes: int) -> Path:
    """PNG of channel 0 with the classes tinted (``train_common.overlay``), at most OVERLAY_MAX_SIDE a side."""
    import imagecodecs

    from enki_seg.training.common import overlay

    step = max(1, -(-max(labels.shape) // OVERLAY_MAX_SIDE))
    rgb = overlay(image[::step, ::step, 0], labels[::step, ::step], num_classes)
    with _Atomic(path) as tmp:
        imagecodecs.imwrite(str(tmp), rgb)
    return path


# ----------------------------------------------------------------------------- evaluation


PER_IMAGE_COLUMNS = ("image", "pixels", "accuracy", "mean_iou", "foreground_iou")


class Evaluation:
    """Confusion counts over every evaluated image, plus one row of scores per image.

    ``add`` takes (H, W) integer truth and prediction of equal shape; ``write`` writes
    ``metrics.json``, ``metrics.csv`` and ``metrics_per_image.csv`` and returns the totals.
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None):
        self.total = seg_metrics.ConfusionAccumulator(num_classes, class_names=class_names)
        self.num_classes = num_classes
        self.class_names = class_names
        self.rows: list[dict] = []

    def add(self, name: str, truth: np.ndarray, prediction: np.ndarray) -> seg_metrics.SegmentationMetrics:
        if truth.shape != prediction.shape:
            raise ValueError(f"mask is {truth.shape[0]}x{truth.shape[1]} but the image is "
                             f"{prediction.shape[0]}x{prediction.shape[1]}")
        image = seg_metrics.ConfusionAccumulator(self.num_classes, class_names=self.class_names)
        rows_per_chunk = max(1, EVAL_CHUNK_PIXELS // max(1, truth.shape[1]))
        for start in range(0, truth.shape[0], rows_per_chunk):
            image.update(truth[start : start + rows_per_chunk], prediction[start : start + rows_per_chunk])
        self.total.update_matrix(image.matrix)
        scores = image.result()
        row = {"image": name, "pixels": int(truth.size), "accuracy": scores.accuracy,
               "mean_iou": scores.mean_iou, "foreground_iou": scores.foreground_iou}
        row.update({f"iou_{n}": float(v) for n, v in zip(scores.class_names, scores.iou)})
        self.rows.append(row)
        return scores

    def write(self, folder: Path) -> seg_metrics.SegmentationMetrics:
        scores = self.total.result()
        for name, writer in (("metrics.json", seg_metrics.write_json), ("metrics.csv", seg_metrics.write_csv)):
            with _Atomic(folder / name) as tmp:
                writer(scores, tmp)
        with _Atomic(folder / "metrics_per_image.csv") as tmp:
            with open(tmp, "w", newline="") as handle:
                columns = list(dict.fromkeys(k for row in self.rows for k in row)) or list(PER_IMAGE_COLUMNS)
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        return scores


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference", description="Segment a folder of images with a trained run.")
    p.add_argument("--model", required=True, help="run folder of train_unet.py, or the model.keras inside it")
    p.add_argument("--image_folder", required=True, help="images to segment (not recursive)")
    p.add_argument("--output_folder", required=True, help="masks, overlays/, probabilities/, metrics go here")
    p.add_argument("--image_format", default="tif", help="tif (also .tiff), png or jpg (default tif)")
    p.add_argument("--mask_folder", help="ground-truth masks matched by file stem: writes metrics.json/.csv")
    p.add_argument("--tile_size", type=int, help="model input tile (default: the training tile/record size)")
    p.add_argument("--batch_size", type=int, default=4, help="tiles per model call (default 4)")
    p.add_argument("--margin", type=int,
                   help="pixels kept from tile edges (default: the measured receptive field, at most tile/4)")
    p.add_argument("--save_overlay", type=int, choices=(0, 1), default=0, help="OUT/overlays/NAME.png")
    p.add_argument("--save_probabilities", type=int, choices=(0, 1), default=0,
                   help="OUT/probabilities/NAME.tif: float16 softmax, one page per class")
    p.add_argument("--output_format", choices=("tif", "png"), default="tif", help="label mask format (tif)")
    instances = p.add_argument_group("maskrcnn runs (instance_inference.py)")
    instances.add_argument("--score_threshold", type=float, help="ignore detections scoring below it (default 0.5)")
    instances.add_argument("--overlap", type=int,
                           help="pixels shared by neighbouring tiles, at least the largest object (default tile/4)")
    instances.add_argument("--class_folder",
                           help="semantic masks matched by stem giving each --mask_folder instance its class "
                                "(needed with more than one object class)")
    return p.parse_args(argv)


@dataclass
class Job:
    """Everything checked before the model is loaded."""

    run: RunInfo
    files: list[Path]
    output: Path
    masks: dict[str, Path] | None
    failures: list[str] = field(default_factory=list)
    class_masks: dict[str, Path] | None = None


def prepare(args: argparse.Namespace) -> Job:
    """Every check that needs no model: run folder, folders, file list, channels, label format."""
    run = load_run_info(args.model)
    instances = run.model_name == "maskrcnn"
    if instances:
        from enki_seg.inference import instance as instance_inference

        instance_inference.check_arguments(run, args)
    elif args.score_threshold is not None or args.overlap is not None or args.class_folder:
        raise InferenceError(f"--score_threshold, --overlap and --class_folder are for maskrcnn runs; "
                             f"{run.folder} is a {run.model_name} run — drop them")
    image_folder, output = Path(args.image_folder), Path(args.output_folder)
    if image_folder.is_dir() and output.resolve() == image_folder.resolve():
        raise InferenceError(f"--output_folder {output} is the image folder; masks would overwrite the inputs — "
                             "choose another folder")
    try:
        files = list_inputs(image_folder, args.image_format, output)
        masks = image_io.index_by_stem(args.mask_folder, "mask") if args.mask_folder else None
        class_masks = image_io.index_by_stem(args.class_folder, "class mask") if args.class_folder else None
    except image_io.InputError as exc:
        raise InferenceError(str(exc)) from None
    check_channels(files, run.channels, f"the model in {run.folder}")
    if args.output_format == "png" and not instances and run.label_dtype.itemsize > 2:
        raise InferenceError(f"{run.num_classes} classes do not fit a PNG mask (16 bits at most); "
                             "use --output_format tif")
    try:
        output.mkdir(parents=True, exist_ok=True)
        for sub, wanted in (("overlays", args.save_overlay), ("probabilities", args.save_probabilities)):
            if wanted:
                (output / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"cannot create --output_folder {output}: {exc.strerror}") from None
    if not os.access(output, os.W_OK):
        raise InferenceError(f"--output_folder {output} is not writable")
    for folder in (output, output / "overlays", output / "probabilities"):
        if (count := remove_leftovers(folder)):
            logger.info("removed %d incomplete file(s) of an interrupted run from %s", count, folder)
    return Job(run=run, files=files, output=output, masks=masks, class_masks=class_masks)


def _progress(total: int, unit: str, **kwargs):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def process_images(job: Job, args: argparse.Namespace, handle) -> int:
    """Call ``handle(path, image)`` on every file of ``job`` (read ahead, channels checked); returns the count done.

    A file that cannot be read or handled (InputError, OSError, MemoryError) is reported in one
    line naming it, added to ``job.failures`` and skipped.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    run = job.run
    warned_dtypes: set[str] = set()
    done = 0
    with logging_redirect_tqdm(), _progress(len(job.files), "image") as bar:
        for path, image in _read_ahead(job.files):
            bar.set_postfix_str(path.name)
            try:
                if isinstance(image, Exception):
                    raise image
                if image.shape[2] != run.channels:
                    raise image_io.InputError(f"{path} has {image.shape[2]} channel(s) but the model takes "
                                              f"{run.channels}")
                if run.input_dtype and image.dtype.name != run.input_dtype and image.dtype.name not in warned_dtypes:
                    warned_dtypes.add(image.dtype.name)
                    logger.warning("%s is %s but the model was trained on %s images; results depend on the "
                                   "normalization (%s) making them comparable", path.name, image.dtype.name,
                                   run.input_dtype, run.normalization.method)
                handle(path, image)
                done += 1
            except (image_io.InputError, OSError, MemoryError) as exc:
                detail = str(exc) or type(exc).__name__
                if not detail.startswith(str(path)):
                    detail = f"{path}: {detail}"
                logger.error("skipped: %s", detail)
                job.failures.append(detail)
            finally:
                image = None
                bar.update(1)
    return done


def finish(job: Job, done: int, seconds: float) -> int:
    """Log the throughput and the failures of a folder; returns the exit code (0, or 1 on failures)."""
    logger.info("%d images in %.1f s (%.2f images/s)", done, seconds, done / max(seconds, 1e-9))
    if job.failures:
        logger.error("%d of %d image(s) failed:\n  %s", len(job.failures), len(job.files), "\n  ".join(job.failures))
        return 1
    return 0


def warn_unmatched(unmatched: list[str], mask_folder) -> None:
    """Warn about the images that were not evaluated because ``mask_folder`` has no mask for them."""
    if unmatched:
        logger.warning("%d image(s) have no mask in %s and were not evaluated: %s", len(unmatched),
                       mask_folder, ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""))


def segment_folder(job: Job, segmenter: Segmenter, args: argparse.Namespace) -> int:
    """Segment, write and evaluate every file of ``job``; returns the exit code (0, or 1 on failures)."""
    output = job.output
    evaluation = Evaluation(job.run.num_classes, job.run.class_names) if job.masks is not None else None
    unmatched: list[str] = []
    started = time.perf_counter()
    done = process_images(job, args, lambda path, image: _segment_one(path, image, segmenter, args, output,
                                                                       evaluation, job.masks, unmatched))
    seconds = time.perf_counter() - started
    if evaluation is not None:
        warn_unmatched(unmatched, args.mask_folder)
        if evaluation.rows:
            scores = evaluation.write(output)
            print(seg_metrics.format_table(scores), flush=True)
            logger.info("metrics of %d image(s): %s, %s, %s", len(evaluation.rows), output / "metrics.json",
                        output / "metrics.csv", output / "metrics_per_image.csv")
        else:
            logger.warning("no image was evaluated: no prediction had a mask in %s", args.mask_folder)
    return finish(job, done, seconds)


def _segment_one(path: Path, image: np.ndarray, segmenter: Segmenter, args, output: Path,
                 evaluation: Evaluation | None, masks: dict[str, Path] | None, unmatched: list[str]) -> None:
    height, width = image.shape[:2]
    probabilities = None
    probability_path = output / "probabilities" / f"{path.stem}.tif"
    tiles = len(segmenter.plan(height, width))
    try:
        if args.save_probabilities:
            probabilities = open_probabilities(probability_path, segmenter.num_classes, height, width)
        with _progress(tiles, "tile", leave=False, desc=path.name) if tiles > 16 else nullcontext() as bar:
            labels = segmenter.segment(image, probabilities=probabilities, progress=bar)
        if probabilities is not None:
            probabilities.flush()
            del probabilities
            probabilities = None
            os.replace(_temp_path(probability_path), probability_path)
    finally:
        if probabilities is not None:
            del probabilities
            _temp_path(probability_path).unlink(missing_ok=True)
    write_labels(output / f"{path.stem}.{args.output_format}", labels)
    if args.save_overlay:
        write_overlay(output / "overlays" / f"{path.stem}.png", image, labels, segmenter.num_classes)
    if evaluation is not None:
        mask_path = masks.get(path.stem)
        if mask_path is None:
            unmatched.append(path.name)
            return
        truth = image_io.read_labels(mask_path, "mask")
        try:
            evaluation.add(path.name, truth, labels)
        except ValueError as exc:
            raise image_io.InputError(f"{path}: mask {mask_path}: {exc}") from None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        job = prepare(args)
        logger.info("%d image(s) from %s; model %s (%s, %d classes, %d channel(s), %s normalization)",
                    len(job.files), args.image_folder, job.run.model_path, job.run.model_name,
                    job.run.num_classes, job.run.channels, job.run.normalization.method)
        if job.run.model_name == "maskrcnn":
            from enki_seg.inference import instance as instance_inference

            detector = instance_inference.load_detector(job.run, args)
            logger.info("tiles of %d px, overlap %d px, %d tiles per batch, score threshold %.2f", detector.tile_size,
                        detector.overlap, detector.batch_size, detector.score_threshold)
            return instance_inference.detect_folder(job, detector, args)
        segmenter = Segmenter(job.run, tile_size=args.tile_size, batch_size=args.batch_size, margin=args.margin)
        logger.info("tiles of %d px, stride %d px, margin %d px, %d tiles per batch", segmenter.tile_size,
                    segmenter.stride, segmenter.margin, segmenter.batch_size)
    except InferenceError as exc:
        logger.error("%s", exc)
        return 2
    return segment_folder(job, segmenter, args)


if __name__ == "__main__":
    sys.exit(main())
