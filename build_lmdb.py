"""Shards a folder of images + masks (or COCO annotations) into train/test LMDB databases.

    python build_lmdb.py --image_folder data/images --mask_folder data/masks \\
        --output_folder data/lmdb --dataset_name hes --train_fraction 0.8 --image_format tif \\
        --use_tiling 1 --tile_size 256 --seed 0

Writes ``train-<name>.lmdb`` and ``test-<name>.lmdb`` (records in the format of ``records.py``) and
``manifest-<name>.csv`` (which source file and tile went to which database). The split is made by
source image before tiling, from ``--seed``, so no image contributes to both databases. Outputs are
built in a hidden temporary folder inside ``--output_folder`` and renamed into place only when
complete: a killed build never leaves a database that looks finished, and a rerun starts clean.
"""
from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from enki_seg.data import coco
from enki_seg.data import image_io
from enki_seg.data import records
from enki_seg.data import tiling
from enki_seg.data.image_io import InputError

logger = logging.getLogger("build_lmdb")

_TMP_PREFIX = ".build-"
_MIN_MAP_SIZE = 64 << 20
_COMMIT_BYTES = 256 << 20  # commit a write transaction about every this many bytes


@dataclass
class Source:
    """One source image and its labels; ``coco_entry`` is set for COCO input."""

    stem: str
    image: Path
    mask: Path | None = None
    instance: Path | None = None
    coco_entry: coco.CocoImage | None = None


@dataclass
class BuildOptions:
    use_tiling: bool
    tile_size: int
    tile_overlap: int
    number_classes: int | None
    compression: str
    class_map: dict[int, int] = field(default_factory=dict)  # COCO category id -> class id


