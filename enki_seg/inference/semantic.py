"""Semantic segmentation of whole images of any size with a UNet/FC-DenseNet run: tiled, stitched, written, scored.

``inference.py`` hands runs whose config.json names any model but ``maskrcnn`` here
(:func:`segment_folder`); :class:`Segmenter` is the model ready for whole images.

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
those of the whole image (``enki_seg.data.tiling.plan_tiles``). An output pixel is kept only from a
tile in which it lies at least ``margin`` pixels from the tile edge (the middle of each overlap is
the seam), except at the image border, where the border tile is the only choice. The margin is the
model's receptive-field radius, measured once at start: a pixel of a random input is perturbed at
every alignment modulo the size multiple and the farthest logit that changes by more than rounding
gives the radius (a depth-2 UNet: 23 px, depth 3: 51 px; tiled and whole-image logits then agree
within float rounding wherever the normalization does not depend on the window, which is tested).
"Changes" means by more than 1e-5 of the output scale (and 10x the difference between two calls on
the same input): GPU kernels that are not deterministic, or that mix neighbouring pixels in their
rounding (Winograd/FFT convolutions), move every logit in the last bits, and an exact comparison
would then always report the cap. The effect of a pixel at the true edge is far above that (depth
2: ~1e-4 of the output scale at 20 px from a probe of amplitude 100). The radius is
capped at a quarter of the tile (stride >= tile / 2, at most ~4x the work of non-overlapping tiles):
NIST's UNet (depth 4) reaches 102 px, but a pixel more than 64 px away moves a logit by < 1e-5 of a
near pixel's effect (measured on random weights). ``--margin`` overrides the measurement. Tile
starts step by ``tile - 2 * margin`` (rounded down to the size multiple); images whose sides are
not multiples of the size multiple, or that are smaller than a tile, are padded by reflection
(``np.pad`` "reflect") and cropped back.

Test-time augmentation. ``--tta flips`` (or ``dihedral``) runs the model on each tile mirrored (and
turned) 4 (8) times and averages the softmax mapped back, as nnU-Net does: 4 (8) times the model work
for smoother probabilities (a boundary run's watershed gains most: ``bench/instance_accuracy.py``).
Labels are then the argmax of the averaged softmax; the margin is measured on the plain model.

Memory. The image being segmented is held as read (and the next one, read ahead in a thread); tiles
are cut from it (reflection by index, no padded copy), normalized into one float32 batch
(``--batch_size`` tiles) while the model runs the previous one, and only the running label image
(uint8 for < 256 classes) is kept for the whole image. Logits of all classes are never materialized
for a whole image; probabilities go, tile by tile, into a memory-mapped float16 TIFF whose written
pages are flushed and dropped from memory after each row of tiles. Images read by region (whole
slides) never hold their label image: the outputs of each row of tiles go as one band into
tiled, compressed, pyramidal OME-TIFFs (``enki_seg.inference.pyramid``), and the overlay preview and
the metrics are taken band by band. A 10,000 x 10,000 uint16 image
with every output on peaks at 1.3 GB RSS on a CPU (``bench/inference_bench.py``). Overlays of images
larger than 2048 px a side are subsampled by an integer step (a preview; masks keep full
resolution). Evaluation counts pixels in row chunks.
"""
from __future__ import annotations

import argparse
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from enki_seg.data import image_io, tiling
from enki_seg.evaluation import metrics as seg_metrics
from enki_seg.evaluation.semantic_evaluation import Evaluation
from enki_seg import files
from enki_seg.files import atomic_path
from enki_seg.inference import core, pyramid

logger = logging.getLogger("inference")

#: Test-time augmentation (``--tta``): the (quarter turns, mirrored) transforms of a tile whose softmax
#: outputs are averaged, each mapped back. "flips": the four mirrorings; "dihedral": all eight
#: symmetries of the square (nnU-Net mirrors by default); "none": the model once.
TTA_TRANSFORMS = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, left-right, 180 degrees, up-down
    "dihedral": tuple((k, m) for k in range(4) for m in (False, True)),
}


