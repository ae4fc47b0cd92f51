"""Writes what the builder produces: records into a new LMDB, each database's metadata entry, the manifest.

The bytes of records and of the metadata entry come from ``records.py``; this module only stores
them, under ``records.record_key(index)`` and ``records.METADATA_KEY``.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from enki_seg.data import object_sizes, records
from enki_seg.data.convert import SourceResult
from enki_seg.data.image_io import InputError
from enki_seg.files import WriteError, write_failure

logger = logging.getLogger(__name__)

MIN_MAP_SIZE = 64 << 20
_COMMIT_BYTES = 256 << 20  # commit a write transaction about every this many bytes


class LmdbWriter:
    """Writes records to a new LMDB, growing the map when it is full."""

    def __init__(self, path: Path, initial_map_size: int, shown_as: Path | None = None):
        self.path = path
        self.shown_as = shown_as or path  # the name in error messages (the final one, not the temporary)
        self.map_size = max(MIN_MAP_SIZE, int(initial_map_size))
        self.env = lmdb.open(str(path), map_size=self.map_size, subdir=True, sync=False,
                             metasync=False, readahead=False, meminit=False, max_dbs=0)
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
            except lmdb.MapFullError:
                self.map_size *= 2
                logger.debug("LMDB map full; growing %s to %d MB", self.path.name, self.map_size >> 20)
                self.env.set_mapsize(self.map_size)
            except lmdb.Error as exc:  # mdb_txn_commit: Input/output error, i.e. a full disk, a quota
                raise WriteError(write_failure(self.shown_as, exc, "--output_folder")) from None
        self.bytes += self._pending_bytes
        self._pending = []
        self._pending_bytes = 0

    def delete(self, keys: list[bytes]) -> None:
        """Remove records put earlier (a streamed source that failed half way, skipped with --skip_bad)."""
        if not keys:
            return
        self.flush()
        try:
            with self.env.begin(write=True) as txn:
                for key in keys:
                    txn.delete(key)
        except lmdb.Error as exc:
            raise WriteError(write_failure(self.shown_as, exc, "--output_folder")) from None

    def close(self) -> None:
        if self.env is not None:
            env, self.env = self.env, None
            try:
                env.sync(True)
            except lmdb.Error as exc:
                raise WriteError(write_failure(self.shown_as, exc, "--output_folder")) from None
            finally:
                env.close()


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
    source_stats: dict[str, dict] = field(default_factory=dict)
    object_sizes: list[np.ndarray] = field(default_factory=list)  # (N, 3) per source with instance labels
    record_objects: list = field(default_factory=list)  # (objects, pixels) per record with instance labels

    def add(self, result: SourceResult, writer: LmdbWriter) -> None:
        """Write the records of one source and count them; raises InputError on mixed pixel types."""
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
        if result.tiles:
            self.source_stats[result.tiles[0].image] = result.source_stats
        if result.object_sizes is not None:
            self.object_sizes.append(result.object_sizes)
            self.record_objects.extend(result.record_objects)
        values = [None] * len(result.tiles) if result.streamed else result.values
        for value, tile, pixels in zip(values, result.tiles, result.class_pixels):
            index = len(self.sources)
            if value is not None:  # a streamed source's records are written already, under these keys
                writer.put(records.record_key(index), value)
            self.sources.append(tile)
            self.shapes.add((tile.height, tile.width))
            for class_id, count in pixels.items():
                self.class_records.setdefault(class_id, []).append(index)
                self.class_pixels[class_id] = self.class_pixels.get(class_id, 0) + count

    def metadata(self, *, tile_size: int | None, compression: str, number_classes: int | None,
                 split_seed: int, build_args: dict, class_names: dict[int, str],
                 build_id: str | None = None) -> records.DatasetMetadata:
        (height, width) = next(iter(self.shapes)) if len(self.shapes) == 1 else (None, None)
        widest = max(self.mask_dtypes, key=lambda d: np.dtype(d).itemsize)
        return records.DatasetMetadata(
            record_count=len(self.sources), image_dtype=self.image_dtype, channels=self.channels,
            tile_size=tile_size, record_height=height, record_width=width, mask_dtype=widest,
            has_instances=bool(self.has_instances),
            class_ids=sorted(self.class_pixels), class_records=self.class_records,
            class_pixel_counts=self.class_pixels, channel_stats=self.stats.as_dict(),
            split=self.name, split_seed=split_seed, compression=compression,
            build_args=build_args, sources=self.sources,
            number_classes=number_classes, class_names=class_names, build_id=build_id,
            source_stats=self.source_stats,
            object_stats=(object_sizes.summarize(np.concatenate(self.object_sizes), self.record_objects)
                          if self.object_sizes else {}),
        )


def write_manifest(path: Path, accumulators: dict[str, SplitAccumulator], build_id: str = "") -> None:
    """CSV: which source file and window went to which record of which database, and the build id
    of the databases (the same in every row)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "record", "source_image", "source_mask", "source_instance", "y", "x",
                         "height", "width", "build_id"])
        for name, acc in accumulators.items():
            for index, src in enumerate(acc.sources):
                writer.writerow([name, index, src.image, src.mask or "", src.instance or "", src.y, src.x,
                                 src.height, src.width, build_id])