@dataclass
class SourceResult:
    """What a worker returns for one source: encoded records and their bookkeeping."""

    stem: str
    values: list[bytes]
    tiles: list[records.RecordSource]
    class_pixels: list[dict[int, int]]
    stats: tuple  # records.ChannelStats.partial of the whole source image
    has_instances: bool
    image_dtype: str
    channels: int
    mask_dtype: str
    warnings: list[str]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="build_lmdb",
        description="Convert folders of images and masks (or COCO annotations) into a pair of LMDB "
        "databases for training.",
    )
    p.add_argument("--image_folder", required=True, help="folder containing the images")
    p.add_argument("--mask_folder", help="folder containing the semantic masks (integer class ids, "
                   "matched to images by file stem: a.tif pairs with a.png)")
    p.add_argument("--instance_folder", help="optional folder of instance-label images (each object "
                   "its own integer id, matched by stem); an object's class is the majority class of "
                   "the semantic mask under it, or 1 when --mask_folder is not given")
    p.add_argument("--coco_json", help="COCO instances JSON instead of mask folders (polygons or RLE; "
                   "categories remapped to contiguous ids starting at 1)")
    p.add_argument("--output_folder", required=True, help="folder where the databases are written")
    p.add_argument("--dataset_name", default="dataset", help="name used in train-<name>.lmdb etc.")
    p.add_argument("--train_fraction", type=float, default=0.8,
                   help="fraction of source images for training, in (0, 1) (default 0.8)")
    p.add_argument("--image_format", default="tif", help="extension of the input images {tif, png, jpg}")
    p.add_argument("--use_tiling", type=int, choices=(0, 1), default=0,
                   help="cut source images into tiles [0 = False, 1 = True]")
    p.add_argument("--tile_size", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--tile_overlap", type=int, default=0, help="pixels shared by neighbouring tiles")
    p.add_argument("--size_multiple", type=int, default=16,
                   help="tile size must be a multiple of this (the model's downsampling factor)")
    p.add_argument("--number_classes", type=int, default=None,
                   help="if given, every mask label must be < this number")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--compression", default="none", choices=sorted(records.CODECS),
                   help="per-record compression (default none)")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="processes that read and encode source images (default: CPUs, at most 8)")
    p.add_argument("--skip_bad", type=int, choices=(0, 1), default=0,
                   help="skip bad image/mask pairs with a warning instead of stopping")
    p.add_argument("--overwrite", type=int, choices=(0, 1), default=0,
                   help="replace existing databases of the same name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Argument errors that need no file access; raises InputError."""
    if args.coco_json is None and args.mask_folder is None and args.instance_folder is None:
        raise InputError("give --mask_folder (semantic masks), --instance_folder, or --coco_json")
    if args.coco_json is not None and (args.mask_folder or args.instance_folder):
        raise InputError("--coco_json replaces --mask_folder/--instance_folder; give one or the other")
    if not 0.0 < args.train_fraction < 1.0:
        raise InputError(f"--train_fraction {args.train_fraction} must be in (0, 1): both databases "
                         "need at least one image")
    if args.size_multiple < 1:
        raise InputError(f"--size_multiple {args.size_multiple} must be >= 1")
    if args.use_tiling:
        if args.tile_size <= 0 or args.tile_size % args.size_multiple:
            raise InputError(
                f"--tile_size {args.tile_size} is not a multiple of --size_multiple {args.size_multiple}; "
                f"use e.g. {max(1, round(args.tile_size / args.size_multiple)) * args.size_multiple}"
            )
        if not 0 <= args.tile_overlap < args.tile_size:
            raise InputError(f"--tile_overlap {args.tile_overlap} must be in [0, --tile_size)")
    if args.number_classes is not None and args.number_classes < 1:
        raise InputError(f"--number_classes {args.number_classes} must be >= 1")
    if args.workers < 1:
        raise InputError(f"--workers {args.workers} must be >= 1")
    if not args.dataset_name or "/" in args.dataset_name:
        raise InputError(f"--dataset_name {args.dataset_name!r} must be a plain, non-empty name")


def discover(args, skipped: list[str]) -> tuple[list[Source], coco.CocoDataset | None]:
    """Pair every image with its labels; a missing partner is an error (or skipped)."""
    images = image_io.list_images(args.image_folder, args.image_format)
    sources = []
    dataset = None
    if args.coco_json:
        dataset = coco.load(args.coco_json)
        for path in images:
            entry = dataset.images.get(path.stem)
            if entry is None:
                _bad(args, skipped, f"image {path} has no entry in {args.coco_json}; add it or remove "
                     "the image")
                continue
            sources.append(Source(path.stem, path, coco_entry=entry))
        return sources, dataset
    masks = image_io.index_by_stem(args.mask_folder, "mask") if args.mask_folder else None
    instances = image_io.index_by_stem(args.instance_folder, "instance") if args.instance_folder else None
    for path in images:
        mask = inst = None
        if masks is not None:
            mask = masks.get(path.stem)
            if mask is None:
                _bad(args, skipped, f"image {path} has no mask named {path.stem}.* in {args.mask_folder}; "
                     "add the mask or remove the image")
                continue
        if instances is not None:
            inst = instances.get(path.stem)
            if inst is None:
                _bad(args, skipped, f"image {path} has no instance labels named {path.stem}.* in "
                     f"{args.instance_folder}; add them or remove the image")
                continue
        sources.append(Source(path.stem, path, mask, inst))
    return sources, dataset


def _bad(args, skipped: list[str], message: str) -> None:
    if not args.skip_bad:
        raise InputError(message)
    logger.warning("skipping: %s", message)
    skipped.append(message)


def split_sources(sources: list[Source], train_fraction: float, seed: int):
    """Seeded split by source image (before tiling, so no image leaks into both sets)."""
    order = sorted(sources, key=lambda s: s.stem)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_train = int(round(train_fraction * len(order)))
    train = sorted((order[i] for i in perm[:n_train]), key=lambda s: s.stem)
    test = sorted((order[i] for i in perm[n_train:]), key=lambda s: s.stem)
    return train, test


def _instance_classes(instance: np.ndarray, semantic: np.ndarray | None, path: Path) -> np.ndarray:
    """Class of every object id 0..max: the majority non-zero semantic class under it (or 1)."""
    n = int(instance.max()) + 1
    if semantic is None:
        classes = np.ones(n, np.int32)
        classes[0] = 0
        return classes
    k = int(semantic.max()) + 1
    joint = np.bincount(instance.ravel().astype(np.int64) * k + semantic.ravel(), minlength=n * k)
    joint = joint.reshape(n, k)
    present = joint.sum(axis=1) > 0
    fg = joint[:, 1:] if k > 1 else np.zeros((n, 1), np.int64)
    classes = np.where(fg.max(axis=1) > 0, fg.argmax(axis=1) + 1, 0).astype(np.int32)
    orphan = np.flatnonzero(present & (classes == 0))
    orphan = orphan[orphan > 0]
    if orphan.size:
        raise InputError(f"instance labels {path}: object {int(orphan[0])} lies entirely on background "
                         "in the semantic mask; fix the mask or the instance labels")
    classes[0] = 0
    return classes


def process_source(source: Source, options: BuildOptions) -> SourceResult:
    """Read, validate, tile and encode one source image (runs in a worker process)."""
    image = image_io.read_image(source.image)
    warnings: list[str] = []
    semantic = instance = classes_by_id = None
    if source.coco_entry is not None:
        dataset = coco.CocoDataset({}, options.class_map, {}, [])
        instance, semantic, classes = coco.rasterize(source.coco_entry, dataset, *image.shape[:2], warnings)
        classes_by_id = np.concatenate([[0], classes]).astype(np.int32)
    else:
        if source.mask is not None:
            semantic = image_io.read_labels(source.mask, "mask")
            _check_same_size(image, semantic, source.image, source.mask)
        if source.instance is not None:
            instance = image_io.read_labels(source.instance, "instance labels")
            _check_same_size(image, instance, source.image, source.instance)
            classes_by_id = _instance_classes(instance, semantic, source.instance)
            if semantic is None:
                semantic = (instance > 0).astype(np.uint8)
    label_path = source.mask or source.instance or source.image
    max_label = int(semantic.max())
    if options.number_classes is not None and max_label >= options.number_classes:
        found = np.unique(semantic)
        bad = found[found >= options.number_classes]
        raise InputError(
            f"mask {label_path} has labels {bad.tolist()} >= --number_classes {options.number_classes}; "
            "raise --number_classes or fix the mask"
        )
    height, width = image.shape[:2]
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
    result = SourceResult(source.stem, [], [], [], records.ChannelStats.partial(image),
                          instance is not None, str(image.dtype), image.shape[2], str(semantic.dtype),
                          warnings)
    for y, x in positions:
        window = (slice(y, y + tile_h), slice(x, x + tile_w))
        tile_image = image[window]
        tile_mask = semantic[window]
        tile_inst = tile_classes = None
        if instance is not None:
            tile_inst, tile_classes = _compact_instances(instance[window], classes_by_id)
        example = records.Example(tile_image, np.ascontiguousarray(tile_mask), tile_inst, tile_classes)
        result.values.append(records.encode_example(example, options.compression))
        result.tiles.append(records.RecordSource(
            image=source.image.name, mask=source.mask.name if source.mask else None,
            instance=source.instance.name if source.instance else None,
            y=y, x=x, height=tile_h, width=tile_w))
        result.class_pixels.append(_class_pixels(tile_mask))
    return result


def _check_same_size(image, labels, image_path, label_path):
    if labels.shape != image.shape[:2]:
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


def _run_worker(task):
    """Pool entry point: returns ("ok", result) or ("bad", message) so the parent decides."""
    source, options = task
    try:
        return "ok", process_source(source, options)
    except InputError as exc:
        return "bad", str(exc)


class LmdbWriter:
    """Writes records to a new LMDB, growing the map when it is full; closes on exit."""

    def __init__(self, path: Path, initial_map_size: int):
        import lmdb

        self._lmdb = lmdb
        self.path = path
        self.map_size = max(_MIN_MAP_SIZE, int(initial_map_size))
        self.env = lmdb.open(str(path), map_size=self.map_size, subdir=True, sync=False,
                             metasync=False, readahead=False, meminit=False, max_dbs=0)
        self.count = 0
        self.bytes = 0
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        self._pending_bytes += len(value)
        if self._pending_bytes >= _COMMIT_BYTES:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value, overwrite=False)
                break
            except self._lmdb.MapFullError:
                self.map_size *= 2
                logger.debug("LMDB map full; growing %s to %d MB", self.path.name, self.map_size >> 20)
                self.env.set_mapsize(self.map_size)
        self.bytes += self._pending_bytes
        self._pending = []
        self._pending_bytes = 0

    def close(self) -> None:
        if self.env is not None:
            self.env.sync(True)
            self.env.close()
            self.env = None


