"""Owns the LMDB record format: encoding/decoding of one example and the database metadata entry.

Nothing else in the project parses LMDB keys or value bytes; everything goes through this module.

Record value layout (all integers little-endian), schema version 1::

    offset 0   magic  b"ENKR"                       4 bytes
    offset 4   schema version                      uint16
    offset 6   number of arrays (n)                uint16
    offset 8   n array descriptors, 40 bytes each:
               name      8 bytes ASCII, NUL padded ("image", "semantic", "instance", "classes")
               dtype     4 bytes ASCII numpy dtype string, NUL padded ("<u2", "|u1", ...)
               codec     uint8  (0 none, 1 zstd, 2 lz4, 3 png)
               ndim      uint8
               (pad)     2 bytes
               shape     3 x uint32 (unused dims are 0)
               offset    uint32  payload offset from the start of the value
               nbytes    uint32  payload size in bytes (compressed size when a codec is used)
               (pad)     4 bytes
    payloads, each starting on a 16-byte boundary.

Uncompressed arrays are decoded with ``np.frombuffer`` straight from the buffer LMDB hands out
(``buffers=True``), so decoding costs a header parse and no copy; the returned arrays are read-only
views that are valid only while the read transaction is open.

Keys are the record index as 8 ASCII digits (``b"00000042"``), so a cursor walks records in
index order. The metadata entry lives under ``METADATA_KEY`` as UTF-8 JSON (see ``DatasetMetadata``).
"""
from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"ENKR"
METADATA_KEY = b"__metadata__"

_HEADER = struct.Struct("<4sHH")
_DESCRIPTOR = struct.Struct("<8s4sBB2x3IIIxxxx")
_ALIGN = 16

#: Array names in a record, in the order they are written.
IMAGE = "image"
SEMANTIC = "semantic"
INSTANCE = "instance"
CLASSES = "classes"
_KNOWN_NAMES = (IMAGE, SEMANTIC, INSTANCE, CLASSES)

# decode-time lookups, so the per-record cost is a few struct unpacks and np.frombuffer calls
_NAMES = {n.encode().ljust(8, b"\0"): n for n in _KNOWN_NAMES}
_DTYPES = {np.dtype(t).str.encode().ljust(4, b"\0"): np.dtype(t)
           for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")}

CODECS = {"none": 0, "zstd": 1, "lz4": 2, "png": 3}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}

IMAGE_DTYPES = ("uint8", "uint16", "int32", "float32")
LABEL_DTYPES = ("uint8", "uint16", "int32")


class RecordError(ValueError):
    """A record or metadata entry cannot be decoded; the message names the key."""


def record_key(index: int) -> bytes:
    """LMDB key of record ``index`` (8 ASCII digits, so keys sort in index order)."""
    if not 0 <= index < 100_000_000:
        raise ValueError(f"record index {index} out of range [0, 1e8)")
    return b"%08d" % index


def key_index(key: bytes) -> int:
    """Inverse of ``record_key``."""
    return int(bytes(key))


@dataclass
class Example:
    """One decoded record.

    image: (H, W, C) in the stored dtype (uint8/uint16/int32/float32).
    semantic_mask: (H, W) integer class ids (uint8/uint16/int32), 0 = background.
    instance_labels: (H, W) uint16/int32, 0 = no object, object i has id i (1..N); or None.
    instance_classes: (N,) int32, class id of object i at position i-1; or None.
    """

    image: np.ndarray
    semantic_mask: np.ndarray
    instance_labels: np.ndarray | None = None
    instance_classes: np.ndarray | None = None


def smallest_label_dtype(max_value: int) -> np.dtype:
    """Smallest unsigned/int32 dtype that holds labels 0..max_value."""
    if max_value < 256:
        return np.dtype(np.uint8)
    if max_value < 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _encode_payload(array: np.ndarray, codec: str) -> bytes:
    data = np.ascontiguousarray(array)
    if codec == "none":
        return data.tobytes()
    import imagecodecs  # only needed when compressing

    if codec == "zstd":
        return imagecodecs.zstd_encode(data.tobytes(), level=3)
    if codec == "lz4":
        return imagecodecs.lz4_encode(data.tobytes())
    if codec == "png":
        return imagecodecs.png_encode(data, level=6)
    raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")


