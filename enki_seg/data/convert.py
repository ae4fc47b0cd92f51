"""Converts one source image and its labels into encoded records: read, check, tile, encode.

Runs in the builder's worker processes, so everything here is a plain function of picklable
arguments; bad input raises InputError naming the file and the fix.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from enki_seg.data import coco
from enki_seg.data import image_io
from enki_seg.data import records
from enki_seg.data import tiling
from enki_seg.data.image_io import InputError
from enki_seg.data.labels import majority_classes
from enki_seg.data.normalization import SourceStatsAccumulator, source_image_stats
from enki_seg.data.object_sizes import object_sizes
from enki_seg.data.sources import Source

logger = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    """The build settings a worker needs (the whole BuildConfig is not sent to every worker)."""

    use_tiling: bool
    tile_size: int
    tile_overlap: int
    number_classes: int | None
    compression: str
    class_map: dict[int, int] = field(default_factory=dict)  # COCO category id -> class id
    label_map: dict[int, int] = field(default_factory=dict)  # --label_map: mask value -> class id


@dataclass
class SourceResult:
    """What a worker returns for one source: encoded records and their bookkeeping."""

    values: list[bytes]
    tiles: list[records.RecordSource]
    class_pixels: list[dict[int, int]]
    stats: tuple  # records.ChannelStats.partial of the whole source image
    source_stats: dict  # normalization.source_image_stats of the whole source image (scope "image")
    has_instances: bool
    image_dtype: str
    channels: int
    mask_dtype: str
    warnings: list[str]
    #: set when the semantic mask holds only 0 and 255 and no --label_map was given (a binary export)
    binary_255_mask: str | None = None
    #: (N, 3) int64 (area, box height, box width) of the objects of the whole source image, None without
    #: instance labels (measured before tiling: objects cut by tile edges would look smaller)
    object_sizes: np.ndarray | None = None
    #: (objects, pixels) of each record, in ``tiles`` order (objects cut by the record's edges count); empty
    #: without instance labels
    record_objects: list = field(default_factory=list)
    #: the records went to ``emit`` as they were made (``values`` is empty): a source read by region
    streamed: bool = False


def convert_source(source: Source, options: ConvertOptions, emit=None) -> SourceResult:
    """Read, validate, tile and encode one source image.

    An image that ``image_io.open_image`` reads by region (a large tiled or striped TIFF, OME-Zarr) is
    tiled row of tiles by row of tiles with ``--use_tiling 1``: one band of ``tile_size`` rows is in
    memory at a time and the channel statistics are accumulated over the bands in the same pass
    (``SourceStatsAccumulator``). Its semantic mask is read by region too when its format allows;
    instance labels and COCO polygons are made whole (objects are classed and measured over the whole
    image), with a log line saying so.

    ``emit(value)``, when given, receives each encoded record as it is made instead of
    ``result.values`` (``result.streamed``): a slide's records are then never all in memory (the
    builder writes them to the LMDB at once; the tile bookkeeping, a few hundred bytes a record, stays).
    """
    with image_io.open_image(source.image) as opened:
        by_region = bool(options.use_tiling and opened.tile_wise)
        if opened.tile_wise and not by_region:
            logger.info("%s is read whole: with --use_tiling 0 it becomes one record", source.image)
        image = opened if by_region else image_io.ArraySource(opened.read(), source.image)
        with ExitStack() as stack:
            return _convert(source, options, image, by_region, stack, emit)


def read_by_region(source: Source, options: ConvertOptions) -> bool:
    """True when :func:`convert_source` tiles ``source`` by region (a large tiled TIFF, OME-Zarr; --use_tiling 1)."""
    if not options.use_tiling:
        return False
    with image_io.open_image(source.image) as opened:
        return bool(opened.tile_wise)


def _convert(source: Source, options: ConvertOptions, image: image_io.ImageSource, by_region: bool,
             stack: ExitStack, emit=None) -> SourceResult:
    warnings: list[str] = []
    height, width = image.shape[:2]
    semantic = instance = classes_by_id = None
    if source.coco_entry is not None:
        dataset = coco.CocoDataset({}, options.class_map, {}, [])
        instance, semantic, classes = coco.rasterize(source.coco_entry, dataset, height, width, warnings)
        classes_by_id = np.concatenate([[0], classes]).astype(np.int32)
    else:
        if source.mask is not None:
            if by_region and source.instance is None:
                semantic = image_io.open_labels(source.mask, "mask")
                if isinstance(semantic, image_io.LabelRegions):
                    stack.enter_context(semantic)
                else:
                    logger.info("mask %s is read whole (its format cannot be read by region)", source.mask)
            else:
                semantic = image_io.read_labels(source.mask, "mask")
            _check_same_size(image, semantic, source.image, source.mask)
            if options.label_map and isinstance(semantic, np.ndarray):
                semantic = apply_label_map(semantic, options.label_map)
        if source.instance is not None:
            if by_region:
                logger.info("instance labels %s are read whole (objects are classed and measured over the "
                            "whole image)", source.instance)
            instance = image_io.read_labels(source.instance, "instance labels")
            _check_same_size(image, instance, source.image, source.instance)
            classes_by_id, on_background = majority_classes(instance, semantic)
            if on_background.size:  # the record format needs a class for every object
                raise InputError(f"instance labels {source.instance}: object {int(on_background[0])} lies "
                                 "entirely on background in the semantic mask; fix the mask or the instance labels")
            if semantic is None:
                semantic = (instance > 0).astype(np.uint8)
    label_path = source.mask or source.instance or source.image
    if isinstance(semantic, image_io.LabelRegions):  # the values its first pass found, mapped
        label_values = semantic.values.astype(semantic.dtype)
        if options.label_map:
            label_values = apply_label_map(label_values, options.label_map)
        mask_dtype, max_label = label_values.dtype, int(label_values.max())
        looks_binary_255 = (not options.label_map and max_label == 255
                            and not np.any((label_values != 0) & (label_values != 255)))
    else:
        label_values = None
        mask_dtype, max_label = semantic.dtype, int(semantic.max())
        looks_binary_255 = (source.mask is not None and not options.label_map and max_label == 255
                            and not np.any((semantic != 0) & (semantic != 255)))
    if options.number_classes is not None and max_label >= options.number_classes:
        found = np.unique(semantic if label_values is None else label_values)
        bad = found[found >= options.number_classes]
        fix = ("it looks like a 0/255 binary export: pass --label_map 255=1" if looks_binary_255
               else "raise --number_classes, map the values with --label_map, or fix the mask")
        raise InputError(f"mask {label_path} has labels {bad.tolist()} >= --number_classes "
                         f"{options.number_classes}; {fix}")
    if options.use_tiling:
        if height < options.tile_size or width < options.tile_size:
            raise InputError(
                f"image {source.image} is {height}x{width}, smaller than --tile_size {options.tile_size}; "
                "use a smaller --tile_size or --use_tiling 0"
            )
        size = options.tile_size
        positions = tiling.tile_grid(height, width, size, options.tile_overlap)
        tile_h = tile_w = size
    else:
        positions = [(0, 0)]
        tile_h, tile_w = height, width
    # channel statistics over the source pixels (once per image, not per possibly-overlapping tile)
    if by_region:
        accumulator = SourceStatsAccumulator(height, width, image.shape[2])
        stats = source_stats = None
    else:
        stats, source_stats = records.ChannelStats.partial(image.array), source_image_stats(image.array)
    result = SourceResult([], [], [], stats, source_stats,
                          instance is not None, str(image.dtype), image.shape[2], str(mask_dtype),
                          warnings, str(label_path) if looks_binary_255 else None,
                          object_sizes(instance) if instance is not None else None)
    counted = 0  # rows of the image in the statistics so far

    def read_band(y):
        band = image.read_region(y, 0, tile_h, width)  # one row of tiles; a view of a whole image
        if isinstance(semantic, image_io.LabelRegions):
            mask_band = semantic.read_region(y, 0, tile_h, width)
            if options.label_map:
                mask_band = apply_label_map(mask_band, options.label_map)
        else:
            mask_band = semantic[y : y + tile_h]
        return band, mask_band

    rows = [(y, list(row)) for y, row in itertools.groupby(positions, key=lambda position: position[0])]
    # by region, the next band is read (its chunks decoded) in a thread while this one is encoded
    reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="band")) if by_region else None
    pending = reader.submit(read_band, rows[0][0]) if reader is not None else None
    for i, (y, row) in enumerate(rows):
        if reader is None:
            band, mask_band = read_band(y)
        else:
            band, mask_band = pending.result()
            pending = reader.submit(read_band, rows[i + 1][0]) if i + 1 < len(rows) else None
        if by_region and y + tile_h > counted:
            accumulator.add_rows(band[max(0, counted - y) :])
            counted = y + tile_h
        for _, x in row:
            columns = slice(x, x + tile_w)
            tile_image = band[:, columns]
            tile_mask = mask_band[:, columns]
            tile_inst = tile_classes = None
            if instance is not None:
                tile_inst, tile_classes = _compact_instances(instance[y : y + tile_h, columns], classes_by_id)
                result.record_objects.append((len(tile_classes), tile_inst.shape[0] * tile_inst.shape[1]))
            example = records.Example(tile_image, np.ascontiguousarray(tile_mask), tile_inst, tile_classes)
            value = records.encode_example(example, options.compression)
            if emit is None:
                result.values.append(value)
            else:
                emit(value)
            result.tiles.append(records.RecordSource(
                image=source.image.name, mask=source.mask.name if source.mask else None,
                instance=source.instance.name if source.instance else None,
                y=y, x=x, height=tile_h, width=tile_w))
            result.class_pixels.append(_class_pixels(tile_mask))
    result.streamed = emit is not None
    if by_region:
        moments = accumulator.moments
        result.stats = (moments.count, moments.mean, moments.m2, moments.min, moments.max)
        result.source_stats = accumulator.result()
    return result


def convert_task(task: tuple[Source, ConvertOptions]) -> tuple[str, SourceResult | str | None]:
    """Worker-pool entry point: ("ok", result) or ("bad", message), so the parent decides what to do;
    ("region", None) for a source tiled by region, which the parent converts itself, writing each
    record as it is made (a worker would hold all of a slide's records and pickle them back)."""
    source, options = task
    try:
        if read_by_region(source, options):
            return "region", None
        return "ok", convert_source(source, options)
    except InputError as exc:
        return "bad", str(exc)


def parse_label_map(text: str) -> dict[int, int]:
    """``"255=1"`` or ``"0=0,128=1,255=2"`` -> {value: class id}; raises InputError naming the flag."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            value, class_id = (int(v) for v in item.split("="))
        except ValueError:
            raise InputError(f"--label_map {text!r}: {item!r} is not VALUE=CLASS; e.g. --label_map 255=1 "
                             "for masks exported as 0/255") from None
        if value < 0 or class_id < 0:
            raise InputError(f"--label_map {text!r}: values and classes must be >= 0")
        if value in mapping:
            raise InputError(f"--label_map {text!r}: value {value} is mapped twice")
        mapping[value] = class_id
    if not mapping:
        raise InputError(f"--label_map {text!r} maps nothing; e.g. --label_map 255=1")
    return mapping


def apply_label_map(mask: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """(H, W) mask with each value in ``label_map`` replaced by its class id; other values unchanged.
    The dtype is kept unless a class id does not fit it (then int32)."""
    top = max(label_map.values())
    dtype = mask.dtype if top <= np.iinfo(mask.dtype).max else np.dtype(np.int32)
    if mask.dtype.itemsize <= 2:  # a lookup table over every possible value
        table = np.arange(np.iinfo(mask.dtype).max + 1, dtype=np.int64)
        for value, class_id in label_map.items():
            if value < table.size:
                table[value] = class_id
        return table.astype(dtype)[mask]
    out = mask.astype(dtype, copy=True)
    for value, class_id in label_map.items():
        out[mask == value] = class_id
    return out


def _check_same_size(image, labels, image_path, label_path):
    if tuple(labels.shape) != tuple(image.shape[:2]):
        raise InputError(
            f"{label_path} is {labels.shape[0]}x{labels.shape[1]} but image {image_path} is "
            f"{image.shape[0]}x{image.shape[1]}; image and labels must be the same size"
        )


def _compact_instances(tile: np.ndarray, classes_by_id: np.ndarray):
    """Renumber the objects visible in a tile 1..N; returns labels and their (N,) class ids."""
    ids = np.unique(tile)
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros(tile.shape, np.uint16), np.zeros(0, np.int32)
    dtype = records.smallest_label_dtype(ids.size)
    if dtype == np.uint8:
        dtype = np.dtype(np.uint16)  # instance labels are uint16 or int32, never uint8
    compact = np.searchsorted(ids, tile).astype(dtype) + 1
    compact[tile == 0] = 0
    return np.ascontiguousarray(compact), classes_by_id[ids].astype(np.int32)


def _class_pixels(mask: np.ndarray) -> dict[int, int]:
    if mask.dtype.itemsize <= 2:
        counts = np.bincount(mask.ravel())
        return {int(c): int(n) for c, n in enumerate(counts) if n}
    values, counts = np.unique(mask, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}