@dataclass
class SplitAccumulator:
    """Builds the metadata of one database while its records are written."""

    name: str
    sources: list[records.RecordSource] = field(default_factory=list)
    class_records: dict[int, list[int]] = field(default_factory=dict)
    class_pixels: dict[int, int] = field(default_factory=dict)
    stats: records.ChannelStats | None = None
    shapes: set = field(default_factory=set)
    image_dtype: str | None = None
    channels: int | None = None
    mask_dtypes: set = field(default_factory=set)
    has_instances: bool | None = None
    source_images: int = 0

    def add(self, result: SourceResult, writer: LmdbWriter) -> None:
        if self.image_dtype is None:
            self.image_dtype, self.channels = result.image_dtype, result.channels
            self.stats = records.ChannelStats(result.channels)
            self.has_instances = result.has_instances
        elif (result.image_dtype, result.channels) != (self.image_dtype, self.channels):
            raise InputError(
                f"image {result.tiles[0].image} is {result.image_dtype} with {result.channels} channel(s) "
                f"but earlier images are {self.image_dtype} with {self.channels}; all images of a "
                "dataset must share pixel type and channel count"
            )
        self.source_images += 1
        self.mask_dtypes.add(result.mask_dtype)
        self.stats.add_partial(*result.stats)
        for value, tile, pixels in zip(result.values, result.tiles, result.class_pixels):
            index = len(self.sources)
            writer.put(records.record_key(index), value)
            self.sources.append(tile)
            self.shapes.add((tile.height, tile.width))
            for class_id, count in pixels.items():
                self.class_records.setdefault(class_id, []).append(index)
                self.class_pixels[class_id] = self.class_pixels.get(class_id, 0) + count

    def metadata(self, args, split_seed: int, class_names: dict[int, str]) -> records.DatasetMetadata:
        (height, width) = next(iter(self.shapes)) if len(self.shapes) == 1 else (None, None)
        widest = max(self.mask_dtypes, key=lambda d: np.dtype(d).itemsize)
        return records.DatasetMetadata(
            record_count=len(self.sources), image_dtype=self.image_dtype, channels=self.channels,
            tile_size=args.tile_size if args.use_tiling else None,
            record_height=height, record_width=width, mask_dtype=widest,
            has_instances=bool(self.has_instances),
            class_ids=sorted(self.class_pixels), class_records=self.class_records,
            class_pixel_counts=self.class_pixels, channel_stats=self.stats.as_dict(),
            split=self.name, split_seed=split_seed, compression=args.compression,
            build_args=_recorded_args(args), sources=self.sources,
            number_classes=args.number_classes, class_names=class_names,
        )


