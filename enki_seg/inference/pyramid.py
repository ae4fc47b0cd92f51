"""Pyramidal OME-TIFF outputs of whole slides, written from row bands with bounded memory.

Inference of an image read by region (``image_io.open_image(...).tile_wise``) hands its stitched
outputs over one row band of model tiles at a time; :func:`write_pyramid` turns those bands into a
tiled (``TILE`` x ``TILE``), zlib-compressed OME-TIFF whose lower resolutions are SubIFDs of each
page (the layout QuPath, Fiji/Bio-Formats and napari (tifffile, ``series[0].levels``) open as a pyramid):

1. The bands are regrouped into blocks of ``TILE`` rows and stored in a compressed on-disk zarr
   array (level 0) in a temporary folder beside the output.
2. Each lower level is computed from the one above it, ``2 * TILE`` rows by ``2 * STRIP_TILES * TILE``
   columns at a time: every second pixel for labels (nearest neighbour: a level holds only labels
   that exist), the mean of 2 x 2 pixels for probabilities (the last row/column repeated when a
   side is odd). Each level is ``ceil(side / 2)`` of the previous one; levels stop when both sides
   fit one tile.
3. The OME-TIFF is written tile by tile from those arrays (``TiffWriter.write`` with an iterator of
   tiles), level 0 with ``subifds`` = the number of lower levels, then each level as ``subfiletype=1``.

Memory: the caller's band plus up to two rows of tiles of level 0 being regrouped (full width:
a 100,000 px wide uint8 slide, ~100 MB; K float32 planes, 4K times that), and one block of
``2 * TILE`` x ``2 * STRIP_TILES * TILE`` pixels for the lower levels; never a whole level.
Disk: the temporary levels (compressed) until the output is written.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from enki_seg.files import temp_path

#: Side of the TIFF tiles and of the smallest pyramid level (pixels).
TILE = 512
#: Lower levels are computed in strips of this many tiles (of the level) across: memory does not grow with width.
STRIP_TILES = 2
#: Above this many bytes (all levels, uncompressed) the file is a BigTIFF (classic TIFF offsets are 32-bit).
BIGTIFF_BYTES = 2**31 - 2**25


def level_shapes(height: int, width: int, tile: int = TILE) -> list[tuple[int, int]]:
    """(height, width) of every level: level 0, then halved (rounded up) until both sides fit ``tile``."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample(block: np.ndarray, mode: str) -> np.ndarray:
    """(h, w[, K]) -> (ceil(h/2), ceil(w/2)[, K]): every second pixel ("nearest") or the 2 x 2 mean ("mean").

    The mean repeats the last row/column of an odd side, and rounds back to an integer dtype.
    """
    if mode == "nearest":
        return block[::2, ::2]
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        block = np.pad(block, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (block.ndim - 2), mode="edge")
    total = block[0::2, 0::2].astype(np.float32)  # a quarter-size buffer, the block is not copied
    for dy, dx in ((1, 0), (0, 1), (1, 1)):
        total += block[dy::2, dx::2]
    total *= 0.25
    if np.issubdtype(block.dtype, np.integer):
        return np.rint(total).astype(block.dtype)
    return total.astype(block.dtype)


