"""Computes tile grids: positions that cover every pixel of an image exactly, with no duplicate tile.

Used by build_lmdb.py (tiling sources into records) and by tiled inference.
"""
from __future__ import annotations


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