def _averaged_softmax(model, images, transforms):
    """Mean over ``transforms`` of the model's softmax on each transformed (B, h, w, C) tile batch, mapped back.

    A quarter turn swaps h and w (the fully convolutional models take either; tiles are square, and an
    image within one tile is padded to the size multiple on both sides)."""
    import tensorflow as tf

    def rotate(x, turns):  # np.rot90(x, turns, axes=(1, 2)), without tf.image.rot90's runtime asserts
        turns %= 4
        if turns == 1:
            return tf.reverse(tf.transpose(x, (0, 2, 1, 3)), axis=[1])
        if turns == 2:
            return tf.reverse(x, axis=[1, 2])
        if turns == 3:
            return tf.transpose(tf.reverse(x, axis=[1]), (0, 2, 1, 3))
        return x

    total = None
    for turns, mirrored in transforms:
        x = rotate(images, turns)
        if mirrored:
            x = tf.reverse(x, axis=[2])
        p = tf.nn.softmax(tf.cast(model(x, training=False), tf.float32), axis=-1)
        if mirrored:
            p = tf.reverse(p, axis=[2])
        total = rotate(p, -turns) if total is None else total + rotate(p, -turns)
    return total / len(transforms)


#: Amplitude of the probe pixel in the receptive-field measurement (model input units).
_PROBE_AMPLITUDE = 100.0
#: A logit "changes" under the probe when it moves by more than this fraction of the output scale
#: (max |logit| of the unprobed input): float32 rounding noise of non-deterministic or non-local GPU
#: kernels is ~1e-7..1e-6 of it, a pixel at the edge of a depth-2 UNet's reach moves a logit by ~1e-4.
_PROBE_RTOL = 1e-5
#: ... or by more than this many times the largest difference between two calls on the same input.
_PROBE_NOISE_FACTOR = 10.0


# ----------------------------------------------------------------------------- the model