def reband(bands: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Regroup consecutive row bands (each (h_i, W, ...)) into blocks of ``rows`` rows (the last may be shorter)."""
    pending: list[np.ndarray] = []
    count = 0
    for band in bands:
        while band.shape[0]:
            take = min(rows - count, band.shape[0])
            pending.append(band[:take])
            count += take
            band = band[take:]
            if count == rows:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def _tiles(level, tile: int, channel: int | None) -> Iterator[np.ndarray]:
    """Full (tile, tile) tiles of an on-disk level (H, W[, K]), row-major, zero-padded at the right and bottom."""
    height, width = level.shape[:2]
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            part = np.asarray(level[y : y + tile, x : x + tile] if channel is None
                              else level[y : y + tile, x : x + tile, channel])
            if part.shape == (tile, tile):
                yield part
            else:
                out = np.zeros((tile, tile), part.dtype)
                out[: part.shape[0], : part.shape[1]] = part
                yield out


class PyramidWriter:
    """Write row bands of a (height, width) image as a tiled, compressed, pyramidal OME-TIFF at ``path``.

    ``add(band)`` takes consecutive row bands top to bottom, each (h_i, width) or, with ``channels``,
    (h_i, width, channels), of ``dtype``; ``finish()`` computes the lower levels and writes the file;
    ``close()`` removes the temporary levels (also after a failure). Use as a context manager.

    Args:
        mode: "nearest" (labels) or "mean" (probabilities), how lower levels are computed.
        channels: None for one plane (axes YX); K for K planes (axes CYX, one page per channel,
            each with its lower levels as SubIFDs).
    """

    def __init__(self, path: str | Path, height: int, width: int, dtype, mode: str,
                 channels: int | None = None, tile: int = TILE):
        import zarr

        if mode not in ("nearest", "mean"):
            raise ValueError(f"mode must be 'nearest' or 'mean', got {mode!r}")
        if np.dtype(dtype) == np.float16:
            raise ValueError("OME-TIFF has no float16 pixel type; write float32 (or uint8) instead")
        self.path, self.dtype, self.mode, self.channels, self.tile = Path(path), np.dtype(dtype), mode, channels, tile
        self.width, self.height = width, height
        self.shapes = level_shapes(height, width, tile)
        self._extra = () if channels is None else (channels,)
        # named like atomic_path's temporaries, so files.remove_leftovers deletes those of a killed run
        self._scratch = temp_path(self.path.with_name(f"{self.path.stem}-levels{self.path.suffix}"))
        self._scratch.mkdir()
        self.levels = [zarr.open_array(str(self._scratch / f"{i}.zarr"), mode="w", shape=(h, w, *self._extra),
                                       chunks=(tile, tile, *(1 for _ in self._extra)), dtype=self.dtype,
                                       fill_value=0)
                       for i, (h, w) in enumerate(self.shapes)]
        self._rows = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def add(self, band: np.ndarray) -> None:
        """Append the next (h, width[, channels]) row band."""
        if band.shape[1:] != (self.width, *self._extra) or band.dtype != self.dtype:
            raise ValueError(f"band of shape {band.shape} {band.dtype}, expected (rows, {self.width}"
                             f"{', ' + str(self.channels) if self.channels else ''}) {self.dtype}")
        self._pending.append(band)
        self._pending_rows += band.shape[0]
        if self._pending_rows >= self.tile:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        blocks = list(reband(self._pending, self.tile))
        keep = blocks.pop() if blocks and blocks[-1].shape[0] < self.tile and not final else None
        strip = STRIP_TILES * self.tile
        for block in blocks:  # whole tile rows, a strip at a time: chunk-aligned writes, few chunks in flight
            for x in range(0, self.width, strip):
                self.levels[0][self._rows : self._rows + block.shape[0], x : x + strip] = block[:, x : x + strip]
            self._rows += block.shape[0]
        self._pending = [] if keep is None else [keep.copy()]
        self._pending_rows = 0 if keep is None else keep.shape[0]

    def finish(self) -> Path:
        """Compute the lower levels and write the OME-TIFF; returns its path."""
        import tifffile

        self._flush(final=True)
        if self._rows != self.height:
            raise ValueError(f"bands cover {self._rows} rows of {self.height}")
        tile, shapes, levels = self.tile, self.shapes, self.levels
        strip = STRIP_TILES * tile
        for i in range(1, len(levels)):  # from the level above, 2 tile rows x 2 strips at a time
            for y in range(0, shapes[i][0], tile):
                for x in range(0, shapes[i][1], strip):
                    block = np.asarray(levels[i - 1][2 * y : 2 * (y + tile), 2 * x : 2 * (x + strip)])
                    levels[i][y : y + tile, x : x + strip] = downsample(block, self.mode)
        nbytes = sum(h * w for h, w in shapes) * self.dtype.itemsize * (self.channels or 1)
        options = dict(tile=(tile, tile), compression="zlib", photometric="minisblack", dtype=self.dtype)
        planes = [None] if self.channels is None else list(range(self.channels))

        def tiles(level):
            for c in planes:
                yield from _tiles(levels[level], tile, c)

        with tifffile.TiffWriter(self.path, bigtiff=nbytes > BIGTIFF_BYTES, ome=True) as tif:
            for i, (h, w) in enumerate(shapes):
                shape = (h, w) if self.channels is None else (self.channels, h, w)
                if i == 0:
                    tif.write(tiles(0), shape=shape, subifds=len(shapes) - 1,
                              metadata={"axes": "YX" if self.channels is None else "CYX"}, **options)
                else:
                    tif.write(tiles(i), shape=shape, subfiletype=1, **options)
        return self.path

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_pyramid(path: str | Path, bands: Iterable[np.ndarray], height: int, width: int, dtype,
                  mode: str, channels: int | None = None, tile: int = TILE) -> Path:
    """:class:`PyramidWriter` over an iterable of row ``bands``."""
    with PyramidWriter(path, height, width, dtype, mode, channels, tile) as writer:
        for band in bands:
            writer.add(band)
        return writer.finish()