def _png_codec_usable(array: np.ndarray) -> bool:
    channels = 1 if array.ndim == 2 else array.shape[-1]
    return array.dtype in (np.uint8, np.uint16) and array.ndim in (2, 3) and channels in (1, 2, 3, 4)


def encode_example(example: Example, compression: str = "none") -> bytes:
    """Serialize one example to a record value.

    compression: "none", "zstd", "lz4", or "png" (lossless; applied to uint8/uint16 arrays with at
    most 4 channels, other arrays fall back to zstd).
    """
    if compression not in CODECS:
        raise ValueError(f"unknown compression {compression!r}; choose one of {sorted(CODECS)}")
    image = example.image
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    if str(image.dtype) not in IMAGE_DTYPES:
        raise ValueError(f"image dtype {image.dtype} not one of {IMAGE_DTYPES}")
    arrays: list[tuple[str, np.ndarray]] = [(IMAGE, image)]
    mask = example.semantic_mask
    if mask.shape != image.shape[:2]:
        raise ValueError(f"semantic mask shape {mask.shape} != image shape {image.shape[:2]}")
    if str(mask.dtype) not in LABEL_DTYPES:
        raise ValueError(f"semantic mask dtype {mask.dtype} not one of {LABEL_DTYPES}")
    arrays.append((SEMANTIC, mask))
    if example.instance_labels is not None:
        inst = example.instance_labels
        if inst.shape != image.shape[:2]:
            raise ValueError(f"instance labels shape {inst.shape} != image shape {image.shape[:2]}")
        if str(inst.dtype) not in LABEL_DTYPES:
            raise ValueError(f"instance labels dtype {inst.dtype} not one of {LABEL_DTYPES}")
        classes = np.asarray(
            example.instance_classes if example.instance_classes is not None else [], np.int32
        )
        arrays.append((INSTANCE, inst))
        arrays.append((CLASSES, classes.reshape(-1)))

    payloads = []
    for name, array in arrays:
        codec = compression
        if codec == "png" and not _png_codec_usable(array):
            codec = "zstd"
        if name == CLASSES:
            codec = "none"  # a few bytes; never worth a codec call
        payloads.append((name, array, codec, _encode_payload(array, codec)))

    header_size = _HEADER.size + _DESCRIPTOR.size * len(payloads)
    offset = _round_up(header_size)
    parts = [_HEADER.pack(MAGIC, SCHEMA_VERSION, len(payloads))]
    body = []
    for name, array, codec, payload in payloads:
        shape = list(array.shape) + [0] * (3 - array.ndim)
        parts.append(
            _DESCRIPTOR.pack(
                name.encode(), array.dtype.str.encode(), CODECS[codec], array.ndim, *shape,
                offset, len(payload),
            )
        )
        padded_end = _round_up(offset + len(payload))
        body.append(payload + b"\0" * (padded_end - offset - len(payload)))
        offset = padded_end
    head = b"".join(parts)
    head += b"\0" * (_round_up(len(head)) - len(head))
    return head + b"".join(body)


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def decode_arrays(value, key: bytes | str = b"?") -> dict[str, np.ndarray]:
    """Decode a record value into {name: array}.

    value: bytes or a buffer (memoryview from ``txn.get(key)`` with ``buffers=True``). Uncompressed
    arrays are zero-copy read-only views into ``value``. Raises RecordError naming ``key``.
    """
    buf = memoryview(value)
    try:
        magic, version, count = _HEADER.unpack_from(buf, 0)
    except struct.error:
        raise RecordError(f"record {_key_str(key)}: value of {len(buf)} bytes is too short") from None
    if magic != MAGIC:
        raise RecordError(f"record {_key_str(key)}: not an Enki record (bad magic {bytes(magic)!r})")
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"record {_key_str(key)}: schema version {version}, this code reads {SCHEMA_VERSION}; "
            "rebuild the database with this version's build_lmdb.py"
        )
    out = {}
    pos = _HEADER.size
    for _ in range(count):
        try:
            raw_name, raw_dtype, codec, ndim, s0, s1, s2, offset, nbytes = _DESCRIPTOR.unpack_from(
                buf, pos
            )
        except struct.error:
            raise RecordError(f"record {_key_str(key)}: truncated header") from None
        pos += _DESCRIPTOR.size
        name = _NAMES.get(raw_name) or raw_name.rstrip(b"\0").decode("ascii", "replace")
        dtype = _DTYPES.get(raw_dtype)
        if dtype is None:
            raise RecordError(f"record {_key_str(key)}: bad dtype {raw_dtype!r} in array {name!r}")
        shape = (s0, s1, s2)[:ndim]
        if offset + nbytes > len(buf):
            raise RecordError(
                f"record {_key_str(key)}: array {name!r} runs past the end of the value (truncated)"
            )
        expected = dtype.itemsize
        for n in shape:
            expected *= n
        payload = buf[offset : offset + nbytes]
        if codec == 0:
            if nbytes != expected:
                raise RecordError(
                    f"record {_key_str(key)}: array {name!r} has {nbytes} bytes, shape {shape} "
                    f"{dtype} needs {expected}"
                )
            array = np.frombuffer(payload, dtype=dtype).reshape(shape)
        else:
            array = _decompress(payload, codec, dtype, shape, expected, key, name)
        out[name] = array
    if IMAGE not in out or SEMANTIC not in out:
        raise RecordError(f"record {_key_str(key)}: missing image or semantic mask")
    return out