def _recorded_args(args) -> dict:
    out = {}
    for key, value in vars(args).items():
        if key in ("image_folder", "mask_folder", "instance_folder", "coco_json", "output_folder") and value:
            value = str(Path(value).resolve())
        out[key] = value
    return out


def _output_paths(args) -> dict[str, Path]:
    out = Path(args.output_folder)
    name = args.dataset_name
    return {"train": out / f"train-{name}.lmdb", "test": out / f"test-{name}.lmdb",
            "manifest": out / f"manifest-{name}.csv"}


def _prepare_output(args) -> tuple[Path, bool]:
    """Create/check the output folder; remove stale temporaries of killed builds."""
    out = Path(args.output_folder)
    created = False
    if not out.exists():
        try:
            out.mkdir(parents=True)
            created = True
        except OSError as exc:
            raise InputError(f"cannot create output folder {out}: {exc.strerror}; choose a writable "
                             "--output_folder") from None
    if not out.is_dir():
        raise InputError(f"--output_folder {out} exists and is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out} is not writable; choose another --output_folder or fix "
                         "its permissions")
    for stale in out.glob(f"{_TMP_PREFIX}{args.dataset_name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s left by a build that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
    if not args.overwrite:
        for path in _output_paths(args).values():
            if path.exists():
                raise InputError(f"{path} already exists; pass --overwrite 1 to replace it or choose "
                                 "another --dataset_name")
    return out, created


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _estimate_map_size(sources: list[Source], args) -> int:
    # Decoded images can be much larger than compressed files (PNG/JPG), and overlapping tiles
    # repeat pixels; start at 2x the input bytes plus masks and grow on MapFullError if needed.
    total = sum(s.image.stat().st_size for s in sources)
    total += sum(s.mask.stat().st_size for s in sources if s.mask)
    total += sum(s.instance.stat().st_size for s in sources if s.instance)
    if args.use_tiling and args.tile_overlap:
        total *= (args.tile_size / (args.tile_size - args.tile_overlap)) ** 2
    return int(2 * total) + _MIN_MAP_SIZE


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(f"received signal {signum}")


def build(args) -> dict:
    """Run the whole build; returns the summary. Raises InputError on bad input."""
    start = time.perf_counter()
    check_args(args)
    skipped: list[str] = []
    sources, coco_dataset = discover(args, skipped)
    if not sources:
        raise InputError(f"no usable image in {args.image_folder}; see the warnings above")
    if len(sources) < 2:
        raise InputError(f"only {len(sources)} image in {args.image_folder}: a train/test split needs "
                         "at least 2")
    train, test = split_sources(sources, args.train_fraction, args.seed)
    if not train or not test:
        raise InputError(
            f"--train_fraction {args.train_fraction} with {len(sources)} images leaves the "
            f"{'test' if not test else 'train'} database empty; use more images or change --train_fraction"
        )
    out, created = _prepare_output(args)
    tmp = out / f"{_TMP_PREFIX}{args.dataset_name}-{os.getpid()}"
    final = _output_paths(args)
    options = BuildOptions(bool(args.use_tiling), args.tile_size, args.tile_overlap, args.number_classes,
                           args.compression, coco_dataset.class_ids if coco_dataset else {})
    class_names = coco_dataset.class_names if coco_dataset else {}
    warnings = list(coco_dataset.warnings) if coco_dataset else []
    summary = {"skipped": skipped}
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    success = False
    pool = None
    try:
        # workers are forked before any LMDB environment exists in this process
        pool = _worker_pool(args.workers, len(train) + len(test))
        tmp.mkdir()
        splits = {}
        for name, split in (("train", train), ("test", test)):
            splits[name] = (split, LmdbWriter(tmp / final[name].name, _estimate_map_size(split, args)),
                            SplitAccumulator(name))
        try:
            _write_all(args, options, splits, skipped, warnings, pool)
            for name, (_, writer, acc) in splits.items():
                if acc.source_images == 0:
                    raise InputError(f"every {name} image was skipped as bad; nothing to build")
                writer.put(records.METADATA_KEY, acc.metadata(args, args.seed, class_names).to_json())
                writer.flush()
        finally:
            for _, writer, _ in splits.values():
                writer.close()
        _write_manifest(tmp / final["manifest"].name, splits)
        if warnings:
            (tmp / f"warnings-{args.dataset_name}.txt").write_text("\n".join(warnings) + "\n")
        for item in sorted(tmp.iterdir()):
            target = out / item.name
            if target.exists():  # only reachable with --overwrite (checked before the build)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            item.rename(target)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        success = True
        summary.update(_summary(splits, final, time.perf_counter() - start, warnings))
        return summary
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
        if not success and created:
            shutil.rmtree(out, ignore_errors=True)


def _worker_pool(workers: int, tasks: int):
    """A process pool for reading/encoding, or None when one process is enough."""
    if workers == 1 or tasks < 2:
        return None
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    return ctx.Pool(min(workers, tasks), initializer=_worker_init)


def _worker_init() -> None:
    # Workers must die on the SIGTERM of Pool.terminate() (not inherit the parent's handler), and
    # leave Ctrl-C to the parent, which then terminates the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_all(args, options, splits, skipped, warnings, pool) -> None:
    tasks = [(source, options) for name in ("train", "test") for source in splits[name][0]]
    owners = [name for name in ("train", "test") for _ in splits[name][0]]
    progress = _progress(len(tasks), args.quiet)
    try:
        results = map(_run_worker, tasks) if pool is None else pool.imap(_run_worker, tasks, chunksize=1)
        _consume(results, tasks, owners, splits, args, skipped, warnings, progress)
    finally:
        progress.close()


def _consume(results, tasks, owners, splits, args, skipped, warnings, progress):
    for (status, payload), (source, _), owner in zip(results, tasks, owners):
        progress.update(1)
        if status == "bad":
            if not args.skip_bad:
                raise InputError(payload)
            logger.warning("skipping: %s", payload)
            skipped.append(payload)
            continue
        warnings.extend(payload.warnings)
        _, writer, acc = splits[owner]
        acc.add(payload, writer)


def _progress(total: int, quiet: bool):
    if not quiet:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional; without it there is no bar
            quiet = True
    if quiet:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, unit="image", desc="build_lmdb", disable=None)


