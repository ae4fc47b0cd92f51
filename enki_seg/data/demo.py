"""Generates a synthetic microscopy-like segmentation dataset, so the pipeline runs without a download.

    python -m enki_seg.data.demo --output_folder /tmp/enki_demo --count 24 --height 512 --width 512 \
        --channels 1 --seed 0 --coco 1 --num_workers 2

For each index i (file stem ``demo_{i:03d}``) it writes:

* ``images/demo_000.tif``: uint16 image, (H, W) for one channel, (H, W, C) channels-last otherwise.
* ``masks/demo_000.png``: (H, W) uint8 semantic mask, 0 background, 1 cell, 2 debris.
* ``instances/demo_000.tif``: (H, W) uint16 instance labels, 0 background, objects 1..N.
* ``coco.json`` (``--coco 1``): COCO instances for the same images, one polygon per visible piece.

The scene: round, bright "cells" with a brighter nucleus and granular texture, and elongated, bent,
ragged "debris" that absorbs light (dark in channel 0, faintly bright in the membrane channel), on a
textured background under uneven illumination, with Poisson (shot) and Gaussian (read) noise. Objects
touch and overlap; where they overlap the later (top) object owns the pixel, and the semantic mask is
always the class of the instance owning the pixel. Channels: 0 whole-cell stain, 1 membrane,
2 nuclear, 3+ random mixtures of those three.

Sample ``i`` is drawn from ``np.random.default_rng([seed, i])`` alone, so the same seed gives
byte-identical files whatever order the samples are made in.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage import measure, segmentation

logger = logging.getLogger(__name__)

CELL = 1
DEBRIS = 2
CLASS_NAMES = {CELL: "cell", DEBRIS: "debris"}

# Object sizes are in pixels, as for a fixed objective: a larger image shows more objects, not bigger
# ones. Densities are per 512x512 field, which is about 15-20 % cell cover before occlusion.
_FIELD_AREA = 512 * 512
_CELLS_PER_FIELD = 55.0
_DEBRIS_PER_FIELD = 10.0
_MIN_CELLS = 4   # so that even small test images have neighbours to touch and overlap
_MIN_DEBRIS = 1  # so that every image shows both foreground classes
_CLUSTER_PROBABILITY = 0.5  # cells grow in colonies: half of them are placed against an earlier one
# A visible sliver smaller than this is handed to its neighbour: too small to outline as a polygon
# and not something an annotator would draw.
_MIN_PIECE_AREA = 16
_PSF_SIGMA = 1.0  # px; optical blur, so object edges are soft as in a real image
_READ_NOISE_PHOTONS = 3.0

# Per stain: weights of cytoplasm, nucleus and membrane in a cell (relative to a cell's level), the
# fraction of background light absorbed by debris, and the autofluorescence of debris body and of its
# refractile rim (relative to a cell's level). In channel 0 debris is a dark sliver with a thin bright
# edge, so it differs from cells in intensity as well as shape.
_STAINS = {
    "whole_cell": (0.45, 0.55, 0.00, 0.70, 0.00, 0.55),
    "membrane": (0.10, 0.00, 0.90, 0.00, 0.40, 0.10),
    "nuclear": (0.04, 1.00, 0.00, 0.30, 0.05, 0.00),
}
_STAIN_ORDER = ("whole_cell", "membrane", "nuclear")


@dataclass(frozen=True)
class ObjectShape:
    """Geometry and brightness of one object, in pixel units of the full image.

    The outline is an ellipse with semi-axes ``radii`` = (along, across), rotated by ``angle``
    (radians, from the column axis), its long axis bent into an arc by ``bend`` (1/px), and its radius
    modulated by ``harmonics``: ((k, amplitude, phase), ...) in the ellipse's normalised angle.
    """

    class_id: int
    center: tuple[float, float]  # (row, col)
    radii: tuple[float, float]
    angle: float
    bend: float
    harmonics: tuple[tuple[int, float, float], ...]
    nucleus_offset: tuple[float, float]  # (along, across) px from the centre
    nucleus_scale: float                 # nucleus semi-axes = scale * radii
    brightness: float                    # per-object stain uptake, about 1

    def extent(self) -> float:
        """Radius (px) of a circle around ``center`` that holds the whole object."""
        wobble = 1.0 + sum(abs(amplitude) for _, amplitude, _ in self.harmonics)
        along, across = self.radii
        return max(along, across) * wobble + abs(self.bend) * along**2 + 2.0


@dataclass
class DemoSample:
    """One generated sample.

    image: (H, W) uint16 for one channel, (H, W, C) uint16 otherwise.
    semantic_mask: (H, W) uint8, 0 background, 1 cell, 2 debris.
    instance_labels: (H, W) uint16, 0 background, 1..N.
    class_ids: (N,) uint8, class of instance i + 1.
    overlapping_pairs: pairs (a, b) of final instance ids whose full shapes overlap.
    touching_pairs: pairs (a, b), a < b, of instance ids that are 4-adjacent.
    """

    image: np.ndarray
    semantic_mask: np.ndarray
    instance_labels: np.ndarray
    class_ids: np.ndarray
    overlapping_pairs: set[tuple[int, int]]
    touching_pairs: set[tuple[int, int]]


def _random_harmonics(rng: np.random.Generator, orders: np.ndarray, amplitude_range: tuple[float, float],
                      max_total: float) -> tuple[tuple[int, float, float], ...]:
    amplitudes = rng.uniform(*amplitude_range, size=orders.size)
    if amplitudes.sum() > max_total:  # keeps the radius positive everywhere
        amplitudes *= max_total / amplitudes.sum()
    phases = rng.uniform(0.0, 2.0 * np.pi, size=orders.size)
    return tuple((int(k), float(a), float(p)) for k, a, p in zip(orders, amplitudes, phases))


def _sample_cell(rng: np.random.Generator, center: tuple[float, float], radius: float) -> ObjectShape:
    aspect = rng.uniform(1.0, 1.3)
    return ObjectShape(
        class_id=CELL,
        center=center,
        radii=(radius * np.sqrt(aspect), radius / np.sqrt(aspect)),
        angle=float(rng.uniform(0.0, np.pi)),
        bend=0.0,
        harmonics=_random_harmonics(rng, np.arange(2, 5), (0.0, 0.06), 0.15),
        nucleus_offset=(float(rng.uniform(-0.15, 0.15) * radius), float(rng.uniform(-0.15, 0.15) * radius)),
        nucleus_scale=float(rng.uniform(0.45, 0.6)),
        brightness=float(rng.lognormal(0.0, 0.2)),
    )


def _sample_debris(rng: np.random.Generator, center: tuple[float, float]) -> ObjectShape:
    along = rng.uniform(18.0, 45.0)
    across = rng.uniform(3.5, 7.0)
    orders = np.sort(rng.choice(np.arange(3, 12), size=4, replace=False))
    return ObjectShape(
        class_id=DEBRIS,
        center=center,
        radii=(float(along), float(across)),
        angle=float(rng.uniform(0.0, np.pi)),
        # tips move sideways by up to 0.35 of the half length: a gentle arc, not a ring
        bend=float(rng.uniform(-0.35, 0.35) / along),
        harmonics=_random_harmonics(rng, orders, (0.04, 0.12), 0.4),
        nucleus_offset=(0.0, 0.0),
        nucleus_scale=0.0,
        brightness=float(rng.lognormal(0.0, 0.2)),
    )


def sample_shapes(rng: np.random.Generator, height: int, width: int) -> list[ObjectShape]:
    """Objects of one scene in painting order (later ones lie on top)."""
    field_fraction = height * width / _FIELD_AREA
    num_cells = max(_MIN_CELLS, int(rng.poisson(_CELLS_PER_FIELD * field_fraction)))
    num_debris = max(_MIN_DEBRIS, int(rng.poisson(_DEBRIS_PER_FIELD * field_fraction)))

    def random_center() -> tuple[float, float]:
        # a margin outside the image, so some objects are cut by the border as in a real field of view
        return (float(rng.uniform(-0.05, 1.05) * height), float(rng.uniform(-0.05, 1.05) * width))

    cells: list[ObjectShape] = []
    for _ in range(num_cells):
        radius = float(np.clip(rng.normal(14.0, 2.5), 8.0, 22.0))
        if cells and rng.random() < _CLUSTER_PROBABILITY:
            neighbour = cells[int(rng.integers(len(cells)))]
            # 0.7-1.05 of the sum of radii: from clearly overlapping to just touching
            distance = (radius + float(np.sqrt(np.prod(neighbour.radii)))) * rng.uniform(0.7, 1.05)
            direction = rng.uniform(0.0, 2.0 * np.pi)
            center = (neighbour.center[0] + distance * np.sin(direction),
                      neighbour.center[1] + distance * np.cos(direction))
        else:
            center = random_center()
        cells.append(_sample_cell(rng, center, radius))
    debris = [_sample_debris(rng, random_center()) for _ in range(num_debris)]
    shapes = cells + debris
    order = rng.permutation(len(shapes))
    return [shapes[i] for i in order]


def _window(shape: ObjectShape, height: int, width: int) -> tuple[slice, slice] | None:
    reach = shape.extent()
    row0, row1 = int(np.floor(shape.center[0] - reach)), int(np.ceil(shape.center[0] + reach)) + 1
    col0, col1 = int(np.floor(shape.center[1] - reach)), int(np.ceil(shape.center[1] + reach)) + 1
    row0, col0 = max(row0, 0), max(col0, 0)
    row1, col1 = min(row1, height), min(col1, width)
    if row0 >= row1 or col0 >= col1:
        return None
    return slice(row0, row1), slice(col0, col1)


def _local_coordinates(shape: ObjectShape, window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """(along, across) pixel offsets from the object's centre, on its bent axis; arrays of the window."""
    rows = np.arange(window[0].start, window[0].stop, dtype=np.float64)[:, None] - shape.center[0]
    cols = np.arange(window[1].start, window[1].stop, dtype=np.float64)[None, :] - shape.center[1]
    cos, sin = np.cos(shape.angle), np.sin(shape.angle)
    along = cols * cos + rows * sin
    across = -cols * sin + rows * cos - shape.bend * along**2
    return along, across