def _decompress(payload, codec, dtype, shape, expected, key, name) -> np.ndarray:
    import imagecodecs

    codec_name = _CODEC_NAMES.get(codec)
    try:
        if codec_name == "zstd":
            raw = imagecodecs.zstd_decode(payload)
        elif codec_name == "lz4":
            raw = imagecodecs.lz4_decode(payload)
        elif codec_name == "png":
            return np.asarray(imagecodecs.png_decode(payload), dtype=dtype).reshape(shape)
        else:
            raise RecordError(f"record {_key_str(key)}: unknown codec id {codec} in array {name!r}")
    except RecordError:
        raise
    except Exception as exc:  # imagecodecs raises its own error types per codec
        raise RecordError(f"record {_key_str(key)}: array {name!r} fails to decompress: {exc}") from None
    if len(raw) != expected:
        raise RecordError(
            f"record {_key_str(key)}: array {name!r} decompressed to {len(raw)} bytes, expected {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_example(value, key: bytes | str = b"?") -> Example:
    """Decode a record value into an ``Example`` (see ``decode_arrays`` for zero-copy rules)."""
    arrays = decode_arrays(value, key)
    return Example(
        image=arrays[IMAGE],
        semantic_mask=arrays[SEMANTIC],
        instance_labels=arrays.get(INSTANCE),
        instance_classes=arrays.get(CLASSES),
    )


def _key_str(key) -> str:
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key).decode("ascii", "replace")
    return str(key)


@dataclass
class RecordSource:
    """Where a record came from: source files and the tile's position in the source image."""

    image: str
    mask: str | None
    y: int
    x: int
    height: int
    width: int
    instance: str | None = None


