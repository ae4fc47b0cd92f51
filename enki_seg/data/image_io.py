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
                          ".jpg": (".jpg", ".jpeg"), ".jpeg": (".jpg", ".jpeg"), ".png": (".png",)}


class InputError(ValueError):
    """Bad input data; the message names the file and the fix."""


def extensions_for(image_format: str) -> tuple[str, ...]:
    """File extensions accepted for ``--image_format`` (``tif`` also matches ``.tiff``)."""
    ext = "." + image_format.lower().lstrip(".")
    if ext not in _EQUIVALENT_EXTENSIONS:
        raise InputError(
            f"--image_format {image_format!r} is not supported; use one of tif, tiff, png, jpg"
        )
    return _EQUIVALENT_EXTENSIONS[ext]


def list_images(folder: str | os.PathLike, image_format: str) -> list[Path]:
    """Sorted files of ``image_format`` in ``folder`` (not recursive, hidden files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist or is not a folder; check --image_folder")
    exts = extensions_for(image_format)
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
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
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in by_stem:
            raise InputError(
                f"{what} folder has two files for {p.stem!r}: {by_stem[p.stem].name} and {p.name}; "
                "keep one"
            )
        by_stem[p.stem] = p
    return by_stem


def _read_raw(path: Path) -> tuple[np.ndarray, str | None]:
    """Decode a file; returns the array and, for TIFF, the axes string of its first series."""
    suffix = path.suffix.lower()
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
    array = _to_hwc(array, axes, path)
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
    max_value = int(array.max())
    if max_value >= 2**31:
        raise InputError(f"{what} {path} has label {max_value}, beyond int32; relabel it")
    return np.ascontiguousarray(array.astype(records.smallest_label_dtype(max_value), copy=False))
