"""Tile geometry: grids that cover an image (records of build_lmdb.py) and overlap-tiled inference plans.

Pure NumPy. Two kinds of grid:

* :func:`tile_grid` (the builder): tiles of one size that together cover every pixel, each start once.
* :func:`plan_tiles` (inference): model input windows on a padded image plus the part of each window
  that goes to the output (:class:`Tile`), with seams in the middle of the overlaps so that every
  kept pixel lies at least ``margin`` pixels from its window's edges. :func:`read_window` cuts a
  window, reflecting beyond the image border as ``np.pad(mode="reflect")`` does, without a padded copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def tile_starts(length: int, tile: int, overlap: int = 0) -> list[int]:
    """Start offsets of tiles of size ``tile`` along an axis of ``length`` pixels.

    Tiles step by ``tile - overlap``; the last one is shifted back to end at the border (NIST shifts
    border tiles too, but then writes the same tile several times; here each start appears once).
    Requires ``length >= tile`` and ``0 <= overlap < tile``.
    """
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile size {tile})")
    if length < tile:
        raise ValueError(f"axis of {length} pixels is smaller than the tile size {tile}")
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int = 0) -> list[tuple[int, int]]:
    """(y, x) of every tile, row-major; together the tiles cover the whole image."""
    return [(y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


# ----------------------------------------------------------------------------- inference plans


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


def max_overlap(tile: int, size_multiple: int = 1) -> int:
    """The largest overlap (pixels shared by neighbours, margins of ceil(overlap / 2) on both sides) that
    leaves a ``tile`` a stride of at least one ``size_multiple`` (``tile_stride``)."""
    return max(0, 2 * ((tile - size_multiple) // 2))


def _axis_plan(length: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(start, size, keep0, keep1) along one axis; seams in the middle of each overlap."""
    if length <= tile:
        return [(0, length, 0, length)]
    starts = tile_starts(length, tile, overlap=tile - stride)
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
    ``image`` may also be an ``image_io.RegionSource``: it reads the window's rows from the file.
    """
    if not isinstance(image, np.ndarray) and hasattr(image, "read_window"):
        return image.read_window(y, x, height, width)
    rows, cols = image.shape[:2]
    if y >= 0 and x >= 0 and y + height <= rows and x + width <= cols:
        return image[y : y + height, x : x + width]
    ys = reflect_index(np.arange(y, y + height), rows)
    xs = reflect_index(np.arange(x, x + width), cols)
    return image[np.ix_(ys, xs)]