class Segmenter:
    """A run's model ready to segment whole images: normalization, tiling, batching, stitching.

    Args:
        run: from ``core.load_run_info``.
        tile_size: model input tile (pixels a side); default the run's training tile/record size.
        batch_size: tiles per model call.
        margin: pixels kept away from tile edges; None measures the receptive field (capped at a
            quarter of the tile).

    Attributes: ``tile_size``, ``margin``, ``stride`` (pixels between tile starts), ``size_multiple``,
    ``receptive_radius`` (measured radius in pixels, cap + 1 when it exceeds the cap, None when
    ``margin`` was given), ``label_dtype``.
    """

    def __init__(self, run: core.RunInfo, tile_size: int | None = None, batch_size: int = 4,
                 margin: int | None = None, tta: str = "none"):
        if tta not in TTA_TRANSFORMS:
            raise core.InferenceError(f"--tta must be one of {', '.join(TTA_TRANSFORMS)}, got {tta!r}")
        self.run = run
        self.tta = tta
        tile = run.tile_size if tile_size is None else tile_size
        if tile is None:
            raise core.InferenceError(f"{run.folder / 'config.json'} records no tile size (records of several "
                                 "sizes); pass --tile_size")
        if batch_size < 1:
            raise core.InferenceError(f"--batch_size must be >= 1, got {batch_size}")
        self.model = core.load_model(run)
        self.size_multiple = int(getattr(self.model, "size_multiple", run.size_multiple))
        if tile < self.size_multiple or tile % self.size_multiple:
            nearest = max(1, round(tile / self.size_multiple)) * self.size_multiple
            raise core.InferenceError(f"--tile_size {tile} is not a multiple of the model's size multiple "
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
            raise core.InferenceError(f"--margin must be >= 0, got {margin}")
        try:
            self.stride = tiling.tile_stride(tile, margin, self.size_multiple)
        except ValueError as exc:
            raise core.InferenceError(str(exc)) from None
        self.margin = margin

    # -- model functions

    def _function(self, kind: str):
        """A traced model call on (B, h, w, C) float32 tiles, any h and w, returning ``kind``'s outputs."""
        if kind not in self._functions:
            import tensorflow as tf

            spec = [tf.TensorSpec([None, None, None, self.channels], tf.float32)]
            transforms = TTA_TRANSFORMS["none" if kind == "probe" else self.tta]
            if len(transforms) == 1:
                def scores(images):  # logits
                    return self.model(images, training=False)
            else:
                def scores(images):  # log of the softmax averaged over the transformed tiles
                    return tf.math.log(_averaged_softmax(self.model, images, transforms))

            if kind in ("logits", "probe"):
                def call(images):
                    return (scores(images),)
            elif kind == "labels":
                def call(images):
                    # tf.argmax as in the trainer's test step: identical tie-breaking
                    return (tf.argmax(scores(images), axis=-1, output_type=tf.int32),)
            else:  # labels + probabilities (float16; "labels+probabilities32": float32)
                dtype = tf.float32 if kind.endswith("32") else tf.float16

                def call(images):
                    logits = scores(images)
                    return (tf.argmax(logits, axis=-1, output_type=tf.int32),
                            tf.cast(tf.nn.softmax(logits, axis=-1), dtype))
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
        A logit changes when it moves by more than the rounding tolerance of :func:`probe_tolerance`
        (kernels that are not bit-for-bit deterministic would otherwise change every logit).
        Returns ``limit + 1`` when the radius exceeds ``limit``.
        """
        m = self.size_multiple
        side = -(-(2 * limit + 2 * m + 2) // m) * m
        centre = side // 2 // m * m
        rng = np.random.default_rng(0)
        base = rng.normal(size=(1, side, side, self.channels)).astype(np.float32)
        (reference,) = self.predict_tiles(base, "probe")
        (repeat,) = self.predict_tiles(base, "probe")
        tolerance = probe_tolerance(reference, repeat)
        radius = 0
        for offset in range(m):
            probe = base.copy()
            py = px = centre + offset
            probe[0, py, px, :] += _PROBE_AMPLITUDE
            (logits,) = self.predict_tiles(probe, "probe")
            ys, xs = np.nonzero((np.abs(logits[0] - reference[0]) > tolerance).any(axis=-1))
            if ys.size:
                radius = max(radius, int(np.abs(ys - py).max()), int(np.abs(xs - px).max()))
            if radius > limit:
                return limit + 1
        return radius

    # -- whole images

    def plan(self, height: int, width: int) -> list[tiling.Tile]:
        """Tiles for an image of ``height`` x ``width`` (unpadded) pixels."""
        padded_h, padded_w = tiling.padded_size(height, width, self.size_multiple)
        return tiling.plan_tiles(padded_h, padded_w, self.tile_size, self.margin, self.size_multiple)

    def for_image(self, path: Path) -> "Segmenter":
        """The segmenter of the image at ``path``: this one (``blocks.AssembledSegmenter`` answers per image)."""
        return self

    def _run(self, image: np.ndarray, kind: str, progress=None, wanted=None):
        """Yield (tile, kept outputs cropped to the image) for every tile of ``image`` (or of the ``wanted`` indices)."""
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"image of shape {image.shape} does not have the model's {self.channels} channel(s)")
        height, width = image.shape[:2]
        tiles = self.plan(height, width)
        normalize = self.normalization.for_image(image)  # scope "image": the whole image's statistics
        for start, group, batch in core.normalized_batches(image, tiles, normalize, self.batch_size, wanted):
            outputs = self.predict_tiles(batch, kind)
            for j, tile in enumerate(group):
                if wanted is not None and start + j not in wanted:
                    continue
                y1, x1 = min(tile.keep_y1, height), min(tile.keep_x1, width)
                if y1 <= tile.keep_y0 or x1 <= tile.keep_x0:
                    continue  # a tile that only keeps padding
                window = (j, slice(tile.keep_y0 - tile.y, y1 - tile.y), slice(tile.keep_x0 - tile.x, x1 - tile.x))
                yield tile, (slice(tile.keep_y0, y1), slice(tile.keep_x0, x1)), [out[window] for out in outputs]
            if progress is not None:
                progress.update(len(group))

    def segment(self, image: np.ndarray, probabilities: np.ndarray | None = None, progress=None) -> np.ndarray:
        """Label image of an (H, W, C) image -> (H, W) ``label_dtype`` (uint8 for < 256 classes).

        ``probabilities``, when given, is a (K, H, W) float16 array (or float32, uint8:
        :func:`scale_probabilities`; e.g. a memory-mapped TIFF) that receives the softmax of every kept
        pixel; a ``np.memmap`` is flushed and its pages dropped from memory after each row of tiles.
        ``progress`` gets ``update(n)`` per batch of n tiles.
        """
        labels = np.zeros(image.shape[:2], self.label_dtype)
        if probabilities is None:
            kind = "labels"
        else:
            kind = "labels+probabilities" + ("" if probabilities.dtype == np.float16 else "32")
        row = None
        for tile, where, outputs in self._run(image, kind, progress):
            labels[where] = outputs[0]
            if probabilities is not None:
                if row is not None and tile.y != row:
                    _release_pages(probabilities)
                row = tile.y
                scaled = scale_probabilities(outputs[1], probabilities.dtype)
                probabilities[(slice(None), *where)] = np.moveaxis(scaled, -1, 0)
        if probabilities is not None:
            _release_pages(probabilities)
        return labels

    def bands(self, image, probability_dtype=None, progress=None, wanted=None):
        """Yield (y, (h, W) labels, (h, W, K) probabilities or None) for each row of tiles, top to bottom.

        The stitched outputs of a whole slide one row band at a time (the rows the band's tiles keep),
        never the whole label image. ``probability_dtype``: None (no probabilities), float16, float32
        or uint8 (the softmax scaled to 0..255, :func:`scale_probabilities`). ``wanted``: only the
        tiles of these plan indices (whole rows of tiles: a block of ``--num_blocks``).
        """
        height, width = image.shape[:2]
        if probability_dtype is None:
            kind = "labels"
        else:
            probability_dtype = np.dtype(probability_dtype)
            kind = "labels+probabilities" + ("" if probability_dtype == np.float16 else "32")
        band = None  # (rows slice, labels, probabilities)
        for tile, (rows, cols), outputs in self._run(image, kind, progress, wanted):
            if band is not None and band[0] != rows:
                yield band[0].start, band[1], band[2]
                band = None
            if band is None:
                h = rows.stop - rows.start
                probabilities = (None if probability_dtype is None
                                 else np.zeros((h, width, self.num_classes), probability_dtype))
                band = (rows, np.zeros((h, width), self.label_dtype), probabilities)
            band[1][:, cols] = outputs[0]
            if band[2] is not None:
                band[2][:, cols] = scale_probabilities(outputs[1], probability_dtype)
        if band is not None:
            yield band[0].start, band[1], band[2]

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Stitched (H, W, K) float32 softmax of an (H, W, C) image (H*W*K*4 bytes)."""
        out = np.zeros((*image.shape[:2], self.num_classes), np.float32)
        for _, where, (_, probabilities) in self._run(image, "labels+probabilities"):
            out[where] = probabilities
        return out

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Stitched (H, W, K) float32 logits of an (H, W, C) image (H*W*K*4 bytes: for tests and small images)."""
        out = np.zeros((*image.shape[:2], self.num_classes), np.float32)
        for _, where, (logits,) in self._run(image, "logits"):
            out[where] = logits
        return out


def probe_tolerance(reference: np.ndarray, repeat: np.ndarray) -> float:
    """The logit change the receptive-field probe treats as rounding, not reach.

    ``reference`` and ``repeat``: two calls of the model on the same input, (B, h, w, K) float32.
    ``_PROBE_RTOL`` of the output scale (max |logit|), or ``_PROBE_NOISE_FACTOR`` times the largest
    difference between the two calls, whichever is larger; 0 for an all-zero deterministic output.
    """
    reference = np.asarray(reference, np.float64)
    scale = float(np.abs(reference).max(initial=0.0))
    noise = float(np.abs(np.asarray(repeat, np.float64) - reference).max(initial=0.0))
    return max(_PROBE_RTOL * scale, _PROBE_NOISE_FACTOR * noise)

# ----------------------------------------------------------------------------- probabilities

#: ``--probability_dtype`` choices: float16 (half the size; Fiji/Bio-Formats cannot open float16 TIFFs),
#: float32 (Fiji-readable) and uint8 (the softmax x 255, rounded: a quarter of float32, Fiji-readable).
PROBABILITY_DTYPES = ("float16", "float32", "uint8")


def scale_probabilities(probabilities: np.ndarray, dtype) -> np.ndarray:
    """Softmax values in ``dtype``: float16/float32 as they are, uint8 as round(255 p)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.rint(probabilities.astype(np.float32) * 255).astype(np.uint8)
    return probabilities.astype(dtype, copy=False)



def open_probabilities(path: Path, num_classes: int, height: int, width: int, dtype="float16") -> np.memmap:
    """A (K, H, W) ``dtype`` memory-mapped TIFF at ``path`` (one page per class; BigTIFF when large)."""
    import tifffile

    dtype = np.dtype(dtype)
    nbytes = num_classes * height * width * dtype.itemsize
    array = tifffile.memmap(path, shape=(num_classes, height, width), dtype=dtype,
                            photometric="minisblack", bigtiff=nbytes > core.BIGTIFF_BYTES, metadata={"axes": "CYX"})
    files.reserve(path)  # a full disk: ENOSPC here, not SIGBUS when a page of the map is written
    return array


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


# ----------------------------------------------------------------------------- the folder


def segment_folder(job: core.Job, segmenter: Segmenter, args: argparse.Namespace) -> int:
    """Segment, write and evaluate every file of ``job``; returns the exit code (0, or 1 on failures).

    ``args``: the CLI's ``output_format``, ``save_overlay``, ``save_probabilities`` and ``mask_folder``.
    """
    output = job.output
    evaluation = Evaluation(job.run.num_classes, job.run.class_names) if job.masks is not None else None
    unmatched: list[str] = []
    started = time.perf_counter()
    done = core.process_images(job, lambda path, image: _segment_one(path, image, segmenter, args, output,
                                                                      evaluation, job.masks, unmatched))
    seconds = time.perf_counter() - started
    if evaluation is not None:
        core.warn_unmatched(unmatched, args.mask_folder)
        if evaluation.rows:
            scores = evaluation.write(output)
            print(seg_metrics.format_table(scores), flush=True)
            logger.info("metrics of %d image(s): %s, %s, %s", len(evaluation.rows), output / "metrics.json",
                        output / "metrics.csv", output / "metrics_per_image.csv")
        else:
            logger.warning("no image was evaluated: no prediction had a mask in %s", args.mask_folder)
    return core.finish(job, done, seconds)


def _segment_one(path: Path, image: np.ndarray, segmenter: Segmenter, args, output: Path,
                 evaluation: Evaluation | None, masks: dict[str, Path] | None, unmatched: list[str]) -> None:
    segmenter = segmenter.for_image(path)
    if getattr(image, "tile_wise", False):
        return _segment_slide(path, image, segmenter, args, output, evaluation, masks, unmatched)
    height, width = image.shape[:2]
    tiles = len(segmenter.plan(height, width))
    probability_dtype = getattr(args, "probability_dtype", "float16")
    probability_file = (atomic_path(output / "probabilities" / f"{path.stem}.tif") if args.save_probabilities
                        else nullcontext())
    with probability_file as tmp:
        probabilities = None if tmp is None else open_probabilities(tmp, segmenter.num_classes, height, width,
                                                                    probability_dtype)
        with core.progress_bar(tiles, "tile", leave=False, desc=path.name) if tiles > 16 else nullcontext() as bar:
            labels = segmenter.segment(image, probabilities=probabilities, progress=bar)
        del probabilities  # flushed by segment; the memory map closes before the file is renamed
    core.write_labels(output / f"{path.stem}.{args.output_format}", labels)
    if args.save_overlay:
        core.write_overlay(output / "overlays" / f"{path.stem}.png", image, labels, segmenter.num_classes)
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


def _segment_slide(path: Path, source: image_io.ImageSource, segmenter: Segmenter, args, output: Path,
                   evaluation: Evaluation | None, masks: dict[str, Path] | None, unmatched: list[str]) -> None:
    """A slide read by region: outputs streamed row band by row band into pyramidal OME-TIFFs.

    ``OUT/NAME.tif``: the labels, tiled, zlib-compressed, with lower resolutions as SubIFDs
    (``enki_seg.inference.pyramid``); ``OUT/probabilities/NAME.tif`` likewise, (K, H, W) in
    ``--probability_dtype``, levels by 2 x 2 mean. The overlay preview and the evaluation (against
    a mask read by region when it is a tiled TIFF) are taken band by band: the whole label image is
    never held.
    """
    height, width = source.shape[:2]
    tiles = len(segmenter.plan(height, width))
    if args.output_format != "tif":
        logger.warning("%s is read by region: its labels are written as a pyramidal OME-TIFF %s.tif, not %s",
                       path.name, path.stem, args.output_format)
    step = max(1, -(-max(height, width) // core.OVERLAY_MAX_SIDE))
    preview: list[np.ndarray] = []
    truth = mask_path = accumulator = None
    if evaluation is not None:
        mask_path = masks.get(path.stem)
        if mask_path is None:
            unmatched.append(path.name)
        else:
            truth = image_io.open_labels(mask_path, "mask")
            if truth.shape[:2] != (height, width):
                shape = truth.shape
                _close(truth)
                raise image_io.InputError(f"{path}: mask {mask_path}: mask is {shape[0]}x{shape[1]} but the image "
                                          f"is {height}x{width}")
            accumulator = seg_metrics.ConfusionAccumulator(segmenter.num_classes, class_names=evaluation.class_names)
    probability_dtype = np.dtype(getattr(args, "probability_dtype", "float16")) if args.save_probabilities else None
    if probability_dtype == np.float16:  # OME-XML has no float16 pixel type
        logger.info("%s: probabilities of a slide are written as float32 (OME-TIFF has no float16)", path.name)
        probability_dtype = np.dtype(np.float32)
    label_path = output / f"{path.stem}.tif"
    probability_path = output / "probabilities" / f"{path.stem}.tif"
    try:
        with atomic_path(label_path) as label_tmp, \
                (atomic_path(probability_path) if probability_dtype is not None else nullcontext()) as prob_tmp, \
                pyramid.PyramidWriter(label_tmp, height, width, segmenter.label_dtype, "nearest") as labels_out, \
                (pyramid.PyramidWriter(prob_tmp, height, width, probability_dtype, "mean", segmenter.num_classes)
                 if prob_tmp is not None else nullcontext()) as probabilities_out, \
                (core.progress_bar(tiles, "tile", leave=False, desc=path.name) if tiles > 16 else nullcontext()) as bar:
            for y, labels, probabilities in segmenter.bands(source, probability_dtype, progress=bar):
                labels_out.add(labels)
                if probabilities_out is not None:
                    probabilities_out.add(probabilities)
                if args.save_overlay:
                    first = -(-y // step) * step  # the first row of the global every-step-th grid in the band
                    preview.append(labels[first - y :: step, ::step])
                if accumulator is not None:
                    region = truth[y : y + labels.shape[0]] if isinstance(truth, np.ndarray) else \
                        truth.read_region(y, 0, labels.shape[0], width)
                    try:
                        accumulator.update(region, labels)
                    except ValueError as exc:
                        raise image_io.InputError(f"{path}: mask {mask_path}: {exc}") from None
            labels_out.finish()
            if probabilities_out is not None:
                probabilities_out.finish()
    finally:
        _close(truth)
    if args.save_overlay:
        core.write_overlay(output / "overlays" / f"{path.stem}.png", source, np.concatenate(preview),
                           segmenter.num_classes, step=step)
    if accumulator is not None:
        evaluation.add_accumulated(path.name, accumulator, height * width)


def _close(labels) -> None:
    if labels is not None and not isinstance(labels, np.ndarray):
        labels.close()