def _inside(shape: ObjectShape, window: tuple[slice, slice]) -> np.ndarray:
    """(h, w) bool: the object's full (unoccluded) footprint inside ``window``."""
    along, across = _local_coordinates(shape, window)
    u, v = along / shape.radii[0], across / shape.radii[1]
    theta = np.arctan2(v, u)
    edge = np.ones_like(theta)
    for order, amplitude, phase in shape.harmonics:
        edge += amplitude * np.cos(order * theta + phase)
    return np.hypot(u, v) <= edge


def _nucleus_profile(shape: ObjectShape, window: tuple[slice, slice]) -> np.ndarray:
    """(h, w) float in [0, 1]: 1 inside the nucleus, falling off over about a third of its radius."""
    along, across = _local_coordinates(shape, window)
    scale = shape.nucleus_scale
    rho = np.hypot((along - shape.nucleus_offset[0]) / (scale * shape.radii[0]),
                   (across - shape.nucleus_offset[1]) / (scale * shape.radii[1]))
    return np.clip((1.15 - rho) / 0.3, 0.0, 1.0)


def paint_instances(shapes: list[ObjectShape], height: int, width: int
                    ) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Paint shapes in order; returns (H, W) int32 labels (shape i -> i + 1) and overlapping pairs."""
    instance_labels = np.zeros((height, width), np.int32)
    overlapping: set[tuple[int, int]] = set()
    for label_id, shape in enumerate(shapes, start=1):
        window = _window(shape, height, width)
        if window is None:
            continue
        inside = _inside(shape, window)
        region = instance_labels[window]
        for below in np.unique(region[inside]):
            if below:
                overlapping.add((int(below), label_id))
        region[inside] = label_id
    return instance_labels, overlapping


def _absorb_small_pieces(instance_labels: np.ndarray, min_area: int) -> None:
    """In place: give each visible piece smaller than ``min_area`` to its most common neighbour."""
    height, width = instance_labels.shape
    for label_id, window in enumerate(ndimage.find_objects(instance_labels), start=1):
        if window is None:
            continue
        window = (slice(max(window[0].start - 1, 0), min(window[0].stop + 1, height)),
                  slice(max(window[1].start - 1, 0), min(window[1].stop + 1, width)))
        crop = instance_labels[window]  # a view: assignments below edit the label image
        pieces, num_pieces = ndimage.label(crop == label_id)
        sizes = np.bincount(pieces.ravel(), minlength=num_pieces + 1)
        for piece_id in np.flatnonzero(sizes[1:] < min_area) + 1:
            piece = pieces == piece_id
            ring = ndimage.binary_dilation(piece) & ~piece
            neighbours = crop[ring]
            neighbours = neighbours[neighbours != label_id]
            crop[piece] = np.bincount(neighbours).argmax() if neighbours.size else 0


def adjacent_label_pairs(instance_labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (a, b), a < b, of distinct non-zero labels that are 4-adjacent somewhere."""
    pairs: set[tuple[int, int]] = set()
    for first, second in ((instance_labels[:, :-1], instance_labels[:, 1:]),
                          (instance_labels[:-1, :], instance_labels[1:, :])):
        touching = (first != second) & (first > 0) & (second > 0)
        low = np.minimum(first[touching], second[touching])
        high = np.maximum(first[touching], second[touching])
        pairs.update(zip(low.tolist(), high.tolist()))
    return pairs


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """(H, W) float32 zero-mean, unit-std noise, white noise blurred by a Gaussian of ``scale`` px.

    Drawn directly in the Fourier domain (one inverse FFT instead of a wide spatial filter), so it
    wraps around at the edges, which does not show at these scales.
    """
    freq_rows = np.fft.fftfreq(height).astype(np.float32)[:, None]
    freq_cols = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    transfer = np.exp(np.float32(-2.0 * (np.pi * scale) ** 2) * (freq_rows**2 + freq_cols**2))
    spectrum_shape = (height, width // 2 + 1)
    spectrum = np.empty(spectrum_shape, np.complex64)
    spectrum.real = rng.standard_normal(spectrum_shape, dtype=np.float32) * transfer
    spectrum.imag = rng.standard_normal(spectrum_shape, dtype=np.float32) * transfer
    noise = np.fft.irfft2(spectrum, s=(height, width))
    return (noise - noise.mean()) / (noise.std() + np.float32(1e-12))


def _illumination(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) float32 in (0, 1]: a tilted, off-centre vignetted field, as from a misaligned lamp."""
    rows = np.linspace(-1.0, 1.0, height)[:, None]
    cols = np.linspace(-1.0, 1.0, width)[None, :]
    tilt_direction = rng.uniform(0.0, 2.0 * np.pi)
    tilt = rng.uniform(0.12, 0.25) * (np.cos(tilt_direction) * cols + np.sin(tilt_direction) * rows)
    center_row, center_col = rng.uniform(-0.3, 0.3, size=2)
    vignetting = rng.uniform(0.05, 0.12) * ((rows - center_row) ** 2 + (cols - center_col) ** 2)
    field = (1.0 + tilt) * (1.0 - vignetting)
    return (field / field.max()).astype(np.float32)


def _stain_weights(rng: np.random.Generator, channel: int) -> np.ndarray:
    if channel < len(_STAIN_ORDER):
        return np.asarray(_STAINS[_STAIN_ORDER[channel]])
    mixture = rng.dirichlet(np.ones(len(_STAIN_ORDER)))
    return mixture @ np.asarray([_STAINS[name] for name in _STAIN_ORDER])


def render_expected_photons(rng: np.random.Generator, instance_labels: np.ndarray,
                            shapes: list[ObjectShape], channels: int) -> np.ndarray:
    """(C, H, W) float32 expected photon counts, before noise.

    ``shapes[i]`` describes instance ``i + 1`` of ``instance_labels`` ((H, W) integers).
    """
    height, width = instance_labels.shape
    class_lookup = np.asarray([0] + [shape.class_id for shape in shapes], np.uint8)
    semantic_mask = class_lookup[instance_labels]
    is_cell = semantic_mask == CELL
    is_debris = semantic_mask == DEBRIS

    nucleus = np.zeros((height, width), np.float32)
    brightness = np.zeros((height, width), np.float32)
    for label_id, window in enumerate(ndimage.find_objects(instance_labels), start=1):
        if window is None:
            continue
        shape = shapes[label_id - 1]
        owned = instance_labels[window] == label_id
        brightness[window][owned] = shape.brightness
        if shape.class_id == CELL:
            nucleus[window][owned] = _nucleus_profile(shape, window)[owned]
    # membrane stain and debris rims sit on each object's visible outline, also where another covers it
    outline = segmentation.find_boundaries(instance_labels, mode="inner").astype(np.float32)
    # a blurred line peaks at 1 / sqrt(2 pi) of its height; rescale so the outline peaks near 1
    outline = ndimage.gaussian_filter(outline, sigma=1.0) * np.float32(np.sqrt(2.0 * np.pi))
    membrane = outline * is_cell
    rim = outline * is_debris

    illumination = _illumination(rng, height, width)
    sample_structure = _smooth_noise(rng, height, width, scale=48.0)  # shared: the specimen is uneven
    expected = np.empty((channels, height, width), np.float32)
    for channel in range(channels):
        weights = _stain_weights(rng, channel).astype(np.float32)
        cytoplasm, nuclear, membranous, absorption, glow, rim_glow = weights
        background_level = np.float32(rng.uniform(180.0, 320.0))
        cell_level = np.float32(rng.uniform(900.0, 1500.0))
        background = background_level * np.clip(
            1 + np.float32(0.2) * sample_structure + np.float32(0.1) * _smooth_noise(rng, height, width, 12.0)
            + np.float32(0.05) * _smooth_noise(rng, height, width, 1.5), 0.2, None)
        granular = np.clip(1 + np.float32(0.3) * _smooth_noise(rng, height, width, 1.2), 0.0, None)
        cells = cell_level * brightness * (cytoplasm + nuclear * nucleus + membranous * membrane) * granular
        debris_texture = np.clip(1 + np.float32(0.4) * _smooth_noise(rng, height, width, 2.5), 0.0, 2.0)
        signal = (background * (1 - np.clip(absorption * debris_texture, 0.0, 0.9) * is_debris)
                  + cells * is_cell
                  + cell_level * brightness * (glow * debris_texture * is_debris + rim_glow * rim))
        expected[channel] = ndimage.gaussian_filter(signal * illumination, sigma=_PSF_SIGMA)
    return expected


def to_camera_counts(rng: np.random.Generator, expected_photons: np.ndarray) -> np.ndarray:
    """(C, H, W) uint16 camera image: Poisson shot noise, gain, offset and Gaussian read noise.

    The gain puts the brightest expected pixel at 45-70 % of the uint16 range, so the image uses a
    good part of it but shot noise never reaches saturation.
    """
    counts = np.empty(expected_photons.shape, np.uint16)
    for channel, expected in enumerate(expected_photons):
        offset = rng.uniform(100.0, 500.0)
        gain = (rng.uniform(0.45, 0.7) * 65535.0 - offset) / expected.max()
        photons = rng.poisson(expected) + rng.normal(0.0, _READ_NOISE_PHOTONS, size=expected.shape)
        counts[channel] = np.clip(np.round(offset + gain * photons), 0, 65535).astype(np.uint16)
    return counts


def make_sample(rng: np.random.Generator, height: int, width: int, channels: int) -> DemoSample:
    """Draw one scene and its image; deterministic given the state of ``rng``."""
    shapes = sample_shapes(rng, height, width)
    instance_labels, overlapping = paint_instances(shapes, height, width)
    _absorb_small_pieces(instance_labels, _MIN_PIECE_AREA)
    surviving = np.flatnonzero(np.bincount(instance_labels.ravel(), minlength=len(shapes) + 1)[1:]) + 1
    relabel = np.zeros(len(shapes) + 1, np.int32)  # old id -> new id, so ids run 1..N without gaps
    relabel[surviving] = np.arange(1, surviving.size + 1)
    instance_labels = relabel[instance_labels]
    new_id = {int(old): int(relabel[old]) for old in surviving}
    shapes = [shapes[old - 1] for old in surviving]
    overlapping_pairs = {(new_id[a], new_id[b]) for a, b in overlapping if a in new_id and b in new_id}

    if len(shapes) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(shapes)} objects do not fit uint16 instance labels; use a smaller image")
    class_ids = np.asarray([shape.class_id for shape in shapes], np.uint8)
    semantic_mask = np.concatenate([[0], class_ids]).astype(np.uint8)[instance_labels]

    expected = render_expected_photons(rng, instance_labels, shapes, channels)
    image = to_camera_counts(rng, expected)
    image = image[0] if channels == 1 else np.ascontiguousarray(np.moveaxis(image, 0, -1))
    return DemoSample(
        image=image,
        semantic_mask=semantic_mask,
        instance_labels=instance_labels.astype(np.uint16),
        class_ids=class_ids,
        overlapping_pairs=overlapping_pairs,
        touching_pairs=adjacent_label_pairs(instance_labels),
    )


def instance_annotations(instance_labels: np.ndarray, class_ids: np.ndarray, image_id: int,
                         first_annotation_id: int) -> list[dict]:
    """COCO annotations for (H, W) ``instance_labels``; ``class_ids[i]`` is the category of id i + 1.

    Each visible 4-connected piece of an object gets one closed polygon [x0, y0, x1, y1, ...]
    (pixel-centre coordinates) traced by ``find_contours`` at level 0.5 around the piece with its
    holes filled, since COCO polygons cannot express holes. ``area`` is the visible pixel count and
    ``bbox`` the visible [x, y, width, height].
    """
    annotations = []
    for label_id, window in enumerate(ndimage.find_objects(instance_labels), start=1):
        if window is None:
            continue
        visible = instance_labels[window] == label_id
        pieces, num_pieces = ndimage.label(visible)
        polygons = []
        for piece_id in range(1, num_pieces + 1):
            piece = ndimage.binary_fill_holes(pieces == piece_id)
            # padding closes contours of pieces that touch the window's edge
            contours = measure.find_contours(np.pad(piece, 1).astype(np.float64), 0.5)
            contour = max(contours, key=len)
            xy = np.stack([contour[:, 1] - 1 + window[1].start, contour[:, 0] - 1 + window[0].start], axis=1)
            polygons.append(xy.ravel().tolist())  # multiples of 0.5 on a binary mask
        rows, cols = np.nonzero(visible)
        x0, y0 = int(cols.min()) + window[1].start, int(rows.min()) + window[0].start
        annotations.append({
            "id": first_annotation_id + len(annotations),
            "image_id": image_id,
            "category_id": int(class_ids[label_id - 1]),
            "segmentation": polygons,
            "area": int(visible.sum()),
            "bbox": [x0, y0, int(cols.max() - cols.min()) + 1, int(rows.max() - rows.min()) + 1],
            "iscrowd": 0,
        })
    return annotations


def _write_sample(index: int, output_folder: Path, height: int, width: int, channels: int, seed: int,
                  coco: bool) -> dict:
    """Make sample ``index`` and write its three files; runs in a worker process.

    Returns the paths, the per-object class ids, the pair counts and, with ``coco``, the annotations
    numbered from 1 (the parent renumbers them across images).
    """
    sample = make_sample(np.random.default_rng([seed, index]), height, width, channels)
    stem = f"demo_{index:03d}"
    paths = {"images": output_folder / "images" / f"{stem}.tif",
             "masks": output_folder / "masks" / f"{stem}.png",
             "instances": output_folder / "instances" / f"{stem}.tif"}
    if channels == 1:
        tifffile.imwrite(paths["images"], sample.image, photometric="minisblack")
    else:
        tifffile.imwrite(paths["images"], sample.image, photometric="minisblack", planarconfig="contig")
    Image.fromarray(sample.semantic_mask).save(paths["masks"])
    tifffile.imwrite(paths["instances"], sample.instance_labels, photometric="minisblack")
    logger.debug("%s: %d objects", stem, sample.class_ids.size)
    annotations = (instance_annotations(sample.instance_labels, sample.class_ids, image_id=index + 1,
                                        first_annotation_id=1) if coco else [])
    return {"paths": paths, "class_ids": sample.class_ids, "overlapping_pairs": len(sample.overlapping_pairs),
            "touching_pairs": len(sample.touching_pairs), "annotations": annotations}


def generate(output_folder: str | Path, count: int = 24, height: int = 512, width: int = 512,
             channels: int = 1, seed: int = 0, coco: bool = True, num_workers: int = 1) -> dict:
    """Write ``count`` samples under ``output_folder`` (layout in the module docstring).

    ``num_workers`` processes make the samples; the files do not depend on it, because sample i is
    seeded by (seed, i) alone. Returns a dict with lists of paths ``images``, ``masks``,
    ``instances``, ``coco`` (path or None) and the counts ``num_objects``, ``objects_per_class``
    ({name: n}), ``overlapping_pairs`` and ``touching_pairs`` summed over the set.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if height < 32 or width < 32:
        raise ValueError(f"height and width must be >= 32 px, got {height}x{width}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    output_folder = Path(output_folder)
    for name in ("images", "masks", "instances"):
        (output_folder / name).mkdir(parents=True, exist_ok=True)

    write = functools.partial(_write_sample, output_folder=output_folder, height=height, width=width,
                              channels=channels, seed=seed, coco=coco)
    if num_workers == 1:
        written = [write(index) for index in range(count)]
    else:
        # map() keeps index order and re-raises a worker's exception here, with its traceback
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(num_workers, count)) as pool:
            written = list(pool.map(write, range(count)))

    result: dict = {name: [item["paths"][name] for item in written]
                    for name in ("images", "masks", "instances")}
    all_class_ids = np.concatenate([item["class_ids"] for item in written])
    result["num_objects"] = int(all_class_ids.size)
    result["objects_per_class"] = {name: int(np.count_nonzero(all_class_ids == class_id))
                                   for class_id, name in CLASS_NAMES.items()}
    result["overlapping_pairs"] = sum(item["overlapping_pairs"] for item in written)
    result["touching_pairs"] = sum(item["touching_pairs"] for item in written)
    result["coco"] = None
    if coco:
        annotations = [annotation for item in written for annotation in item["annotations"]]
        for annotation_id, annotation in enumerate(annotations, start=1):
            annotation["id"] = annotation_id
        coco_path = output_folder / "coco.json"
        coco_path.write_text(json.dumps({
            "info": {"description": f"demo_data.py synthetic microscopy, seed {seed}"},
            "images": [{"id": index + 1, "file_name": path.name, "width": width, "height": height}
                       for index, path in enumerate(result["images"])],
            "annotations": annotations,
            "categories": [{"id": class_id, "name": name} for class_id, name in CLASS_NAMES.items()],
        }))
        result["coco"] = coco_path
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_folder", required=True, help="created if missing; files are overwritten")
    parser.add_argument("--count", type=int, default=24, help="number of images")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--channels", type=int, default=1,
                        help="0 whole-cell, 1 membrane, 2 nuclear, 3+ mixtures")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses default_rng([seed, i])")
    parser.add_argument("--coco", type=int, choices=(0, 1), default=1, help="1: also write coco.json")
    parser.add_argument("--num_workers", type=int, default=2,
                        help="processes making samples; the files do not depend on it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    result = generate(args.output_folder, count=args.count, height=args.height, width=args.width,
                      channels=args.channels, seed=args.seed, coco=bool(args.coco),
                      num_workers=args.num_workers)
    per_class = ", ".join(f"{n} {name}" for name, n in result["objects_per_class"].items())
    logger.info("wrote %d images (%dx%d, %d channel(s)) with %d objects (%s) to %s in %.1f s",
                args.count, args.height, args.width, args.channels, result["num_objects"], per_class,
                args.output_folder, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