@dataclass
class DatasetMetadata:
    """The one metadata entry of a database (stored as JSON under ``METADATA_KEY``).

    class_records maps a class id (as written in the mask) to the sorted record indices whose
    semantic mask contains it: the index for class-balanced sampling. channel_stats holds, per
    channel, the mean, std, min and max over every pixel of every record. build_id names the
    ``build_lmdb.py`` run that wrote the database; its train and test databases and manifest share
    it (None in databases built before build ids existed: unknown, not an error).
    """

    record_count: int
    image_dtype: str
    channels: int
    tile_size: int | None
    record_height: int | None  # None when records differ in size (untiled sources of several sizes)
    record_width: int | None
    mask_dtype: str
    has_instances: bool
    class_ids: list[int]
    class_records: dict[int, list[int]]
    class_pixel_counts: dict[int, int]
    channel_stats: dict[str, list[float]]
    split: str
    split_seed: int
    compression: str
    build_args: dict[str, Any]
    sources: list[RecordSource]
    number_classes: int | None = None
    class_names: dict[int, str] = field(default_factory=dict)
    build_id: str | None = None
    #: per source image name: its statistics for normalization scope "image"
    #: (``normalization.source_image_stats``); empty in databases built before they existed
    source_stats: dict[str, dict] = field(default_factory=dict)
    #: object sizes over whole source images (``object_sizes.summarize``: count, percentiles and max of
    #: area and box side; ``per_record``: the most objects of a record, absolute and per megapixel, absent in
    #: databases built before it); empty without instance labels and in databases built before it existed
    object_stats: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data) -> "DatasetMetadata":
        try:
            raw = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(f"metadata entry is not valid JSON: {exc}") from None
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RecordError(
                f"database schema version {version}, this code reads {SCHEMA_VERSION}; "
                "rebuild it with this version's build_lmdb.py"
            )
        raw["class_records"] = {int(k): v for k, v in raw["class_records"].items()}
        raw["class_pixel_counts"] = {int(k): v for k, v in raw["class_pixel_counts"].items()}
        raw["class_names"] = {int(k): v for k, v in raw.get("class_names", {}).items()}
        raw["sources"] = [RecordSource(**s) for s in raw["sources"]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def read_metadata(path: str) -> DatasetMetadata:
    """Open the database at ``path`` read-only, read its metadata entry and close it again."""
    import os

    import lmdb

    if not os.path.isdir(path):
        raise FileNotFoundError(f"database {path} does not exist (build it with build_lmdb.py)")
    env = open_environment(path)
    try:
        with env.begin() as txn:
            data = txn.get(METADATA_KEY)
    except lmdb.Error as exc:
        raise RecordError(_corrupt_message(path, exc)) from None
    finally:
        env.close()
    if data is None:
        raise RecordError(f"database {path} has no metadata entry; it was not built by build_lmdb.py "
                          "or its build did not finish")
    return DatasetMetadata.from_json(data)


def open_environment(path: str, **options):
    """The read-only LMDB environment of the database at ``path``, checked before any page is read.

    Raises RecordError with the fix for a folder or data.mdb this process may not read, a file that
    is not LMDB, and a data.mdb shorter than its own index says (an interrupted copy or a full disk):
    reading such a file through LMDB's memory map would kill the process with SIGBUS, no message.
    """
    import os

    import lmdb

    data_file = os.path.join(path, "data.mdb")
    for item in (path, data_file):
        if os.path.exists(item) and not os.access(item, os.R_OK | (os.X_OK if item == path else 0)):
            raise RecordError(f"database {path}: no read permission on {item}; fix its permissions "
                              f"(chmod -R u+rX {path}) or copy it somewhere this user can read")
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True, **options)
    except lmdb.Error as exc:
        if "Permission denied" in str(exc):
            raise RecordError(f"database {path}: no read permission ({exc}); fix its permissions "
                              f"(chmod -R u+rX {path})") from None
        raise RecordError(f"database {path} cannot be opened ({exc}); it is damaged or not an LMDB "
                          "database: copy it again or rebuild it with build_lmdb.py") from None
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = os.path.getsize(data_file)
    except (lmdb.Error, OSError) as exc:
        env.close()
        raise RecordError(_corrupt_message(path, exc)) from None
    if size < needed:
        env.close()
        raise RecordError(f"database {path} is truncated: data.mdb is {size} bytes but its index needs "
                          f"{needed} (an interrupted copy or a full disk); copy it again or rebuild it "
                          "with build_lmdb.py")
    return env


def _corrupt_message(path: str, exc: Exception) -> str:
    return (f"database {path} is corrupt ({exc}); copy it again or rebuild it with build_lmdb.py")


def crop_shape(meta: DatasetMetadata, crop_size: int = 0, size_multiple: int = 1) -> tuple[int, int] | None:
    """The (height, width) a reader crops ``meta``'s records to, or None when it uses them whole.

    ``crop_size`` > 0: square crops of that side (a multiple of ``size_multiple``); records smaller on a
    side are zero padded (image 0, labels background). 0: None when every record has one size, else
    (an untiled database of images of several sizes) the smallest record height and width, rounded
    down to ``size_multiple``, so that no record needs padding. ValueError when no crop fits.
    """
    if crop_size > 0:
        if crop_size % size_multiple:
            raise ValueError(f"crop size {crop_size} is not a multiple of the model's size multiple {size_multiple}")
        return crop_size, crop_size
    if meta.record_height is not None and meta.record_width is not None:
        return None
    height = min(s.height for s in meta.sources)
    width = min(s.width for s in meta.sources)
    height, width = height - height % size_multiple, width - width % size_multiple
    if height < size_multiple or width < size_multiple:
        raise ValueError(f"its smallest records are {min(s.height for s in meta.sources)}x"
                         f"{min(s.width for s in meta.sources)}, smaller than the model's size multiple "
                         f"{size_multiple}; give a crop size (records smaller than it are zero padded)")
    return height, width