def _write_manifest(path: Path, splits) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "record", "source_image", "source_mask", "source_instance", "y", "x",
                         "height", "width"])
        for name, (_, _, acc) in splits.items():
            for index, src in enumerate(acc.sources):
                writer.writerow([name, index, src.image, src.mask or "", src.instance or "", src.y, src.x,
                                 src.height, src.width])


def _summary(splits, final, seconds, warnings) -> dict:
    out = {"seconds": round(seconds, 2), "warnings": len(warnings)}
    for name, (_, writer, acc) in splits.items():
        out[name] = {
            "path": str(final[name]),
            "source_images": acc.source_images,
            "records": len(acc.sources),
            "bytes": writer.bytes,
            "class_pixels": dict(sorted(acc.class_pixels.items())),
            "class_records": {c: len(v) for c, v in sorted(acc.class_records.items())},
        }
    out["manifest"] = str(final["manifest"])
    return out


def format_summary(summary: dict) -> str:
    lines = []
    for name in ("train", "test"):
        s = summary[name]
        lines.append(f"{name:5s} {s['records']:7d} records from {s['source_images']} images, "
                     f"{s['bytes'] / 1e6:9.1f} MB  -> {s['path']}")
        total = sum(s["class_pixels"].values()) or 1
        hist = ", ".join(f"{c}: {100 * n / total:.1f}% ({s['class_records'][c]} rec)"
                         for c, n in s["class_pixels"].items())
        lines.append(f"      class pixels {hist}")
    lines.append(f"manifest -> {summary['manifest']}")
    if summary["warnings"]:
        lines.append(f"{summary['warnings']} annotation warnings (see warnings-*.txt)")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} bad input(s):")
        lines.extend(f"  - {m}" for m in summary["skipped"])
    lines.append(f"built in {summary['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        summary = build(args)
    except InputError as exc:
        logger.error("%s", exc)
        return 2
    except (_Terminated, KeyboardInterrupt) as exc:
        logger.error("build interrupted (%s); nothing was written", exc or "Ctrl-C")
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
