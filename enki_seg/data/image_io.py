"""Reads source images, semantic masks and instance-label images from disk and validates them.

Every problem is raised as ``InputError`` with one line that names the file and says what to do.
Images come back as (H, W, C) arrays of uint8/uint16/int32/float32; masks and instance labels as
(H, W) integer arrays in the smallest dtype that holds their values.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from enki_seg.data import records

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_EQUIVALENT_EXTENSIONS = {".tif": (".tif", ".tiff"), ".tiff": (".tif", ".tiff"),
                          ".jpg": (".jpg", ".jpeg"), ".jpeg": (".jpg", ".jpeg"), ".png": (".png",),
                          ".zarr": (".zarr",)}  # OME-Zarr: folders


class InputError(ValueError):
    """Bad input data; the message names the file and the fix."""


def extensions_for(image_format: str) -> tuple[str, ...]:
    """File extensions accepted for ``--image_format`` (``tif`` also matches ``.tiff``)."""
    ext = "." + image_format.lower().lstrip(".")
    if ext not in _EQUIVALENT_EXTENSIONS:
        raise InputError(
            f"--image_format {image_format!r} is not supported; use one of tif, tiff, png, jpg, zarr"
        )
    return _EQUIVALENT_EXTENSIONS[ext]


def list_images(folder: str | os.PathLike, image_format: str) -> list[Path]:
    """Sorted files of ``image_format`` in ``folder`` (not recursive, hidden files ignored; OME-Zarr: folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist or is not a folder; check --image_folder")
    exts = extensions_for(image_format)
    files = sorted(
        p for p in folder.iterdir()
        if _is_image_entry(p) and not p.name.startswith(".") and p.suffix.lower() in exts
    )
    if not files:
        present = sorted({p.suffix.lower() for p in folder.iterdir() if p.is_file()})
        raise InputError(
            f"no .{image_format} files in {folder} (found extensions: {', '.join(present) or 'none'}); "
            "check --image_folder and --image_format"
        )
    return files


def index_by_stem(folder: str | os.PathLike, what: str) -> dict[str, Path]:
    """Map file stem -> path for the label files in ``folder``; two files with one stem is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist or is not a folder")
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if (not _is_image_entry(p) or p.name.startswith(".")
                or p.suffix.lower() not in IMAGE_EXTENSIONS + ZARR_EXTENSIONS):
            continue
        if p.stem in by_stem:
            raise InputError(
                f"{what} folder has two files for {p.stem!r}: {by_stem[p.stem].name} and {p.name}; "
                "keep one"
            )
        by_stem[p.stem] = p
    return by_stem


def _is_image_entry(path: Path) -> bool:
    """A file, or an OME-Zarr folder (``*.zarr``)."""
    return path.is_file() or (path.suffix.lower() in ZARR_EXTENSIONS and path.is_dir())


def _read_raw(path: Path) -> tuple[np.ndarray, str | None]:
    """Decode a file; returns the array and, for TIFF, the axes string of its first series."""
    suffix = path.suffix.lower()
    if path.is_dir():
        array, axes = _ome_zarr_array(path)
        return np.asarray(array[...]), axes
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return series.asarray(), series.axes
        import imagecodecs

        return imagecodecs.imread(str(path)), None
    except InputError:
        raise
    except Exception as exc:  # every decoder raises its own types for truncated/corrupt files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read {path}: {detail}; the file is truncated, corrupt or not an image — "
            "re-export it or remove it"
        ) from None


def _to_hwc(array: np.ndarray, axes: str | None, path: Path) -> np.ndarray:
    if array.size == 0:
        raise InputError(f"{path} is empty (shape {array.shape}); remove it or re-export it")
    squeezed_axes = axes
    if axes is not None and len(axes) == array.ndim and array.ndim > 3:
        # drop length-1 axes (e.g. a single time point) before judging dimensionality
        keep = [i for i, n in enumerate(array.shape) if n != 1 or axes[i] in "YX"]
        squeezed_axes = "".join(axes[i] for i in keep)
        array = array.reshape([array.shape[i] for i in keep])
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        if squeezed_axes is not None and len(squeezed_axes) == 3 and squeezed_axes.endswith("YX"):
            return np.moveaxis(array, 0, -1)  # planar (C, Y, X) TIFF
        return array
    raise InputError(
        f"{path} has {array.ndim} dimensions (shape {array.shape}, axes {axes or '?'}); only 2-D images "
        "with optional channels are supported — save one plane (or one time point) per file"
    )


_IMAGE_CASTS = {
    np.dtype(np.uint8): None, np.dtype(np.uint16): None, np.dtype(np.int32): None,
    np.dtype(np.float32): None, np.dtype(np.int8): np.int32, np.dtype(np.int16): np.int32,
    np.dtype(np.float16): np.float32, np.dtype(np.float64): np.float32, np.dtype(bool): np.uint8,
}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, C) uint8/uint16/int32/float32; raises InputError on bad input."""
    path = Path(path)
    array, axes = _read_raw(path)
    array = _to_hwc(array, axes, path)
    dtype = array.dtype
    if dtype not in _IMAGE_CASTS:
        if dtype == np.uint32 and array.max() < 2**31:
            array = array.astype(np.int32)
        else:
            raise InputError(
                f"{path} has pixel type {dtype}; supported are uint8, uint16, int32, float32 — convert it"
            )
    elif _IMAGE_CASTS[dtype] is not None:
        array = array.astype(_IMAGE_CASTS[dtype])
    if array.dtype == np.float32 and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{path} has {bad} NaN/inf pixels; replace them (e.g. with 0) before building")
    return np.ascontiguousarray(array)


def read_labels(path: str | os.PathLike, what: str = "mask") -> np.ndarray:
    """Read a label image (semantic mask or instance labels) as (H, W) integers >= 0.

    Returns the smallest of uint8/uint16/int32 that holds the values. A 3-channel file whose
    channels are identical (an RGB-saved grey mask) is accepted.
    """
    path = Path(path)
    array, axes = _read_raw(path)
    array = _check_labels(_to_hwc(array, axes, path), path, what)
    max_value = int(array.max())
    if max_value >= 2**31:
        raise InputError(f"{what} {path} has label {max_value}, beyond int32; relabel it")
    return np.ascontiguousarray(array.astype(records.smallest_label_dtype(max_value), copy=False))


def _check_labels(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """(H, W) labels of an (H, W, C) label image (or a region of one); InputError when they are not labels."""
    if array.shape[2] > 1:
        if all(np.array_equal(array[:, :, 0], array[:, :, c]) for c in range(1, array.shape[2])):
            array = array[:, :, :1]
        else:
            raise InputError(
                f"{what} {path} has {array.shape[2]} different channels; a {what} must be one channel "
                "of integer class ids — save it as a single-channel image"
            )
    array = array[:, :, 0]
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise InputError(
                f"{what} {path} has non-integer values; a {what} holds integer class ids — "
                "save it with an integer pixel type"
            )
    elif array.dtype.kind not in "ui" and array.dtype != bool:
        raise InputError(f"{what} {path} has pixel type {array.dtype}; use uint8, uint16 or int32")
    if array.dtype.kind in "if" and array.min() < 0:
        raise InputError(
            f"{what} {path} has negative values (min {array.min()}); labels must be 0 (background) or "
            "positive class ids"
        )
    return array


# ----------------------------------------------------------------------------- images read by region

#: Chunked (tiled or striped) TIFFs and OME-Zarr images of at least this many pixels are read region by
#: region; smaller ones, like every PNG/JPEG and single-strip TIFF, are read whole (one decode is faster,
#: and 2**24 px = a 4096 x 4096 plane fits in memory anyway). Tests lower it to exercise the region path.
REGION_READ_MIN_PIXELS = 1 << 24
#: Pixels per band when a region-read image is read band by band in full (a label's first pass, previews).
BAND_PIXELS = 1 << 22
#: Whole reads of images above this many pixels are logged: they may not fit in memory.
LARGE_IMAGE_PIXELS = 1 << 26
ZARR_EXTENSIONS = (".zarr",)


class ImageSource:
    """An (H, W, C) image that is read by region: ``shape``, ``dtype``, ``read_region``.

    Backed by a whole array (:class:`ArraySource`, ``tile_wise`` False) or by a chunked file read on
    demand (:class:`RegionSource`, ``tile_wise`` True). A context manager; ``close`` releases the file.
    Regions are in-bounds; :meth:`read_window` reflects beyond the border as ``tiling.read_window``.
    """

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    tile_wise = False
    ndim = 3

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """The (height, width, C) pixels at (y, x); the region must lie inside the image."""
        raise NotImplementedError

    def read(self) -> np.ndarray:
        """The whole (H, W, C) image."""
        return self.read_region(0, 0, self.shape[0], self.shape[1])

    def row_bands(self, rows: int | None = None):
        """Yield (y0, (h, W, C) band) of disjoint bands of ``rows`` rows (default: BAND_PIXELS pixels)
        covering the image top to bottom."""
        rows = rows or max(1, BAND_PIXELS // max(1, self.shape[1]))
        for y0 in range(0, self.shape[0], rows):
            yield y0, self.read_region(y0, 0, min(rows, self.shape[0] - y0), self.shape[1])

    def subsample(self, step: int) -> np.ndarray:
        """``image[::step, ::step]`` (a preview), read band by band."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(ImageSource):
    """An image read whole (PNG, JPEG, single-strip or small TIFF): regions are views of the array."""

    def __init__(self, array: np.ndarray, path: Path | None = None):
        self.array, self.path = array, path
        self.shape, self.dtype = array.shape, array.dtype

    def read_region(self, y, x, height, width):
        return self.array[y : y + height, x : x + width]

    def read(self):
        return self.array

    def subsample(self, step):
        return self.array[::step, ::step]


class RegionSource(ImageSource):
    """A chunked TIFF/OME-TIFF (tifffile's zarr store, level 0) or OME-Zarr image read by region.

    ``array``: a zarr array; ``axes``: one letter per array axis, with ``Y`` and ``X``, at most one other
    axis longer than 1 (the channels). Pixel types are converted as :func:`read_image` converts them, and
    each region is checked as it is read (NaN/inf, uint32 beyond int32).
    """

    tile_wise = True

    def __init__(self, array, axes: str, path: Path, closer=None):
        self.array, self.path, self._closer = array, path, closer
        self._channel_axis = next((i for i, a in enumerate(axes) if a not in "YX" and array.shape[i] > 1), None)
        self._y, self._x = axes.index("Y"), axes.index("X")
        channels = 1 if self._channel_axis is None else array.shape[self._channel_axis]
        self.shape = (int(array.shape[self._y]), int(array.shape[self._x]), int(channels))
        raw = np.dtype(array.dtype)
        if raw in _IMAGE_CASTS:
            self.dtype = np.dtype(_IMAGE_CASTS[raw] or raw)
        elif raw == np.uint32:
            self.dtype = np.dtype(np.int32)
        else:
            raise InputError(f"{path} has pixel type {raw}; supported are uint8, uint16, int32, float32 — convert it")
        self._raw_dtype = raw
        self._band = None  # (y, height, band) of the last read_window row band
        self._rows_cache = None  # (first row, full-width rows) of whole chunk rows, for read_window
        chunks = getattr(array, "chunks", None)
        self._chunk_rows = int(chunks[self._y]) if chunks else 1
        self.regions_read: list[tuple[int, int, int, int]] = []  # (y, x, h, w) of every read (tests, logs)

    def _index(self, rows: slice, cols: slice):
        index = [0] * self.array.ndim
        index[self._y], index[self._x] = rows, cols
        if self._channel_axis is not None:
            index[self._channel_axis] = slice(None)
        return tuple(index)

    def _to_hwc(self, block: np.ndarray) -> np.ndarray:
        kept = sorted(i for i in (self._y, self._x, self._channel_axis) if i is not None)
        order = [kept.index(self._y), kept.index(self._x)]
        if self._channel_axis is not None:
            order.append(kept.index(self._channel_axis))
        block = np.transpose(block, order)
        return block[:, :, None] if block.ndim == 2 else block

    def read_region(self, y, x, height, width):
        rows, cols, channels = self.shape
        if not (0 <= y and 0 <= x and height >= 0 and width >= 0 and y + height <= rows and x + width <= cols):
            raise ValueError(f"region {height}x{width} at ({y}, {x}) is outside the {rows}x{cols} image {self.path}")
        self.regions_read.append((y, x, height, width))
        try:
            block = np.asarray(self.array[self._index(slice(y, y + height), slice(x, x + width))])
        except Exception as exc:  # codecs raise their own types for corrupt chunks
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"cannot read rows {y}..{y + height} of {self.path}: {detail}; the file is "
                             "truncated or corrupt — re-export it or remove it") from None
        block = self._to_hwc(block)
        if self._raw_dtype == np.uint32 and block.size and block.max() >= 2**31:
            raise InputError(f"{self.path} has pixel type uint32 with values beyond int32; convert it")
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if self.dtype == np.float32 and not np.isfinite(block).all():
            bad = int((~np.isfinite(block)).sum())
            raise InputError(f"{self.path} has {bad} NaN/inf pixels in rows {y}..{y + height}; replace them "
                             "(e.g. with 0) before building")
        return block

    def read_window(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """The (height, width, C) window at (y, x), reflected beyond the border as ``np.pad`` "reflect".

        Windows of one row of tiles share a band: the in-bounds rows of the first are read at full width
        and kept, so a chunk (a strip spans the whole width) is decoded once per row of tiles, not per
        tile. Rows are read in whole chunk rows and the last ones kept (:meth:`_rows`), so overlapping
        rows of tiles (a model's stride is less than its tile) decode each chunk once. Memory: one band
        of ``height`` x W pixels and up to two chunk rows.
        """
        from enki_seg.data.tiling import reflect_index

        rows, cols = self.shape[:2]
        if self._band is None or self._band[:2] != (y, height):
            ys = reflect_index(np.arange(y, y + height), rows)
            lo, hi = int(ys.min()), int(ys.max()) + 1
            band = self._rows(lo, hi)
            self._band = (y, height, band if (lo == y and hi - lo == height) else band[ys - lo])
        band = self._band[2]
        if x >= 0 and x + width <= cols:
            return band[:, x : x + width]
        return band[:, reflect_index(np.arange(x, x + width), cols)]

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Full-width rows [lo, hi), read as whole chunk rows; those already read for the previous call are reused."""
        chunk, total = self._chunk_rows, self.shape[0]
        start, stop = lo // chunk * chunk, min(total, -(-hi // chunk) * chunk)
        cached = self._rows_cache
        if cached is not None and cached[0] <= start < cached[0] + len(cached[1]):
            kept = cached[1][start - cached[0] : stop - cached[0]]
            rest = start + len(kept)
            block = kept if rest >= stop else np.concatenate([kept, self.read_region(rest, 0, stop - rest,
                                                                                      self.shape[1])])
        else:
            block = self.read_region(start, 0, stop - start, self.shape[1])
        self._rows_cache = (start, block)
        return block[lo - start : hi - start]

    def subsample(self, step):
        rows = max(step, BAND_PIXELS // max(1, self.shape[1]) // step * step)
        return np.concatenate([band[::step, ::step] for _, band in self.row_bands(rows)], axis=0)

    def close(self):
        self._band = self._rows_cache = None
        if self._closer is not None:
            self._closer()
            self._closer = None


def open_image(path: str | os.PathLike) -> ImageSource:
    """The image at ``path`` as an :class:`ImageSource`: read by region when its format allows.

    Region reads: tiled or striped (more than one strip) TIFF, BigTIFF and OME-TIFF (series 0, level 0,
    through tifffile's zarr store) and OME-Zarr folders (level 0 of the first multiscale), of at least
    ``REGION_READ_MIN_PIXELS`` pixels. Everything else is read whole by :func:`read_image` (a large one
    with a log line saying so). Raises InputError on bad input.
    """
    path = Path(path)
    if path.is_dir():
        return _open_ome_zarr(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        source = _open_chunked_tiff(path)
        if source is not None:
            return source
        why = "it is stored as one strip (or is small)"
    else:
        why = f"{path.suffix.lower() or 'this format'} cannot be read by region"
    image = read_image(path)
    if image.shape[0] * image.shape[1] >= LARGE_IMAGE_PIXELS:
        logger.info("%s (%dx%d) is read whole: %s; save it as a tiled TIFF to read it tile by tile",
                    path, image.shape[0], image.shape[1], why)
    return ArraySource(image, path)


def _open_chunked_tiff(path: Path) -> RegionSource | None:
    """A RegionSource for a chunked TIFF of at least REGION_READ_MIN_PIXELS pixels, else None."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception:
        return None  # read_image reports the problem in its words
    try:
        series = tif.series[0]
        page = series.keyframe
        axes = series.axes
        chunked = page.is_tiled or len(page.dataoffsets) > 1
        plane_pixels = int(page.imagelength) * int(page.imagewidth)
        if not chunked or plane_pixels < REGION_READ_MIN_PIXELS or "Y" not in axes or "X" not in axes:
            tif.close()
            return None
        others = [n for a, n in zip(axes, series.shape) if a not in "YX" and n > 1]
        if len(others) > 1:
            tif.close()
            return None  # read_image names the unsupported dimensionality
        import zarr

        store = series.aszarr(level=0)
        array = zarr.open_array(store, mode="r")

        def close():
            store.close()
            tif.close()

        return RegionSource(array, axes, path, close)
    except InputError:
        tif.close()
        raise
    except Exception:
        tif.close()
        return None


def _open_ome_zarr(path: Path) -> RegionSource:
    """Level 0 of the first multiscale of an OME-Zarr folder, read by region."""
    return RegionSource(*_ome_zarr_array(path), path)


def _ome_zarr_array(path: Path):
    """(zarr array, axes) of level 0 of the first multiscale of an OME-Zarr folder (v0.4 ``multiscales``
    or v0.5 ``ome``); InputError when the folder is not one or its axes are not (channels,) Y, X."""
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise InputError(f"{path} is a folder without OME-Zarr 'multiscales' metadata; pass an OME-Zarr "
                             "image or a TIFF")
        scale = multiscales[0]
        array = group[scale["datasets"][0]["path"]]
        names = [a["name"] if isinstance(a, dict) else str(a) for a in scale.get("axes", [])]
        if len(names) != array.ndim:
            names = ["tczyx"[i + 5 - array.ndim] for i in range(array.ndim)]  # OME-Zarr 0.1-0.3: t,c,z,y,x
        axes = "".join(n.upper()[0] for n in names)
    except InputError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read OME-Zarr {path}: {detail}; check the folder is an OME-Zarr image") from None
    others = [n for a, n in zip(axes, array.shape) if a not in "YX" and n > 1]
    if "Y" not in axes or "X" not in axes or len(others) > 1:
        raise InputError(f"{path} has axes {axes} of shape {array.shape}; only 2-D images with optional "
                         "channels are supported — save one plane (or one time point) per image")
    return array, axes


class LabelRegions:
    """A label image (semantic mask) read by region, each region checked as :func:`read_labels` checks
    the whole; a first pass over row bands finds its values, so ``dtype`` is the one ``read_labels``
    would return. A context manager.

    Attributes: ``path``, ``shape`` (H, W), ``values`` (sorted (N,) int64 labels present), ``dtype``.
    """

    def __init__(self, source: RegionSource, what: str):
        self.source, self.path, self.what = source, source.path, what
        self.shape = source.shape[:2]
        values: set[int] = set()
        for _, band in source.row_bands():
            values.update(np.unique(_check_labels(band, self.path, what)).tolist())
        self.values = np.asarray(sorted(values), np.int64)
        max_value = int(self.values.max())
        if max_value >= 2**31:
            raise InputError(f"{what} {self.path} has label {max_value}, beyond int32; relabel it")
        self.dtype = records.smallest_label_dtype(max_value)

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """(height, width) labels of ``dtype`` at (y, x), inside the image."""
        labels = _check_labels(self.source.read_region(y, x, height, width), self.path, self.what)
        return np.ascontiguousarray(labels.astype(self.dtype, copy=False))

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_labels(path: str | os.PathLike, what: str = "mask") -> LabelRegions | np.ndarray:
    """A label image read by region (:class:`LabelRegions`) when its format allows (as :func:`open_image`),
    else the whole (H, W) array of :func:`read_labels`."""
    path = Path(path)
    source = _open_ome_zarr(path) if path.is_dir() else (
        _open_chunked_tiff(path) if path.suffix.lower() in (".tif", ".tiff") else None)
    if source is None:
        return read_labels(path, what)
    try:
        return LabelRegions(source, what)
    except BaseException:
        source.close()
        raise
