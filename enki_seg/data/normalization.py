"""Image normalization, one named choice shared by the reader (training) and inference.

Choices (recorded in the run's config so inference repeats exactly what training did):

* ``zscore`` — NIST's default, per tile and per channel: subtract the mean and divide by the standard
  deviation; a near-constant channel (std <= 1.0, NIST's rule) is only mean-subtracted, so flat
  background tiles are not blown up into noise.
* ``dataset`` — fixed per-channel mean/std from the training database's metadata
  (``channel_stats``); identical for every tile, so absolute intensity carries information.
* ``minmax`` — per tile and per channel to [0, 1]; a constant channel becomes 0.
* ``none`` — values converted to float32 unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("zscore", "dataset", "minmax", "none")

#: NIST's threshold below which a channel counts as constant: only its mean is removed.
ZSCORE_MIN_STD = 1.0


@dataclass
class Normalization:
    """A normalization method plus, for ``dataset``, the per-channel statistics it uses."""

    method: str = "zscore"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"normalization {self.method!r} is not one of {METHODS}")
        if self.method == "dataset":
            if not self.mean or len(self.mean) != len(self.std):
                raise ValueError("dataset normalization needs per-channel mean and std of equal length")
            if min(self.std) <= 0:
                raise ValueError(f"dataset normalization std must be > 0, got {self.std}")

    @classmethod
    def from_metadata(cls, method: str, metadata) -> "Normalization":
        """Build from a database's metadata (statistics are used only by ``dataset``)."""
        if method != "dataset":
            return cls(method)
        stats = metadata.channel_stats
        std = [s if s > 0 else 1.0 for s in stats["std"]]
        return cls(method, list(stats["mean"]), std)

    def to_dict(self) -> dict:
        return {"method": self.method, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalization":
        return cls(data["method"], list(data.get("mean", [])), list(data.get("std", [])))

    def apply(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalize an (H, W, C) image; returns float32 (written into ``out`` when given).

        ``out`` may be ``image`` itself when it is float32 (in-place).
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
        for c in range(channels):
            plane = out[..., c]
            if self.method == "zscore":
                mean = plane.mean(dtype=np.float64)
                std = plane.std(dtype=np.float64)
                plane -= np.float32(mean)
                if std > ZSCORE_MIN_STD:
                    plane *= np.float32(1.0 / std)
            else:  # minmax
                lo, hi = float(plane.min()), float(plane.max())
                plane -= np.float32(lo)
                if hi > lo:
                    plane *= np.float32(1.0 / (hi - lo))
        return out