def check_size_multiple(height: int | None, width: int | None, multiple: int, what: str) -> str | None:
    """None when records of ``height`` x ``width`` suit a model whose input sides must be multiples of
    ``multiple``; else the problem, naming ``what`` (the database), for the caller to add the fix to.
    height/width None: the records differ in size (DatasetMetadata.record_height)."""
    if height is None or width is None:
        return f"{what}: records differ in size, so they are not all a multiple of the model's size multiple {multiple}"
    if height % multiple or width % multiple:
        return f"{what}: records are {height}x{width}, not a multiple of the model's size multiple {multiple}"
    return None


class ChannelStats:
    """Exact per-channel mean/std/min/max accumulated over many arrays (Chan et al. merge)."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    def add_partial(self, count: int, mean: np.ndarray, m2: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count = total
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)

    @staticmethod
    def partial(image: np.ndarray):
        """(count, mean, m2, min, max) of an (H, W, C) array, per channel."""
        flat = image.reshape(-1, image.shape[-1])
        mean = flat.mean(axis=0, dtype=np.float64)
        m2 = np.array([np.square(flat[:, c] - mean[c], dtype=np.float64).sum()
                       for c in range(flat.shape[1])])
        return flat.shape[0], mean, m2, flat.min(axis=0).astype(np.float64), flat.max(axis=0).astype(np.float64)

    def add(self, image: np.ndarray):
        self.add_partial(*self.partial(image))

    def as_dict(self) -> dict[str, list[float]]:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return {
            "mean": self.mean.tolist(),
            "std": std.tolist(),
            "min": self.min.tolist() if self.count else [],
            "max": self.max.tolist() if self.count else [],
        }


class Database:
    """Read-only access to a built database, opened lazily in the process that uses it.

    The LMDB environment is opened on first use and re-opened if the object finds itself in a
    different process (after fork), so no environment is ever shared across processes.
    ``read(i)`` returns copies; use ``view(i)`` inside ``with db.transaction():`` for zero-copy.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.metadata = read_metadata(self.path)
        self._env = None
        self._pid = None

    def __len__(self) -> int:
        return self.metadata.record_count

    def _environment(self):
        import os

        if self._env is None or self._pid != os.getpid():
            self._env = open_environment(self.path, max_readers=2048)
            self._pid = os.getpid()
        return self._env

    def transaction(self):
        """A read transaction (context manager); values it returns are buffers valid inside it."""
        return self._environment().begin(buffers=True)

    def view(self, txn, index: int) -> Example:
        """Zero-copy decode of record ``index`` within ``txn``."""
        import lmdb

        key = record_key(index)
        try:
            value = txn.get(key)
        except lmdb.Error as exc:  # a damaged page (MDB_CORRUPTED...): this record cannot be found
            raise RecordError(f"record {key.decode()}: {_corrupt_message(self.path, exc)}") from None
        if value is None:
            raise RecordError(f"record {key.decode()} missing from {self.path}")
        return decode_example(value, key)

    def read(self, index: int) -> Example:
        """Decode record ``index`` into arrays this process owns."""
        with self.transaction() as txn:
            ex = self.view(txn, index)
            return Example(
                np.array(ex.image), np.array(ex.semantic_mask),
                None if ex.instance_labels is None else np.array(ex.instance_labels),
                None if ex.instance_classes is None else np.array(ex.instance_classes),
            )

    def close(self) -> None:
        import os

        if self._env is not None and self._pid == os.getpid():
            self._env.close()
        self._env = None
        self._pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_env=None, _pid=None)  # never pickle an open environment
        return state
