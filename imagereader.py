"""The reader engine: worker processes turn LMDB records into ready batches in shared memory.

    from imagereader import ImageReader, ReaderConfig
    with ImageReader(ReaderConfig("train-hes.lmdb", batch_size=8, num_workers=2)) as reader:
        for batch in reader:          # train mode: an endless stream of exact epochs
            batch["image"]            # (B, H, W, C) float32, normalized
            batch["semantic_mask"]    # (B, H, W) uint8 (int32 if a class id is >= 256)
            batch["index"]            # (B,) int64 record indices

How it works. Each worker opens the database itself (read-only, after it starts), decodes records
zero-copy, augments and normalizes them, and writes whole batches into preallocated batch *slots* of
one shared-memory block; only small messages (slot ids) travel through a pipe per worker. Slots are
owned by workers (``slots_per_worker`` each), batch ``s`` is made by worker ``s % num_workers``, and
the consumer hands batches out in order of ``s``; so the stream does not depend on the worker count
or on timing. The shared-memory file is unlinked as soon as every worker has mapped it, so even a
SIGKILL of the whole process tree leaves nothing in /dev/shm.

What is in batch ``s`` is a pure function of the configuration:

* train mode, shuffled: the stream is the concatenation of per-epoch permutations of the shard's
  records (seeded by ``(seed, epoch)``), so every epoch holds every record exactly once, and batch
  ``s`` is stream positions ``[s*B, (s+1)*B)``, crossing epoch boundaries when ``B`` does not divide
  the record count. ``start_position`` resumes the stream anywhere (``reader.position`` tells where).
* train mode, ``balance_classes``: each position draws a class uniformly among the classes present,
  then a record containing it (NIST's scheme), from the per-class index in the metadata.
* test mode: the shard's records in index order, once per pass; the last batch of a pass is partial
  (fewer than ``B`` rows: arrays have the real length, so nothing is duplicated or padded). Each
  ``iter(reader)`` yields exactly one pass; the next ``iter`` yields the next, identical pass.
  With ``batches_per_pass=N`` a pass is exactly N full batches instead, rows past the shard's
  records being zero padding marked ``valid == 0`` (distributed test steps: no empty replica).

Each example's augmentation is drawn from ``np.random.default_rng([seed, epoch, index])``, so the
same seed gives identical examples with any number of workers and any start method.

Failure: a worker exception reaches the consumer as ``ReaderError`` with the worker's traceback; a
worker killed by a signal (e.g. the OOM killer's SIGKILL) raises ``ReaderError`` naming the signal;
a corrupt record names its key (or, with ``skip_corrupt``, is skipped within its shard with a
warning). The reader is a context manager; leaving it (also by exception or Ctrl-C) stops and joins
every worker. Importing this module does not import TensorFlow; ``as_tf_dataset`` imports it lazily.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import multiprocessing
import os
import select
import signal
import sys
import tempfile
import time
import traceback
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import connection

import numpy as np

import augment
from enki_seg import processes
from enki_seg.data import instance_targets, records
from enki_seg.data.normalization import Normalization

logger = logging.getLogger(__name__)

STARVATION_MESSAGE = "Input Queue Starvation !!!!"
STARVATION_OVER_MESSAGE = "Input Queue Starvation Over"
#: NIST's thresholds: starving below 10% of the queue capacity, recovered above 50%.
STARVATION_LOW = 0.10
STARVATION_HIGH = 0.50


class ReaderError(RuntimeError):
    """A worker failed; the message carries its traceback or the signal that killed it."""


@dataclass
class ReaderConfig:
    """Everything a reader needs; picklable, so workers receive it whatever the start method.

    database: path of an LMDB built by build_lmdb.py.
    batch_size: examples per batch (per replica, in the trainers).
    num_workers: worker processes.
    mode: "train" (endless shuffled or balanced stream) or "test" (every record once per pass, in order).
    augment: augmentation settings, or None for none (test mode never augments).
    normalization: a ``normalization.Normalization``; its method is recorded in run configs.
    balance_classes: NIST's class-balanced sampling (train mode).
    seed: seeds the shuffling and every example's augmentation.
    shard_index, num_shards: this reader reads records ``shard_index::num_shards`` only (multi-worker
        training: disjoint shards that together cover the database).
    start_position: train mode: the stream position (examples) to start at, for resume.
    batches_per_pass: test mode: 0 makes a pass ceil(records / batch_size) batches, the last one
        partial; N > 0 makes every pass exactly N full batches, the rows past the shard's records
        being padding, and adds a ``valid`` array (1 = a record, 0 = padding). Distributed test steps
        need this: every replica of every worker then gets a full batch at every step (an empty
        per-replica batch breaks synchronized batch norm and collectives).
    slots_per_worker: batch slots each worker owns (queue capacity = num_workers * slots_per_worker).
    size_multiple: records' height and width must be multiples of this (the model's downsampling).
    crop_shape: (height, width) every example is cut to (``records.crop_shape`` chooses it; trainers'
        ``--crop_size``), or None to use records whole (they must then share one size). The window is
        random per example in train mode (seeded like the augmentation, drawn before it) and fixed per
        record in test mode (every pass scores the same pixels); a record smaller than the crop on a
        side is zero padded there (image 0, labels background). Boxes and instance labels follow.
    max_instances: > 0 adds instance outputs (labels, boxes, classes) padded to this many objects.
    instance_target: "" (the records' semantic masks) or "boundary": ``semantic_mask`` is derived from
        the (augmented) instance labels as background 0 / interior 1 / boundary 2
        (``enki_seg.data.instance_targets``), for instance segmentation with a semantic model.
    skip_corrupt: skip a corrupt record with a warning instead of failing: train mode uses the shard's
        next record instead, test mode leaves it out (``skipped_records``/``pass_skipped_records``
        count them), so every other record is still read exactly once per pass.
    copy: hand out copies instead of views that are only valid until the next batch is requested.
    start_method: "fork", "spawn" or "forkserver"; None picks forkserver (where available), since
        forking a process whose OpenCV/TensorFlow thread pools have run can deadlock the child.
    stall_timeout: seconds without any batch from a live worker before ReaderError (a hung worker).
    """

    database: str
    batch_size: int = 8
    num_workers: int = 1
    mode: str = "train"
    augment: augment.AugmentConfig | None = None
    normalization: Normalization = field(default_factory=Normalization)
    balance_classes: bool = False
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    start_position: int = 0
    batches_per_pass: int = 0
    slots_per_worker: int = 3
    size_multiple: int = 1
    max_instances: int = 0
    instance_target: str = ""
    crop_shape: tuple[int, int] | None = None
    skip_corrupt: bool = False
    copy: bool = False
    start_method: str | None = None
    stall_timeout: float = 600.0

    def __post_init__(self):
        if self.crop_shape is not None:
            self.crop_shape = (int(self.crop_shape[0]), int(self.crop_shape[1]))
            if min(self.crop_shape) < 1:
                raise ValueError(f"crop_shape must be positive, got {self.crop_shape}")
        if self.mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {self.mode!r}")
        if self.batch_size < 1 or self.num_workers < 1 or self.slots_per_worker < 2:
            raise ValueError("batch_size and num_workers must be >= 1 and slots_per_worker >= 2")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} not in [0, num_shards={self.num_shards})")
        if self.instance_target not in ("", *instance_targets.TARGETS):
            raise ValueError(f"instance_target {self.instance_target!r} is not one of {instance_targets.TARGETS}")
        if self.batches_per_pass < 0 or (self.batches_per_pass and self.mode != "test"):
            raise ValueError("batches_per_pass must be >= 0 and is for test mode only")
        if self.start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"start_method {self.start_method!r} is not fork, spawn or forkserver")


# ----------------------------------------------------------------------------- what goes where


class Plan:
    """Which record (and which random stream) fills each row of batch ``seq``; pure and cheap."""

    def __init__(self, config: ReaderConfig, metadata: records.DatasetMetadata):
        self.config = config
        self.indices = np.arange(metadata.record_count, dtype=np.int64)[config.shard_index::config.num_shards]
        self.padded = config.batches_per_pass > 0
        if self.padded:
            if self.indices.size > config.batches_per_pass * config.batch_size:
                raise ReaderError(
                    f"batches_per_pass={config.batches_per_pass} x batch_size={config.batch_size} holds fewer "
                    f"rows than shard {config.shard_index}'s {self.indices.size} records of {config.database}")
        elif self.indices.size == 0:
            raise ReaderError(
                f"shard {config.shard_index} of {config.num_shards} of {config.database} is empty "
                f"({metadata.record_count} records); use fewer shards"
            )
        self.count = int(self.indices.size)
        self.batches_per_pass = config.batches_per_pass or math.ceil(self.count / config.batch_size)
        self._perms: dict[int, np.ndarray] = {}
        self._class_records = None
        if config.balance_classes and config.mode == "train":
            shard = set(self.indices.tolist())
            self._class_records = [
                np.array([i for i in metadata.class_records[c] if i in shard], np.int64)
                for c in sorted(metadata.class_records)
            ]
            self._class_records = [r for r in self._class_records if r.size]

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            perm = self.indices[np.random.default_rng([self.config.seed, epoch]).permutation(self.count)]
            self._perms[epoch] = perm
        return perm

    def rows(self, seq: int) -> list[tuple[int, list[int] | None]]:
        """[(record index, rng entropy or None)] for the rows of batch ``seq``; a padding row of a
        padded test pass has index -1."""
        cfg = self.config
        if cfg.mode == "test":
            b = seq % self.batches_per_pass
            chunk = [int(i) for i in self.indices[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            if self.padded:
                chunk += [-1] * (cfg.batch_size - len(chunk))
            return [(i, None) for i in chunk]
        out = []
        start = cfg.start_position + seq * cfg.batch_size
        for position in range(start, start + cfg.batch_size):
            epoch, offset = divmod(position, self.count)
            if self._class_records is None:
                index = int(self._permutation(epoch)[offset])
                entropy = [cfg.seed, epoch, index]
            else:
                pick = np.random.default_rng([cfg.seed, epoch, offset, 1])
                records_of_class = self._class_records[int(pick.integers(len(self._class_records)))]
                index = int(records_of_class[int(pick.integers(records_of_class.size))])
                entropy = [cfg.seed, epoch, index, offset]
            out.append((index, entropy))
        return out


# ----------------------------------------------------------------------------- shared memory


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class SharedSlots:
    """Preallocated batch slots in one shared-memory file; ``arrays[name][slot]`` is one batch.

    Created by the consumer, which owns (unlinks and unmaps) it; pickled to a spawned worker as its
    path and layout, and re-mapped there. Forked workers inherit the mapping itself.
    """

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], str]], num_slots: int,
                 path: str | None = None):
        self.layout = layout
        self.num_slots = num_slots
        offsets, size = {}, 0
        for name, (shape, dtype) in layout.items():
            offsets[name] = size
            nbytes = num_slots * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            size += (nbytes + 63) // 64 * 64
        self.size = max(size, 64)
        self.owner = path is None
        if self.owner:
            path = os.path.join(_shm_dir(), f"enki-reader-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, self.size)
                self._mmap = mmap.mmap(fd, self.size)
            except BaseException:
                os.unlink(path)
                raise
            finally:
                os.close(fd)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                self._mmap = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
        self.path = path
        self.unlinked = False
        self.offsets = offsets
        self._owner_types: dict[int, type] = {}  # owned_view
        # np.frombuffer keeps the mapping exported while any view of it lives (np.ndarray(buffer=...)
        # does not): close() then cannot unmap memory a caller still reads (a segfault), it leaves the
        # unmapping to the last view's release
        self.arrays = {
            name: np.frombuffer(self._mmap, dtype, int(np.prod((num_slots, *shape), dtype=np.int64)),
                                offsets[name]).reshape((num_slots, *shape))
            for name, (shape, dtype) in layout.items()
        }

    def owned_view(self, name: str, slot: int, rows: int) -> tuple[np.ndarray, object]:
        """``arrays[name][slot, :rows]`` as an array backed by a fresh owner object, and that owner.

        Every array derived from the result (views, and whatever keeps it, such as a TensorFlow tensor
        aliasing it) keeps the owner alive, so a weak reference to the owner tells when the rows are no
        longer used anywhere (plain views of ``arrays`` all share one base and cannot tell that).
        """
        shape, dtype = self.layout[name]
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * np.dtype(dtype).itemsize
        owner_type = self._owner_types.get(rows * row_bytes)
        if owner_type is None:  # a ctypes array type per size: making one costs more than the rest
            import ctypes

            owner_type = self._owner_types[rows * row_bytes] = ctypes.c_char * (rows * row_bytes)
        owner = owner_type.from_buffer(self._mmap, self.offsets[name] + slot * row_bytes * shape[0])
        return np.frombuffer(owner, dtype, rows * row_items).reshape((rows, *shape[1:])), owner

    def unlink(self) -> None:
        if self.owner and not self.unlinked:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.unlinked = True

    def close(self) -> None:
        self.unlink()
        self.arrays = {}
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the mapping goes when it does
            pass

    def __getstate__(self):
        return {"layout": self.layout, "num_slots": self.num_slots, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["layout"], state["num_slots"], state["path"])


def batch_layout(config: ReaderConfig, metadata: records.DatasetMetadata) -> dict:
    """Shapes (without the slot axis) and dtypes of every array of a batch."""
    h, w = config.crop_shape or (metadata.record_height, metadata.record_width)
    b, c = config.batch_size, metadata.channels
    # uint8 labels move a quarter of the bytes of int32; only a dataset with class ids >= 256 needs more
    max_class = max([*metadata.class_ids, (metadata.number_classes or 1) - 1])
    layout = {
        "image": ((b, h, w, c), "float32"),
        "semantic_mask": ((b, h, w), "uint8" if max_class < 256 else "int32"),
        "index": ((b,), "int64"),
    }
    if config.batches_per_pass > 0:
        layout["valid"] = ((b,), "uint8")
    if config.crop_shape is not None:
        layout["crop_origin"] = ((b, 2), "int32")  # (y, x) of each example's window in its record
    if config.max_instances > 0:
        m = config.max_instances
        layout.update({
            "instance_labels": ((b, h, w), "int32"),
            "boxes": ((b, m, 4), "float32"),
            "box_classes": ((b, m), "int32"),
            "num_instances": ((b,), "int32"),
        })
    return layout


# ----------------------------------------------------------------------------- the worker


class _Producer:
    """Fills batch slots in a worker process."""

    def __init__(self, config: ReaderConfig, plan: Plan, slots: SharedSlots, send_warning):
        self.config = config
        self.plan = plan
        self.arrays = slots.arrays
        self.db = records.Database(config.database)  # opened lazily, in this process
        self.send_warning = send_warning
        self.augment = config.augment if config.mode == "train" else None
        if self.augment is not None and self.augment.is_identity:
            self.augment = None
        self.normalization = config.normalization
        self._affines: dict[str, tuple] = {}  # source image -> its (offset, scale) (scope "image")

    def _affine(self, index: int):
        """Scope "image": the normalization statistics of the source image record ``index`` came from."""
        if not self.normalization.per_image:
            return None
        meta = self.db.metadata
        source = meta.sources[index].image
        affine = self._affines.get(source)
        if affine is None:
            if source not in meta.source_stats:
                raise ReaderError(f"{self.config.database}: no per-image statistics for source image {source} "
                                  "(built before they existed); rebuild it or use normalization scope tile")
            try:
                affine = self.normalization.affine_from_source_stats(meta.source_stats[source],
                                                                     self.config.database)
            except ValueError as exc:
                raise ReaderError(str(exc)) from None
            self._affines[source] = affine
        return affine

    def fill(self, slot: int, seq: int) -> tuple[int, int]:
        """Fill batch ``seq`` into ``slot``; returns (rows filled, corrupt records skipped).

        A corrupt record (with ``skip_corrupt``) stays within the shard and within exact-once: in train
        mode the next readable record of the shard takes its place; in test mode it is left out (the
        batch gets one row shorter, or the row becomes padding in a padded pass), so every other record
        of the shard is still yielded exactly once per pass."""
        rows = self.plan.rows(seq)
        filled = skipped = 0
        with self.db.transaction() as txn:
            for index, entropy in rows:
                if index < 0:
                    self._fill_padding(slot, filled)
                    filled += 1
                    continue
                example = self._read(txn, index)
                if example is None:
                    skipped += 1
                    if self.config.mode == "test":
                        if self.plan.padded:
                            self._fill_padding(slot, filled)
                            filled += 1
                        continue
                    index, example = self._replacement(txn, index)
                self._fill_row(slot, filled, index, example, entropy)
                if self.plan.padded:
                    self.arrays["valid"][slot, filled] = 1
                filled += 1
        return filled, skipped

    def _fill_padding(self, slot: int, j: int) -> None:
        """A padding row of a padded test pass: zeros everywhere, index -1, valid 0."""
        for name, array in self.arrays.items():
            array[slot, j] = 0
        self.arrays["index"][slot, j] = -1

    def _read(self, txn, index: int):
        """The record, or None when it is corrupt and ``skip_corrupt`` is set (warned)."""
        try:
            return self.db.view(txn, index)
        except records.RecordError as exc:
            if not self.config.skip_corrupt:
                raise ReaderError(f"{self.config.database}: {exc}; rebuild the database or set "
                                  "skip_corrupt") from None
            self.send_warning(f"{self.config.database}: {exc}; skipped")
            return None

    def _replacement(self, txn, index: int):
        """Train mode: the next readable record of this shard after ``index`` (cyclically)."""
        shard = self.plan.indices
        start = int(np.searchsorted(shard, index))
        for k in range(1, shard.size + 1):
            candidate = int(shard[(start + k) % shard.size])
            example = self._read(txn, candidate) if candidate != index else None
            if example is not None:
                return candidate, example
        raise ReaderError(f"{self.config.database}: every record of shard {self.config.shard_index} is corrupt")

    def _fill_row(self, slot: int, j: int, index: int, example: records.Example, entropy) -> None:
        arrays = self.arrays
        image_out = arrays["image"][slot, j]
        if self.config.crop_shape is not None:
            example, arrays["crop_origin"][slot, j] = self._crop(example, index, entropy)
        semantic = example.semantic_mask
        instance, instance_classes = example.instance_labels, example.instance_classes
        if self.augment is not None:
            rng = np.random.default_rng(entropy)
            params = augment.sample_params(rng, self.augment, semantic.shape)
            warped = augment.apply_image(example.image, params)
            self.normalization.apply(warped, out=image_out, affine=self._affine(index))
            semantic = augment.apply_labels(semantic, params)
            if instance is not None and (self.config.max_instances > 0 or self.config.instance_target):
                instance, instance_classes = augment.apply_instance_labels(instance, instance_classes, params)
        else:
            self.normalization.apply(example.image, out=image_out, affine=self._affine(index))
        if self.config.instance_target:
            if instance is None:
                raise ReaderError(f"{self.config.database}: record {index} has no instance labels, which "
                                  f"instance_target={self.config.instance_target!r} needs; rebuild with "
                                  "--instance_folder")
            semantic = instance_targets.boundary_classes(instance)  # after the warp: the rim follows it
        arrays["semantic_mask"][slot, j] = semantic
        arrays["index"][slot, j] = index
        if self.config.max_instances > 0:
            self._fill_instances(slot, j, instance, instance_classes, index)

    def _crop(self, example: records.Example, index: int, entropy) -> tuple[records.Example, tuple[int, int]]:
        """The example cut to ``crop_shape`` (zero padded where the record is smaller), and the window's
        origin in the record."""
        height, width = self.config.crop_shape
        rows, cols = example.semantic_mask.shape
        # its own stream: the augmentation draws from np.random.default_rng(entropy) unchanged
        rng = np.random.default_rng([*entropy, 2] if entropy is not None else [self.config.seed, index, 2])
        y = int(rng.integers(0, rows - height + 1)) if rows > height else 0
        x = int(rng.integers(0, cols - width + 1)) if cols > width else 0

        def cut(array):
            if array is None:
                return None
            window = array[y: y + height, x: x + width]
            if window.shape[:2] == (height, width):
                return window
            padded = np.zeros((height, width, *array.shape[2:]), array.dtype)
            padded[: window.shape[0], : window.shape[1]] = window
            return padded

        return records.Example(cut(example.image), cut(example.semantic_mask), cut(example.instance_labels),
                               example.instance_classes), (y, x)

    def _fill_instances(self, slot, j, instance, classes, index) -> None:
        arrays = self.arrays
        m = self.config.max_instances
        boxes_out = arrays["boxes"][slot, j]
        classes_out = arrays["box_classes"][slot, j]
        boxes_out[:] = 0
        classes_out[:] = 0
        if instance is None:
            arrays["instance_labels"][slot, j] = 0
            arrays["num_instances"][slot, j] = 0
            return
        boxes, box_classes, ids = augment.boxes_from_instances(instance, classes)
        if ids.size > m:
            self.send_warning(f"record {index} has {ids.size} objects, more than max_instances={m}; "
                              f"keeping the {m} largest")
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            keep = np.sort(np.argsort(-areas, kind="stable")[:m])
            boxes, box_classes, ids = boxes[keep], box_classes[keep], ids[keep]
        # renumber the kept objects 1..n so instance id k matches boxes[k - 1]
        lut = np.zeros(int(instance.max()) + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        arrays["instance_labels"][slot, j] = lut[instance]
        boxes_out[: ids.size] = boxes
        classes_out[: ids.size] = box_classes
        arrays["num_instances"][slot, j] = ids.size


def _worker_main(worker_id: int, config: ReaderConfig, slots: SharedSlots, conn, plan: Plan,
                 inherited=()) -> None:
    """Worker process entry point: fill own slots in turn, report each, stop on None or EOF."""
    # How a worker ends: a None from the consumer (close()), or EOF/EPIPE on its pipe. The pipe is what
    # makes a worker never outlive its consumer, whatever the start method: when the consumer dies (even
    # by SIGKILL) the kernel closes its end, and a worker is never more than slots_per_worker batches away
    # from blocking in conn.recv(), which then raises EOFError (a send raises BrokenPipeError). A parent-pid
    # check would not do: under forkserver a worker's parent is the forkserver, not the consumer. (The
    # forkserver itself exits when the consumer's alive pipe to it closes.)
    processes.ignore_trainer_signals()  # the consumer owns the workers' lifetime; SIGKILL still works
    for consumer_end in inherited:  # fork only: see ImageReader.start
        consumer_end.close()
    try:
        try:
            import cv2

            cv2.setNumThreads(1)  # one core per worker; cv2's own threads would oversubscribe
        except ImportError:
            pass
        producer = _Producer(config, plan, slots, lambda m: conn.send(("warning", m)))
        k = config.slots_per_worker
        free = deque(range(worker_id * k, (worker_id + 1) * k))
        conn.send(("ready",))
        seq = worker_id
        pending = _ready_check(conn)
        while True:
            while pending() or not free:
                message = conn.recv()
                if message is None:
                    return
                free.append(message)
            slot = free.popleft()
            started = time.perf_counter()
            count, skipped = producer.fill(slot, seq)
            conn.send(("batch", seq, slot, count, time.perf_counter() - started, skipped))
            seq += config.num_workers
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the consumer closed the pipe: shut down quietly
    except BaseException as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except Exception:
            pass
        sys.exit(1)


# ----------------------------------------------------------------------------- the consumer


def _ready_check(conn):
    """A no-wait "does ``conn`` hold a message?" that is cheaper than ``conn.poll()`` (which builds a
    selector per call)."""
    if not hasattr(select, "poll"):
        return conn.poll
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return lambda: bool(poller.poll(0))


def _tune_malloc() -> None:
    """Undo the page-fault storm of TensorFlow's generator-dataset malloc setting (glibc only).

    TF's generator dataset sets M_TRIM_THRESHOLD=128 KB, which also freezes glibc's mmap threshold
    at 128 KB: every batch-sized array is then a fresh mmap, page-faulted in and unmapped again,
    which made from_generator cost ~6 ms of CPU per 2.5 MB batch instead of ~1 ms (measured).
    Allocations below 32 MB come from the heap again; up to 128 MB of free heap may be retained.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass



def _shutdown(processes, conns, slots) -> None:
    """Stop workers (polite, then SIGKILL: workers ignore SIGTERM), close pipes, release shared memory."""
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 2.0
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    for conn in conns:
        conn.close()
    for proc in processes:
        try:
            proc.close()
        except ValueError:
            pass
    if slots is not None:
        slots.close()


class ImageReader:
    """Context manager and iterator over ready batches (see the module docstring)."""

    def __init__(self, config: ReaderConfig | None = None, **kwargs):
        if config is None:
            config = ReaderConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self.metadata = records.read_metadata(config.database)
        meta = self.metadata
        if config.crop_shape is not None:
            problem = records.check_size_multiple(*config.crop_shape, config.size_multiple,
                                                  f"{config.database}: crop_shape")
            if problem:
                raise ReaderError(problem)
        else:
            if meta.record_height is None:
                raise ReaderError(f"{config.database}: records differ in size; give a crop_shape (the trainers' "
                                  "--crop_size) or rebuild it with --use_tiling 1 so every record has one shape")
            problem = records.check_size_multiple(meta.record_height, meta.record_width, config.size_multiple,
                                                  config.database)
            if problem:
                raise ReaderError(f"{problem}; rebuild with a tile size that is")
        if config.instance_target and not meta.has_instances:
            raise ReaderError(f"{config.database} has no instance labels, which instance_target="
                              f"{config.instance_target!r} needs; rebuild it with --instance_folder (or --coco_json)")
        if config.normalization.per_image and not meta.source_stats:
            raise ReaderError(f"{config.database} has no per-image statistics, which normalization scope "
                              "'image' needs (built before they existed); rebuild it or use scope 'tile'")
        if config.max_instances > 0 and not meta.has_instances:
            logger.warning("%s has no instance labels; instance outputs will be empty", config.database)
        self.plan = Plan(config, meta)
        self.layout = batch_layout(config, meta)
        self.capacity = config.num_workers * config.slots_per_worker
        self._processes: list = []
        self._conns: list = []
        self._poller = None  # select.poll over every pipe and worker sentinel (where available)
        self._poll_fds: dict[int, tuple[bool, int]] = {}  # fd -> (is a pipe, worker)
        self._pending: list = []  # per worker: does its pipe hold a message (no wait)
        self._slots: SharedSlots | None = None
        self._finalizer = None
        self._ready: dict[int, tuple[int, int, int]] = {}  # seq -> (worker, slot, rows)
        self._held: tuple[int, int] | None = None  # (worker, slot) handed to the consumer
        self._next_seq = 0
        self._pass_remaining = 0
        self._started = False
        self._closed = False
        # statistics
        self._starving = False
        self._starvation_events = 0
        self._wait_seconds = 0.0
        self._batches = 0
        self._produced = 0
        self._busy_seconds = 0.0
        self._skipped: dict[int, int] = {}  # batch seq -> corrupt records skipped in it (skip_corrupt)
        #: corrupt records skipped in the batches handed out so far, and in the current test pass
        self.skipped_records = 0
        self.pass_skipped_records = 0
        self._start_time = None

    # -- life cycle

    def start(self) -> "ImageReader":
        if self._closed:
            raise ReaderError("this reader was closed; create a new one")
        if self._started:
            return self
        cfg = self.config
        # the forkserver imports this module (numpy, cv2, lmdb) once; each worker forks from it ready
        method = cfg.start_method or processes.default_start_method([__name__])
        ctx = multiprocessing.get_context(method)
        self._slots = SharedSlots(self.layout, self.capacity)
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns, self._slots)
        self._started = True
        try:
            if method == "fork":
                self._slots.unlink()  # children inherit the mapping; nothing left to find in /dev/shm
            for worker_id in range(cfg.num_workers):
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                # a forked child inherits the consumer's ends of its own and earlier workers' pipes: it must
                # close them, or its pipe would never report EOF when the consumer dies
                inherited = [*self._conns, parent_conn] if method == "fork" else []
                proc = ctx.Process(target=_worker_main, name=f"imagereader-{worker_id}", daemon=True,
                                   args=(worker_id, cfg, self._slots, child_conn, self.plan, inherited))
                with processes.main_module_hidden(method):
                    proc.start()
                child_conn.close()
                self._processes.append(proc)
                self._conns.append(parent_conn)
            for worker_id in range(cfg.num_workers):
                message = self._recv_from(worker_id, timeout=max(60.0, cfg.stall_timeout))
                if message[0] != "ready":
                    raise ReaderError(f"worker {worker_id} sent {message[0]!r} before 'ready'")
            self._slots.unlink()  # every worker has mapped it now
            self._pending = [_ready_check(conn) for conn in self._conns]
            if hasattr(select, "poll"):
                self._poller = select.poll()
                for worker, (conn, proc) in enumerate(zip(self._conns, self._processes)):
                    for fd, is_pipe in ((conn.fileno(), True), (proc.sentinel, False)):
                        self._poller.register(fd, select.POLLIN)
                        self._poll_fds[fd] = (is_pipe, worker)
        except BaseException:
            self.close()
            raise
        self._start_time = time.perf_counter()
        logger.debug("reader started: %d %s workers on %s", cfg.num_workers, method, cfg.database)
        return self

    def close(self) -> None:
        """Stop and join every worker and release the shared memory; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()
        if self._starvation_events:
            logger.info("%s", self.suggestion())

    def __enter__(self) -> "ImageReader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- iteration

    def __iter__(self):
        self.start()
        if self.config.mode == "test":
            self._pass_remaining = self.plan.batches_per_pass
            self.pass_skipped_records = 0
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.config.mode == "test":
            if self._pass_remaining <= 0:
                self._release_held()
                raise StopIteration
            self._pass_remaining -= 1
        return self.next_batch()

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next batch (views valid until the next call, unless ``copy``)."""
        if not self._started:
            self.start()
        if self._closed:
            raise ReaderError("this reader was closed")
        self._release_held()
        seq = self._next_seq
        if seq in self._ready:
            self._pump(timeout=0.0)  # drain what else is ready, for the depth reading
            depth = len(self._ready)  # counting the batch about to be handed out
        else:
            started = time.perf_counter()
            while seq not in self._ready:
                self._pump(timeout=1.0)
                if time.perf_counter() - started > self.config.stall_timeout:
                    self._raise_stalled(seq)
            self._wait_seconds += time.perf_counter() - started
            depth = 0  # the consumer found the queue empty
        self._watch_starvation(depth)
        worker, slot, count = self._ready.pop(seq)
        skipped = self._skipped.pop(seq, 0)
        self.skipped_records += skipped
        self.pass_skipped_records += skipped
        self._next_seq += 1
        self._batches += 1
        self._held = (worker, slot)
        batch = {name: array[slot, :count] for name, array in self._slots.arrays.items()}
        if self.config.copy:
            batch = {name: np.array(a) for name, a in batch.items()}
        return batch

    def _release_held(self) -> None:
        if self._held is not None:
            worker, slot = self._held
            self._held = None
            try:
                self._conns[worker].send(slot)
            except (OSError, ValueError):
                pass  # a dead worker is reported by _pump

    def _pump(self, timeout: float) -> None:
        """Receive every pending message; raise ReaderError for failed or dead workers."""
        if self._poller is not None:  # one poll(2) on fds registered once (no selector built per call)
            pipes, dead = set(), set()
            for fd, _ in self._poller.poll(1000.0 * timeout):
                is_pipe, worker = self._poll_fds[fd]
                (pipes if is_pipe else dead).add(worker)
            for worker in sorted(pipes):
                self._drain(worker)
            for worker in sorted(dead):  # a sentinel is readable once its process has ended
                self._drain(worker)  # an error message sent just before exiting comes first
                raise ReaderError(self._death_message(worker, self._processes[worker]))
            return
        waitables = list(self._conns) + [p.sentinel for p in self._processes]
        ready = connection.wait(waitables, timeout)
        for obj in ready:
            if obj in self._conns:
                worker = self._conns.index(obj)
                self._drain(worker)
        for worker, proc in enumerate(self._processes):
            if proc.sentinel in ready or not proc.is_alive():
                self._drain(worker)  # an error message sent just before exiting comes first
                raise ReaderError(self._death_message(worker, proc))

    def _drain(self, worker: int) -> None:
        conn = self._conns[worker]
        pending = self._pending[worker] if self._pending else conn.poll
        try:
            while pending():
                self._handle(worker, conn.recv())
        except (EOFError, OSError):
            pass

    def _recv_from(self, worker: int, timeout: float):
        conn, proc = self._conns[worker], self._processes[worker]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = connection.wait([conn, proc.sentinel], min(1.0, deadline - time.monotonic()))
            if conn in ready:
                try:
                    message = conn.recv()
                except EOFError:
                    raise ReaderError(self._death_message(worker, proc)) from None
                if message[0] in ("error", "warning"):
                    self._handle(worker, message)  # an error raises here
                    continue
                return message
            if proc.sentinel in ready:
                raise ReaderError(self._death_message(worker, proc))
        raise ReaderError(f"worker {worker} did not start within {timeout:.0f} s")

    def _handle(self, worker: int, message) -> None:
        kind = message[0]
        if kind == "batch":
            _, seq, slot, count, busy, skipped = message
            self._ready[seq] = (worker, slot, count)
            self._produced += 1
            self._busy_seconds += busy
            self._skipped[seq] = skipped
        elif kind == "warning":
            logger.warning("reader worker %d: %s", worker, message[1])
        elif kind == "error":
            _, summary, tb = message
            self.close()
            raise ReaderError(f"reader worker {worker} failed: {summary}\n--- worker traceback ---\n{tb}")

    def _death_message(self, worker: int, proc) -> str:
        proc.join(0.5)
        code, pid = proc.exitcode, proc.pid
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (the kernel's OOM killer sends SIGKILL when memory runs out)" if -code == 9 else ""
            reason = f"was killed by {name}{hint}"
        else:
            reason = f"exited unexpectedly with code {code}"
        self.close()
        return f"reader worker {worker} (pid {pid}) {reason}; the reader has been stopped"

    def _raise_stalled(self, seq: int) -> None:
        worker = seq % self.config.num_workers
        self.close()
        raise ReaderError(f"no batch from reader worker {worker} for {self.config.stall_timeout:.0f} s "
                          "although it is alive; is the database on a hung file system?")

    def _watch_starvation(self, depth: int) -> None:
        if self._batches < self.capacity:
            return  # warm-up: the queue starts empty by construction
        if not self._starving and depth < STARVATION_LOW * self.capacity:
            self._starving = True
            self._starvation_events += 1
            logger.warning(STARVATION_MESSAGE)
        elif self._starving and depth > STARVATION_HIGH * self.capacity:
            self._starving = False
            logger.warning(STARVATION_OVER_MESSAGE)

    # -- state and statistics

    @property
    def queue_depth(self) -> int:
        """Ready batches waiting for the consumer."""
        return len(self._ready)

    @property
    def position(self) -> int:
        """Train mode: stream position (examples) of the next batch; pass it as ``start_position``."""
        return self.config.start_position + self._next_seq * self.config.batch_size

    @property
    def epoch(self) -> int:
        return self.position // self.plan.count

    def stats(self) -> dict[str, float]:
        """Counters for the trainer's logs (wait time, rates, starvation)."""
        elapsed = max(time.perf_counter() - (self._start_time or time.perf_counter()), 1e-9)
        busy = self._busy_seconds / self._produced if self._produced else float("nan")
        active = max(elapsed - self._wait_seconds, 1e-9)
        return {
            "batches": self._batches,
            "queue_depth": self.queue_depth,
            "queue_capacity": self.capacity,
            "wait_seconds": self._wait_seconds,
            "wait_fraction": self._wait_seconds / elapsed,
            "consumer_batches_per_s": self._batches / elapsed,
            "demand_batches_per_s": self._batches / active,
            "producer_batches_per_s": self._produced / elapsed,
            "worker_seconds_per_batch": busy,
            "starvation_events": self._starvation_events,
            "skipped_records": self.skipped_records,
        }

    def suggestion(self) -> str:
        """A reader-count suggestion from the measured rates (meaningful after starvation)."""
        s = self.stats()
        if not self._starvation_events or not s["batches"] or math.isnan(s["worker_seconds_per_batch"]):
            return "no input starvation seen"
        needed = math.ceil(s["demand_batches_per_s"] * s["worker_seconds_per_batch"] * 1.1)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        advice = (f"try --reader_count {needed}" if needed > self.config.num_workers
                  else "more readers would not help; the starvation was transient")
        if needed > cpus:
            advice += f" (but only {cpus} CPUs are available: lighten the augmentation or add CPUs)"
        return (f"input starvation seen {s['starvation_events']} time(s), {s['wait_seconds']:.1f} s "
                f"waiting ({100 * s['wait_fraction']:.0f}% of the time); the consumer wants "
                f"{s['demand_batches_per_s']:.1f} batches/s and one reader makes "
                f"{1 / s['worker_seconds_per_batch']:.1f}/s: {advice}")

    # -- TensorFlow

    def output_signature(self):
        """``tf.TensorSpec`` per batch array; the batch axis is None (test passes end partial)."""
        import tensorflow as tf

        return {name: tf.TensorSpec((None, *shape[1:]), tf.as_dtype(dtype), name=name)
                for name, (shape, dtype) in self.layout.items()}

    def as_tf_dataset(self, prefetch: int = 1):
        """A ``tf.data.Dataset`` of batch dicts with a fixed signature.

        In test mode one iteration of the dataset is one pass; in train mode it is endless. Use it per
        input pipeline inside ``strategy.distribute_datasets_from_function``, with
        ``shard_index``/``num_shards`` from the input context.

        Batches cost no copy where that is safe (``_Lender``): TensorFlow aliases the shared slot's
        memory, and the slot goes back to its worker only once nothing refers to that memory any more;
        otherwise (a consumer keeping many batches) a batch is copied into 64-byte-aligned memory, which
        TensorFlow aliases instead of copying it a second time. Elements come from a ``numpy_function``
        over a counter (less per-element machinery than ``from_generator``).
        """
        import tensorflow as tf

        signature = self.output_signature()
        names = list(signature)
        lender = self._lender = _Lender(self, names)  # the latest one, for its statistics
        test = self.config.mode == "test"

        def next_arrays(position):
            if test and position == 0:
                iter(self)  # a new iteration of the dataset is a new pass
            return lender.next_arrays()

        def element(position):
            arrays = tf.numpy_function(next_arrays, [position], [signature[n].dtype for n in names],
                                       stateful=True)
            out = {}
            for name, array in zip(names, arrays):
                array.set_shape(signature[name].shape)
                out[name] = array
            return out

        positions = tf.data.Dataset.range(self.plan.batches_per_pass) if test else tf.data.Dataset.counter()
        dataset = positions.map(element)
        return dataset.prefetch(prefetch) if prefetch else dataset


def _aligned_copy(array: np.ndarray, align: int = 64) -> np.ndarray:
    """A copy of ``array`` starting on an ``align``-byte boundary (TensorFlow aliases such memory)."""
    raw = np.empty(array.nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    out = raw[start: start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


class _Lender:
    """Hands batches to TensorFlow without copying them, while that cannot stall the reader.

    A lent batch's slot stays out of its worker's hands until every array made from it is gone (a weak
    reference to the arrays' owner, ``SharedSlots.owned_view``, tells). A worker keeps at least one
    slot that is not lent, so it can always make its next batch even if the consumer keeps every
    tensor forever: when lending would take that last slot, the batch is copied and its slot released
    at once, as ``next_batch`` callers' slots are.
    """

    def __init__(self, reader: "ImageReader", names: list[str]):
        self.reader = reader
        self.names = names
        self.lent: list[tuple[int, int, list]] = []  # (worker, slot, weak references to the owners)
        self.lent_batches = 0  # statistics (tests)
        self.copied_batches = 0
        self._malloc_tuned = False

    def _collect(self) -> None:
        """Give back the slots of lent batches nothing refers to any more."""
        reader, keep = self.reader, []
        for worker, slot, owners in self.lent:
            if any(owner() is not None for owner in owners):
                keep.append((worker, slot, owners))
                continue
            try:
                reader._conns[worker].send(slot)
            except (OSError, ValueError, IndexError):
                pass  # a dead or closed reader reports itself in next_batch
        self.lent = keep

    def next_arrays(self) -> list[np.ndarray]:
        if not self._malloc_tuned:  # in the thread TensorFlow runs this in
            _tune_malloc()
            self._malloc_tuned = True
        reader = self.reader
        self._collect()
        batch = reader.next_batch()
        worker, slot = reader._held
        rows = len(batch["index"])
        lent_here = sum(1 for w, _, _ in self.lent if w == worker)
        if rows and reader._slots is not None and lent_here < reader.config.slots_per_worker - 1:
            reader._held = None  # ours now, until TensorFlow lets go of it
            arrays, owners = [], []
            for name in self.names:
                array, owner = reader._slots.owned_view(name, slot, rows)
                arrays.append(array)
                owners.append(weakref.ref(owner))
            self.lent.append((worker, slot, owners))
            self.lent_batches += 1
            return arrays
        arrays = [_aligned_copy(batch[name]) for name in self.names]
        reader._release_held()
        self.copied_batches += 1
        return arrays
