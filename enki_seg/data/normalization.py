"""Image normalization, one named choice shared by the reader (training) and inference.

Methods (recorded in the run's config so inference repeats exactly what training did):

* ``zscore`` — NIST's default, per channel: subtract the mean and divide by the standard deviation;
  a near-constant channel (std <= 1.0, NIST's rule) is only mean-subtracted, so flat background tiles
  are not blown up into noise.
* ``percentile`` — per channel, the low percentile maps to 0 and the high one to 1 (``percentiles``,
  default 1 and 99.8: the microscopy default of csbdeep and StarDist); robust to hot pixels and to how
  much of a field is background. A channel with equal low and high values is only offset.
* ``minmax`` — per channel to [0, 1]; a constant channel becomes 0.
* ``dataset`` — fixed per-channel mean/std from the training database's metadata
  (``channel_stats``); identical for every tile, so absolute intensity carries information.
* ``none`` — values converted to float32 unchanged.

Scope (``zscore``, ``percentile``, ``minmax``): where the statistics come from.

* ``tile`` (default, NIST's rule) — each tile (record, inference window) on its own. Tiles of one
  image then disagree (seams at tile borders, a tile of background stretched to full range).
* ``image`` — the whole source image's statistics, applied to every tile of it: one image split
  into tiles gives the values the whole image gives. ``build_lmdb.py`` stores each source image's
  statistics in the database metadata (``source_stats``: mean, std, min, max and the percentiles of
  ``QUANTILE_LEVELS`` per channel); inference computes them from the whole image it reads. Images
  above ``QUANTILE_SAMPLE`` pixels get their percentiles from a fixed strided subsample of that many
  pixels, the same at build time and at inference.

Every method with statistics is an affine map per channel, ``(x - offset) * scale``: the scope only
decides which pixels the offset and scale are computed from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("zscore", "percentile", "dataset", "minmax", "none")
SCOPES = ("tile", "image")

#: NIST's threshold below which a channel counts as constant: only its mean is removed.
ZSCORE_MIN_STD = 1.0
DEFAULT_PERCENTILES = (1.0, 99.8)
#: the percentiles build_lmdb.py stores per source image (``--normalization_percentiles`` chooses among them)
QUANTILE_LEVELS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.0, 98.0,
                   99.0, 99.5, 99.8, 99.9, 100.0)
#: pixels per channel above which percentiles come from a strided subsample (a 2048x2048 image is exact)
QUANTILE_SAMPLE = 1 << 22


@dataclass
class Normalization:
    """A normalization method, its scope and, for ``dataset``, the per-channel statistics it uses."""

    method: str = "zscore"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    scope: str = "tile"
    percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"normalization {self.method!r} is not one of {METHODS}")
        if self.scope not in SCOPES:
            raise ValueError(f"normalization scope {self.scope!r} is not one of {SCOPES}")
        self.percentiles = [float(p) for p in self.percentiles]
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"normalization percentiles must be two values low < high in [0, 100], got "
                             f"{self.percentiles}")
        if self.method == "dataset":
            if not self.mean or len(self.mean) != len(self.std):
                raise ValueError("dataset normalization needs per-channel mean and std of equal length")
            if min(self.std) <= 0:
                raise ValueError(f"dataset normalization std must be > 0, got {self.std}")

    @property
    def per_image(self) -> bool:
        """True when each tile is normalized with its whole source image's statistics."""
        return self.scope == "image" and self.method in ("zscore", "percentile", "minmax")

    @classmethod
    def from_metadata(cls, method: str, metadata, scope: str = "tile",
                      percentiles=DEFAULT_PERCENTILES) -> "Normalization":
        """Build from a database's metadata (statistics are used only by ``dataset``)."""
        if method != "dataset":
            return cls(method, scope=scope, percentiles=list(percentiles))
        stats = metadata.channel_stats
        std = [s if s > 0 else 1.0 for s in stats["std"]]
        return cls(method, list(stats["mean"]), std, scope=scope, percentiles=list(percentiles))

    def to_dict(self) -> dict:
        return {"method": self.method, "mean": list(self.mean), "std": list(self.std), "scope": self.scope,
                "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalization":
        # runs saved before scopes and percentiles existed normalized per tile
        return cls(data["method"], list(data.get("mean", [])), list(data.get("std", [])),
                   data.get("scope", "tile"), list(data.get("percentiles", DEFAULT_PERCENTILES)))

    def describe(self) -> str:
        """A short human-readable name for logs: ``percentile 1-99.8 per image``."""
        name = self.method
        if self.method == "percentile":
            name += f" {self.percentiles[0]:g}-{self.percentiles[1]:g}"
        if self.method in ("zscore", "percentile", "minmax"):
            name += " per image" if self.per_image else " per tile"
        return name

    # -- statistics

    def affine_from_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel (offset, scale) float32 of this method computed from ``image`` (H, W, C); None
        for methods without per-image statistics (``dataset``, ``none``)."""
        if self.method not in ("zscore", "percentile", "minmax"):
            return None
        channels = image.shape[-1]
        offset, scale = np.zeros(channels, np.float32), np.ones(channels, np.float32)
        for c in range(channels):
            plane = image[..., c]
            if self.method == "zscore":
                mean, std = plane.mean(dtype=np.float64), plane.std(dtype=np.float64)
                offset[c] = np.float32(mean)
                if std > ZSCORE_MIN_STD:
                    scale[c] = np.float32(1.0 / std)
            else:
                if self.method == "percentile":
                    lo, hi = channel_percentiles(plane, self.percentiles)
                else:
                    lo, hi = float(plane.min()), float(plane.max())
                offset[c] = np.float32(lo)
                if hi > lo:
                    scale[c] = np.float32(1.0 / (hi - lo))
        return offset, scale

    def affine_from_source_stats(self, stats: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) from the statistics ``source_image_stats`` stored for a source image; ``what``
        names it in errors (ValueError when the statistics this method needs were not stored)."""
        if self.method == "zscore":
            offset = np.asarray(stats["mean"], np.float32)
            std = np.asarray(stats["std"], np.float64)
            scale = np.where(std > ZSCORE_MIN_STD, 1.0 / np.maximum(std, 1e-30), 1.0).astype(np.float32)
            return offset, scale
        if self.method == "minmax":
            lo, hi = np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64)
        elif self.method == "percentile":
            quantiles = stats.get("quantiles", {})
            missing = [p for p in self.percentiles if _level_key(p) not in quantiles]
            if missing:
                raise ValueError(f"{what}: percentile(s) {missing} were not stored at build time; choose from "
                                 f"{list(QUANTILE_LEVELS)} or use --normalization_scope tile")
            lo, hi = (np.asarray(quantiles[_level_key(p)], np.float64) for p in self.percentiles)
        else:
            raise ValueError(f"normalization {self.method} has no per-image statistics")
        offset = lo.astype(np.float32)
        scale = np.where(hi > lo, 1.0 / np.where(hi > lo, hi - lo, 1.0), 1.0).astype(np.float32)
        return offset, scale

    def for_image(self, image):
        """The ``normalize(raw_tile, out=None)`` function for the tiles of ``image`` (whole, H, W, C): this
        normalization with, for scope ``image``, the statistics of the whole image.

        ``image`` may be an ``image_io.ImageSource`` read by region: the statistics are then accumulated
        over row bands (:class:`SourceStatsAccumulator`: percentiles from the strided subsample a whole
        read takes, mean and std equal up to float64 rounding), never by loading the image."""
        if not self.per_image:
            return self.apply
        if isinstance(image, np.ndarray):
            affine = self.affine_from_image(image)
        else:
            height, width, channels = image.shape
            accumulator = SourceStatsAccumulator(height, width, channels)
            for _, band in image.row_bands():
                accumulator.add_rows(band)
            affine = self.affine_from_source_stats(accumulator.result(self.percentiles), str(image.path))
        return lambda tile, out=None: self.apply(tile, out=out, affine=affine)

    # -- application

    def apply(self, image: np.ndarray, out: np.ndarray | None = None,
              affine: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Normalize an (H, W, C) image; returns float32 (written into ``out`` when given).

        ``out`` may be ``image`` itself when it is float32 (in-place). ``affine``: per-channel (offset,
        scale) to use instead of statistics of ``image`` itself (scope ``image``: those of the source).
        """
        if out is None:
            out = np.empty(image.shape, np.float32)
        if out is not image:
            np.copyto(out, image, casting="unsafe")
        channels = out.shape[-1]
        if self.method == "none":
            return out
        if self.method == "dataset":
            if len(self.mean) != channels:
                raise ValueError(f"dataset normalization has {len(self.mean)} channel(s), image has {channels}")
            out -= np.asarray(self.mean, np.float32)
            out *= np.asarray([1.0 / s for s in self.std], np.float32)
            return out
        offset, scale = affine if affine is not None else self.affine_from_image(out)
        if len(offset) != channels:
            raise ValueError(f"normalization statistics have {len(offset)} channel(s), image has {channels}")
        for c in range(channels):
            plane = out[..., c]
            plane -= offset[c]
            if scale[c] != 1.0:
                plane *= scale[c]
        return out


def _level_key(level: float) -> str:
    return f"{float(level):g}"


def _sample(plane: np.ndarray) -> np.ndarray:
    flat = plane.reshape(-1)
    if flat.size > QUANTILE_SAMPLE:
        flat = flat[:: -(-flat.size // QUANTILE_SAMPLE)]  # a fixed stride: the same pixels every time
    return flat


def channel_percentiles(plane: np.ndarray, levels) -> list[float]:
    """Percentiles (numpy's linear rule) of one channel, from the strided sample of large planes."""
    return [float(v) for v in np.percentile(_sample(plane), list(levels))]


def source_image_stats(image: np.ndarray) -> dict:
    """What build_lmdb.py stores per source image for scope ``image``: per channel mean, std, min, max
    (float64 over every pixel) and the percentiles of ``QUANTILE_LEVELS``."""
    channels = image.shape[-1]
    planes = [image[..., c] for c in range(channels)]
    quantiles = np.array([channel_percentiles(p, QUANTILE_LEVELS) for p in planes])  # (C, levels)
    return {
        "mean": [float(p.mean(dtype=np.float64)) for p in planes],
        "std": [float(p.std(dtype=np.float64)) for p in planes],
        "min": [float(p.min()) for p in planes],
        "max": [float(p.max()) for p in planes],
        "quantiles": {_level_key(level): quantiles[:, k].tolist() for k, level in enumerate(QUANTILE_LEVELS)},
    }


class SourceStatsAccumulator:
    """:func:`source_image_stats` of an image read as disjoint full-width row bands, top to bottom.

    For images read region by region (``image_io.RegionSource``): ``add_rows`` each band once, then
    ``result``. Mean and std are merged per band (Chan et al.; equal to the whole-image values up to
    float64 rounding), min and max are exact, and the percentiles come from the same strided subsample
    of ``QUANTILE_SAMPLE`` pixels that :func:`channel_percentiles` takes of the whole plane (the pixels
    at flat indices 0, k, 2k, ...), so they are identical to a whole read. Memory: that subsample.
    """

    def __init__(self, height: int, width: int, channels: int):
        from enki_seg.data.records import ChannelStats

        self.width, self.rows = width, 0
        pixels = height * width
        self.stride = -(-pixels // QUANTILE_SAMPLE) if pixels > QUANTILE_SAMPLE else 1
        self.moments = ChannelStats(channels)
        self.samples: list[np.ndarray] = []

    def add_rows(self, band: np.ndarray) -> None:
        """The next (h, W, C) rows of the image."""
        self.moments.add(band)
        flat = band.reshape(-1, band.shape[-1])
        first = (-self.rows * self.width) % self.stride
        self.samples.append(flat[first :: self.stride].copy())
        self.rows += band.shape[0]

    def result(self, levels=QUANTILE_LEVELS) -> dict:
        """The statistics dict of :func:`source_image_stats` (percentiles at ``levels``)."""
        moments = self.moments.as_dict()
        sample = np.concatenate(self.samples, axis=0)
        quantiles = np.array([[float(v) for v in np.percentile(sample[:, c], list(levels))]
                              for c in range(sample.shape[1])])
        return {"mean": moments["mean"], "std": moments["std"], "min": moments["min"], "max": moments["max"],
                "quantiles": {_level_key(level): quantiles[:, k].tolist() for k, level in enumerate(levels)}}
