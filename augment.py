"""Training-time augmentation: sample one random transform, then apply it to image, masks and boxes.

The random part and the deterministic part are separate (as in detectron2):

    params = sample_params(rng, config, (height, width))
    image = apply_image(image, params)                 # (H, W, C) float32
    semantic_mask = apply_labels(semantic_mask, params)  # (H, W) integer, nearest neighbour
    instance_labels, instance_classes = apply_instance_labels(instance_labels, instance_classes, params)
    boxes, box_classes, box_ids = boxes_from_instances(instance_labels, instance_classes)

or, in one call, ``augment_example(rng, config, image, semantic_mask, ...)``.

The geometric part (reflection, rotation, scale, jitter, crop-and-resize) is composed into a single
2x3 affine and applied as ONE ``cv2.warpAffine`` (or one ``cv2.remap`` when the elastic displacement
is on), so the image is interpolated once, not once per transform as in NIST's scripts. Labels use
the same matrix with nearest-neighbour sampling, so a semantic label never takes a value absent from
the input (only 0 can appear, from a "constant" border).

With the "reflect" border the image shows mirror copies of the objects near its edges. The semantic
mask is reflected with it (it labels what the image shows), and so are the instance labels, except
that every mirror copy gets an id of its own (``apply_instance_labels``): an id never covers an
object and its reflection at once.

Coordinates follow OpenCV: a point is (x, y) = (column, row) and pixel centres sit on integers, so
the image centre is ((W - 1) / 2, (H - 1) / 2).

Defaults of ``AugmentConfig`` reproduce NIST's augmentation settings. This module imports neither
TensorFlow nor any project module; nothing here touches the global ``np.random`` state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import scipy.ndimage

logger = logging.getLogger(__name__)

BORDER_MODES = {
    # numpy/skimage "reflect" (mirror without repeating the edge pixel), as NIST's skimage calls used
    "reflect": cv2.BORDER_REFLECT_101,
    "constant": cv2.BORDER_CONSTANT,
}

# Some OpenCV builds limit per-call channel counts (historically 4 for remap/warp); chunking by 4
# costs nothing for the usual C <= 4 and keeps any C working on every build.
_MAX_CV2_CHANNELS = 4

# Below 0.1 px the Gaussian weight of the nearest neighbour is exp(-50) ~ 2e-22: blurring is a no-op.
_MIN_BLUR_SIGMA = 0.1

# A composed matrix this close to identity/flip is treated as exact (float64 round-off only).
_MATRIX_ATOL = 1e-9

# Label dtypes that cv2 nearest-neighbour warping handles natively and exactly.
_CV2_NEAREST_DTYPES = {
    np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)
}


# --------------------------------------------------------------------------------------- config


def _check_range(name: str, value: float, low: float, high: float, high_inclusive: bool) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"AugmentConfig.{name} must be in [{low}, {high}{bracket}, got {value!r}")


@dataclass
class AugmentConfig:
    """Which augmentations are on and how strong they are; defaults equal NIST's settings.

    Geometric (shared by image and labels, fused into one warp):
        reflection_x: flip left-right with probability 0.5.
        reflection_y: flip up-down with probability 0.5.
        rotation: rotate about the image centre by an angle uniform in
            [-rotation_max_degrees, +rotation_max_degrees]; 180 gives NIST's uniform [0, 360).
        rotation_max_degrees: see ``rotation``; in [0, 180].
        jitter: translate by up to this fraction of the field of view per axis (uniform), in [0, 1).
        scale: scale x and y independently by a factor uniform in [1 - scale, 1 + scale], in [0, 1).
        crop_and_resize: 0 = off; else crop a box whose side is a fraction uniform in
            [1 - crop_and_resize, 1] of the field of view (same fraction for both axes, random
            position inside the image) and resize it to the full size. In [0, 1).
        elastic_alpha: 0 = off; else add a smooth random displacement field whose largest
            magnitude per axis is ``elastic_alpha`` pixels.
        elastic_sigma: smoothness (Gaussian sigma, pixels) of the elastic displacement field.
        border_mode: "reflect" (mirror, no repeated edge pixel; mirrored objects get their own
            instance ids) or "constant" (image and labels filled with 0).
    Photometric (image only, in this order, after the warp):
        blur_max_sigma: Gaussian blur with sigma uniform in [0, blur_max_sigma] pixels, each
            channel on its own (never across channels).
        noise: additive Gaussian noise with sigma uniform in [0, noise * (max - min)], the range
            taken per channel. In [0, 1).
        intensity: add an offset uniform in [-intensity, +intensity] * (max - min) per channel
            (NIST's "pixel intensity" augmentation). In [0, 1).
        brightness: multiply by a factor uniform in [1 - brightness, 1 + brightness]. In [0, 1).
    """

    reflection_x: bool = True
    reflection_y: bool = True
    rotation: bool = True
    rotation_max_degrees: float = 180.0
    jitter: float = 0.1
    scale: float = 0.1
    noise: float = 0.02
    blur_max_sigma: float = 2.0
    intensity: float = 0.0
    brightness: float = 0.0
    crop_and_resize: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 10.0
    border_mode: str = "reflect"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError(f"AugmentConfig.{field.name} must be true or false, got {value!r}")
                setattr(self, field.name, bool(value))
            elif field.type == "float":
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                    hint = ""
                    if isinstance(value, str):
                        # PyYAML reads 1e-2 (no dot) as a string
                        hint = " (a string; in YAML write exponents with a dot, e.g. 1.0e-2)"
                    raise ValueError(f"AugmentConfig.{field.name} must be a number, got {value!r}{hint}")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"AugmentConfig.{field.name} must be finite, got {value!r}")
                setattr(self, field.name, value)
        for name in ("jitter", "scale", "noise", "intensity", "brightness", "crop_and_resize"):
            _check_range(name, getattr(self, name), 0.0, 1.0, high_inclusive=False)
        _check_range("rotation_max_degrees", self.rotation_max_degrees, 0.0, 180.0, high_inclusive=True)
        if self.blur_max_sigma < 0:
            raise ValueError(f"AugmentConfig.blur_max_sigma must be >= 0, got {self.blur_max_sigma!r}")
        if self.elastic_alpha < 0:
            raise ValueError(f"AugmentConfig.elastic_alpha must be >= 0, got {self.elastic_alpha!r}")
        if self.elastic_sigma <= 0:
            raise ValueError(f"AugmentConfig.elastic_sigma must be > 0, got {self.elastic_sigma!r}")
        if self.border_mode not in BORDER_MODES:
            raise ValueError(
                f"AugmentConfig.border_mode must be one of {sorted(BORDER_MODES)}, got {self.border_mode!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON/YAML-serialisable values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentConfig:
        """Build from a mapping; missing keys keep their defaults, unknown keys raise ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"augmentation config must be a mapping, got {type(values).__name__}")
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in valid]
        if unknown:
            raise ValueError(
                f"unknown augmentation config key(s) {unknown}; valid keys are: {', '.join(valid)}"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AugmentConfig:
        """Read a flat mapping from a .json, .yaml or .yml file (an empty YAML file gives defaults)."""
        path = os.fspath(path)
        extension = os.path.splitext(path)[1].lower()
        with open(path, encoding="utf-8") as handle:
            if extension == ".json":
                values = json.load(handle)
            elif extension in (".yaml", ".yml"):
                import yaml  # only needed for YAML configs

                values = yaml.safe_load(handle)
                values = {} if values is None else values
            else:
                raise ValueError(f"augmentation config {path!r}: extension must be .json, .yaml or .yml")
        return cls.from_dict(values)

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """A config with every augmentation off (sample_params then gives an identity transform)."""
        return cls(
            reflection_x=False,
            reflection_y=False,
            rotation=False,
            jitter=0.0,
            scale=0.0,
            noise=0.0,
            blur_max_sigma=0.0,
            intensity=0.0,
            brightness=0.0,
            crop_and_resize=0.0,
            elastic_alpha=0.0,
        )

    @property
    def geometric_enabled(self) -> bool:
        """True when some transform moves pixels (and therefore labels and boxes)."""
        return (
            self.reflection_x
            or self.reflection_y
            or (self.rotation and self.rotation_max_degrees > 0)
            or self.jitter > 0
            or self.scale > 0
            or self.crop_and_resize > 0
            or self.elastic_alpha > 0
        )

    @property
    def photometric_enabled(self) -> bool:
        """True when some transform changes image values only (labels untouched)."""
        return self.blur_max_sigma > 0 or self.noise > 0 or self.intensity > 0 or self.brightness > 0

    @property
    def is_identity(self) -> bool:
        """True when every sampled transform is the identity."""
        return not (self.geometric_enabled or self.photometric_enabled)


# ------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """One sampled, deterministic transform; applying it twice gives identical outputs.

    Attributes:
        shape: (H, W) the transform was sampled for; inputs must have this height and width.
        affine: (2, 3) float64 forward matrix mapping an input point (x, y) to its output position,
            or None when the geometric part is the identity.
        elastic_dy, elastic_dx: (H, W) float32 displacement in pixels, in output coordinates, added
            to the source position given by the inverse affine; both None when elastic is off.
        border_mode: "reflect" or "constant".
        blur_sigma: Gaussian blur sigma in pixels (0 = none).
        noise_fraction: noise sigma as a fraction of each channel's range (0 = none).
        noise_seed: seed of the noise generator, or None when noise is off.
        intensity_fraction: additive offset as a fraction of each channel's range (0 = none).
        brightness_factor: multiplicative factor (1 = none).
        image_range: (C or 1, 2) float64 [min, max] per channel given at sampling, or None to
            measure the range of the warped image at apply time (as NIST did).
    """

    shape: tuple[int, int]
    affine: np.ndarray | None = None
    elastic_dy: np.ndarray | None = None
    elastic_dx: np.ndarray | None = None
    border_mode: str = "reflect"
    blur_sigma: float = 0.0
    noise_fraction: float = 0.0
    noise_seed: int | None = None
    intensity_fraction: float = 0.0
    brightness_factor: float = 1.0
    image_range: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "image_range", _normalize_range(self.image_range))
        if self.affine is not None:
            object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64).reshape(2, 3))
        if (self.elastic_dx is None) != (self.elastic_dy is None):
            raise ValueError("elastic_dx and elastic_dy must both be given or both be None")
        if self.border_mode not in BORDER_MODES:
            raise ValueError(f"border_mode must be one of {sorted(BORDER_MODES)}, got {self.border_mode!r}")

    @property
    def is_geometric_identity(self) -> bool:
        """True when pixels stay where they are (labels are then returned unchanged)."""
        return self.affine is None and self.elastic_dx is None

    @property
    def flip_axes(self) -> tuple[int, ...] | None:
        """Axes to np.flip when the transform is a pure reflection, else None."""
        return _pure_flip_axes(self.affine, self.shape) if self.elastic_dx is None else None


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _linear(a: float, b: float, c: float, d: float) -> np.ndarray:
    return np.array([[a, b, 0.0], [c, d, 0.0], [0.0, 0.0, 1.0]])


def _pure_flip_axes(affine: np.ndarray | None, shape: tuple[int, int]) -> tuple[int, ...] | None:
    if affine is None:
        return None
    height, width = shape
    sign_x, sign_y = affine[0, 0], affine[1, 1]
    if abs(affine[0, 1]) > _MATRIX_ATOL or abs(affine[1, 0]) > _MATRIX_ATOL:
        return None
    if abs(abs(sign_x) - 1) > _MATRIX_ATOL or abs(abs(sign_y) - 1) > _MATRIX_ATOL:
        return None
    expected_tx = width - 1 if sign_x < 0 else 0.0
    expected_ty = height - 1 if sign_y < 0 else 0.0
    if abs(affine[0, 2] - expected_tx) > 1e-6 or abs(affine[1, 2] - expected_ty) > 1e-6:
        return None
    axes = tuple(axis for axis, sign in ((0, sign_y), (1, sign_x)) if sign < 0)
    return axes or None


def _normalize_range(image_range: Any) -> np.ndarray | None:
    if image_range is None:
        return None
    value_range = np.asarray(image_range, dtype=np.float64)
    if value_range.ndim == 1:
        value_range = value_range[None, :]
    if value_range.ndim != 2 or value_range.shape[1] != 2:
        raise ValueError(f"image_range must be (min, max) or (C, 2), got shape {np.shape(image_range)}")
    if np.any(value_range[:, 1] < value_range[:, 0]):
        raise ValueError(f"image_range has max < min: {value_range.tolist()}")
    return value_range


def _smooth_displacement(
    rng: np.random.Generator, shape: tuple[int, int], alpha: float, sigma: float
) -> np.ndarray:
    field = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)
    peak = float(np.abs(field).max())
    if peak > 0:
        field *= np.float32(alpha / peak)
    return field


def sample_params(
    rng: np.random.Generator,
    config: AugmentConfig,
    shape: tuple[int, int],
    image_range: Any = None,
) -> AugmentParams:
    """Draw one transform from ``config`` for an image of ``shape`` = (H, W).

    Args:
        rng: the only source of randomness; seed it from the sample identity
            (e.g. ``np.random.default_rng([seed, epoch, index])``).
        config: which augmentations are on.
        shape: (H, W) of the image the transform will be applied to.
        image_range: None (noise and intensity use the range of the warped image per channel at
            apply time), a (min, max) pair for all channels, or a (C, 2) array per channel.

    Transforms that are off draw nothing from ``rng``. The draw order is fixed: reflection x, y;
    crop-and-resize; scale y, x; rotation; jitter y, x; elastic; blur; noise; intensity; brightness.
    """
    height, width = int(shape[0]), int(shape[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"shape must be positive (H, W), got {shape}")
    centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0

    # Forward map, composed right to left: crop-and-resize, reflection, scale, rotation (all about
    # the image centre), then jitter.
    flip_x = config.reflection_x and rng.random() < 0.5
    flip_y = config.reflection_y and rng.random() < 0.5
    if config.crop_and_resize > 0:
        side = rng.uniform(1.0 - config.crop_and_resize, 1.0)
        box_centre_y = centre_y + rng.uniform(-1.0, 1.0) * (1.0 - side) * height / 2.0
        box_centre_x = centre_x + rng.uniform(-1.0, 1.0) * (1.0 - side) * width / 2.0
        # the box of side `side * H` around its centre becomes the full field of view
        forward = _linear(1.0 / side, 0.0, 0.0, 1.0 / side) @ _translation(-box_centre_x, -box_centre_y)
    else:
        forward = _translation(-centre_x, -centre_y)
    if flip_x or flip_y:
        forward = _linear(-1.0 if flip_x else 1.0, 0.0, 0.0, -1.0 if flip_y else 1.0) @ forward
    if config.scale > 0:
        scale_y = rng.uniform(1.0 - config.scale, 1.0 + config.scale)
        scale_x = rng.uniform(1.0 - config.scale, 1.0 + config.scale)
        forward = _linear(scale_x, 0.0, 0.0, scale_y) @ forward
    if config.rotation and config.rotation_max_degrees > 0:
        angle = math.radians(rng.uniform(-config.rotation_max_degrees, config.rotation_max_degrees))
        cos, sin = math.cos(angle), math.sin(angle)
        forward = _linear(cos, -sin, sin, cos) @ forward
    shift_x = shift_y = 0.0
    if config.jitter > 0:
        shift_y = rng.uniform(-config.jitter, config.jitter) * height
        shift_x = rng.uniform(-config.jitter, config.jitter) * width
    forward = _translation(centre_x + shift_x, centre_y + shift_y) @ forward
    affine = forward[:2].copy()
    if np.allclose(affine, np.eye(2, 3), rtol=0.0, atol=_MATRIX_ATOL):
        affine = None

    elastic_dy = elastic_dx = None
    if config.elastic_alpha > 0:
        elastic_dy = _smooth_displacement(rng, (height, width), config.elastic_alpha, config.elastic_sigma)
        elastic_dx = _smooth_displacement(rng, (height, width), config.elastic_alpha, config.elastic_sigma)

    blur_sigma = float(rng.uniform(0.0, config.blur_max_sigma)) if config.blur_max_sigma > 0 else 0.0
    noise_fraction, noise_seed = 0.0, None
    if config.noise > 0:
        noise_fraction = float(rng.uniform(0.0, config.noise))
        noise_seed = int(rng.integers(0, 2**31 - 1))
    intensity_fraction = float(rng.uniform(-config.intensity, config.intensity)) if config.intensity > 0 else 0.0
    brightness_factor = (
        float(rng.uniform(1.0 - config.brightness, 1.0 + config.brightness)) if config.brightness > 0 else 1.0
    )
    return AugmentParams(
        shape=(height, width),
        affine=affine,
        elastic_dy=elastic_dy,
        elastic_dx=elastic_dx,
        border_mode=config.border_mode,
        blur_sigma=blur_sigma,
        noise_fraction=noise_fraction,
        noise_seed=noise_seed,
        intensity_fraction=intensity_fraction,
        brightness_factor=brightness_factor,
        image_range=image_range,
    )


# ------------------------------------------------------------------------------------- applying


def _check_shape(array: np.ndarray, params: AugmentParams, what: str) -> None:
    if tuple(array.shape[:2]) != tuple(params.shape):
        raise ValueError(f"{what} has shape {array.shape}, but params were sampled for (H, W) = {params.shape}")


def _source_maps(params: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 source x and y of every output pixel: inverse affine of the grid + displacement."""
    height, width = params.shape
    inverse = np.eye(2, 3) if params.affine is None else cv2.invertAffineTransform(params.affine)
    inverse = inverse.astype(np.float32)
    columns = np.arange(width, dtype=np.float32)[None, :]
    rows = np.arange(height, dtype=np.float32)[:, None]
    map_x = inverse[0, 0] * columns + (inverse[0, 1] * rows + inverse[0, 2])
    map_y = inverse[1, 0] * columns + (inverse[1, 1] * rows + inverse[1, 2])
    if params.elastic_dx is not None:
        map_x += params.elastic_dx
        map_y += params.elastic_dy
    return map_x, map_y


def _nearest_source_map(params: AugmentParams) -> np.ndarray:
    """(H, W, 2) int16 (x, y) of the input pixel centre nearest to each output pixel's source point.

    Labels are looked up through this explicit integer map rather than cv2's INTER_NEAREST warp,
    whose rounding differs between dtypes (uint8/uint16/float32 vs int16/int32 disagree on ~0.1 % of
    pixels in OpenCV 5), so a semantic mask and an instance map of another dtype could drift apart.
    """
    map_x, map_y = _source_maps(params)
    return cv2.convertMaps(map_x, map_y, cv2.CV_16SC2, nninterpolation=True)[0]


def _warp_image_chunk(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """One bilinear warp of an (H, W, <= 4) float32 array; returns a new array of the same shape."""
    height, width = params.shape
    border = BORDER_MODES[params.border_mode]
    if params.elastic_dx is not None:
        map_x, map_y = _source_maps(params)
        warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=border, borderValue=0.0)
    else:
        warped = cv2.warpAffine(
            image, params.affine, (width, height), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0.0
        )
    return warped.reshape(image.shape)  # cv2 drops a trailing channel axis of size 1


def _warp_channels(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    if image.shape[2] <= _MAX_CV2_CHANNELS:
        return _warp_image_chunk(image, params)
    chunks = [
        _warp_image_chunk(np.ascontiguousarray(image[:, :, start : start + _MAX_CV2_CHANNELS]), params)
        for start in range(0, image.shape[2], _MAX_CV2_CHANNELS)
    ]
    return np.concatenate(chunks, axis=2)


def _blur_channels(image: np.ndarray, sigma: float) -> np.ndarray:
    # cv2.GaussianBlur filters each channel independently; it never mixes channels.
    def blur(chunk: np.ndarray) -> np.ndarray:
        blurred = cv2.GaussianBlur(chunk, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        return blurred.reshape(chunk.shape)

    if image.shape[2] <= _MAX_CV2_CHANNELS:
        return blur(image)
    chunks = [
        blur(np.ascontiguousarray(image[:, :, start : start + _MAX_CV2_CHANNELS]))
        for start in range(0, image.shape[2], _MAX_CV2_CHANNELS)
    ]
    return np.concatenate(chunks, axis=2)


def _channel_range(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """(C,) float32 max - min per channel, from params.image_range or measured on ``image``."""
    channels = image.shape[2]
    if params.image_range is not None:
        value_range = params.image_range
        if value_range.shape[0] not in (1, channels):
            raise ValueError(f"image_range has {value_range.shape[0]} channels, image has {channels}")
        span = value_range[:, 1] - value_range[:, 0]
        return np.broadcast_to(span, (channels,)).astype(np.float32)
    flat = image.reshape(-1, channels)
    return (flat.max(axis=0) - flat.min(axis=0)).astype(np.float32)


def _gaussian_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise, a pure function of ``seed``.

    cv2.randn is ~4x faster than numpy's float32 normal sampler (0.2 vs 0.9 ms for 256x256), and
    noise was the largest single cost of the default augmentation. cv2's generator is per thread,
    so seeding it right before the draw keeps this deterministic in any thread or process.
    """
    noise = np.empty(shape, np.float32)
    cv2.setRNGSeed(int(seed))
    cv2.randn(noise.reshape(-1, 1), 0.0, 1.0)
    return noise


def apply_image(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply ``params`` to an image.

    Args:
        image: (H, W, C) array, any C >= 1 (an (H, W) array is accepted and returned as (H, W)); any
            real dtype, converted to float32. Not modified.
        params: from ``sample_params`` for this (H, W).

    Returns:
        A new (H, W, C) (or (H, W)) float32 array: one bilinear warp (skipped when the geometric part is
        the identity, np.flip for a pure reflection), then blur, noise, intensity offset, brightness.
    """
    image = np.asarray(image)
    _check_shape(image, params, "image")
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    squeeze = image.ndim == 2
    if squeeze:
        image = image[:, :, None]

    flip_axes = params.flip_axes
    if params.is_geometric_identity:
        result = np.array(image, dtype=np.float32, copy=True)
    elif flip_axes is not None:
        result = np.array(np.flip(image, axis=flip_axes), dtype=np.float32, order="C", copy=True)
    else:
        result = _warp_channels(np.ascontiguousarray(image, dtype=np.float32), params)

    needs_range = params.noise_fraction > 0 or params.intensity_fraction != 0
    span = _channel_range(result, params) if needs_range else None
    if params.blur_sigma >= _MIN_BLUR_SIGMA:
        result = _blur_channels(result, params.blur_sigma)
    if params.noise_fraction > 0 and params.noise_seed is not None:
        noise = _gaussian_noise(params.noise_seed, result.shape)
        noise *= np.float32(params.noise_fraction) * span
        result += noise
    if params.intensity_fraction != 0:
        result += np.float32(params.intensity_fraction) * span
    if params.brightness_factor != 1.0:
        result *= np.float32(params.brightness_factor)
    return result[:, :, 0] if squeeze else result


def _warp_labels_cv2(labels: np.ndarray, params: AugmentParams, fill: int) -> np.ndarray:
    if max(params.shape) >= 2**15:
        raise ValueError(f"label maps must be smaller than 32768 pixels per side, got {params.shape}")
    return cv2.remap(
        np.ascontiguousarray(labels),
        _nearest_source_map(params),
        None,
        cv2.INTER_NEAREST,
        borderMode=BORDER_MODES[params.border_mode],
        borderValue=float(fill),
    )


def apply_labels(labels: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply the geometric part of ``params`` to a label map with nearest-neighbour sampling.

    Args:
        labels: (H, W) integer or bool array, e.g. semantic classes (instance ids go through
            ``apply_instance_labels``, which gives mirror copies ids of their own). Not modified.
        params: the same params given to ``apply_image``; output pixel centres sample exactly the
            source positions the image warp uses.

    Returns:
        A new (H, W) array of the same dtype whose values all occur in ``labels`` (plus 0 with a
        "constant" border). Photometric parts of ``params`` do not apply.

    Each output pixel takes the label of the input pixel centre nearest to the point the image warp
    samples (exact ties round half to even, as cvRound), through one integer lookup map shared by
    every dtype, so masks of different dtypes stay identical. uint8/int8/uint16/int16/int32 are
    looked up directly; other integer dtypes (uint32, int64, ...) as int32 when their values fit
    (exact), else through a table of their distinct values. Labels never pass through float32
    (exact only up to 2**24). Label maps must be smaller than 32768 pixels per side (int16 map).
    """
    labels = np.asarray(labels)
    _check_shape(labels, params, "labels")
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if params.is_geometric_identity:
        return labels.copy()
    flip_axes = params.flip_axes
    if flip_axes is not None:
        return np.flip(labels, axis=flip_axes).copy()  # copy() is C-ordered, never a view of the input

    if labels.dtype in _CV2_NEAREST_DTYPES:
        return _warp_labels_cv2(labels, params, fill=0)
    if labels.dtype == np.bool_:
        return _warp_labels_cv2(labels.view(np.uint8), params, fill=0).view(np.bool_)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must have an integer or bool dtype, got {labels.dtype}")
    int32_info = np.iinfo(np.int32)
    if labels.size == 0 or (labels.min() >= int32_info.min and labels.max() <= int32_info.max):
        return _warp_labels_cv2(labels.astype(np.int32), params, fill=0).astype(labels.dtype)
    # Values beyond int32: warp indices into the sorted distinct values (0 included for the border).
    logger.debug("labels of dtype %s exceed int32; warping through a lookup table", labels.dtype)
    values = np.union1d(np.unique(labels), np.zeros(1, dtype=labels.dtype))
    indices = np.searchsorted(values, labels).astype(np.int32)
    zero_index = int(np.searchsorted(values, 0))
    return values[_warp_labels_cv2(indices, params, fill=zero_index)]


def _mirror_copy_index(position: np.ndarray, size: int) -> np.ndarray:
    """Which copy of the image a source coordinate falls in under "reflect" (BORDER_REFLECT_101).

    0 is the image itself, [0, size - 1]; -1 the reflection beyond its first row/column,
    [-(size - 1), -1]; +1 the one beyond its last, [size, 2 * (size - 1)]; and so on outwards.
    BORDER_REFLECT_101 does not repeat the mirror axes (rows/columns 0 and size - 1): they belong
    to the image itself.
    """
    period = max(size - 1, 1)
    return np.where(position > 0, (position - 1) // period, position // period)


def apply_instance_labels(
    instance_labels: np.ndarray, instance_classes: np.ndarray, params: AugmentParams
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the geometric part of ``params`` to an instance-label map; mirror copies get new ids.

    Args:
        instance_labels: (H, W) non-negative integer array; 0 is background, id i >= 1 is the object
            of class ``instance_classes[i - 1]``. Not modified.
        instance_classes: (N,) integer class of each id; ids above N raise ValueError.
        params: the same params given to ``apply_image`` and ``apply_labels``.

    Returns:
        instance_labels: (H, W) int32. A pixel whose source lies in the image keeps its id; with the
            "reflect" border, a pixel showing a mirror copy of object i gets id N + k, one new id per
            (object, copy), numbered in order of (i, copy row, copy column).
        instance_classes: (N + K,) the input classes followed by the class of each new id (that of
            the object it mirrors).

    Why new ids rather than the source id or 0: a mirror copy is a real-looking object in the image
    (and foreground in the reflected semantic mask). Keeping the source id made one id cover the
    object and its reflection, so the box spanned both and the Mask R-CNN mask target trained on two
    pieces; labelling the copy background (a constant-0 border) would teach the detector to reject
    objects the image plainly shows. So every copy is an object of its own, with the class of the
    original, and ``instance_labels > 0`` equals the warped semantic foreground. The price: an object
    cut by the image edge meets its reflection along that edge, and the two halves are labelled as
    two touching objects, as touching nuclei are.
    """
    instance_labels = np.asarray(instance_labels)
    instance_classes = np.asarray(instance_classes)
    _check_shape(instance_labels, params, "instance_labels")
    if instance_labels.ndim != 2:
        raise ValueError(f"instance_labels must be (H, W), got shape {instance_labels.shape}")
    if not np.issubdtype(instance_labels.dtype, np.integer):
        raise TypeError(f"instance_labels must have an integer dtype, got {instance_labels.dtype}")
    num_instances = len(instance_classes)
    if instance_labels.size and (instance_labels.min() < 0 or instance_labels.max() > num_instances):
        raise ValueError(
            f"instance ids must be in 0..{num_instances} (one class each), found "
            f"{int(instance_labels.min())}..{int(instance_labels.max())}"
        )
    warped = apply_labels(instance_labels, params).astype(np.int32)
    if params.border_mode != "reflect" or params.is_geometric_identity or params.flip_axes is not None:
        return warped, instance_classes.copy()  # no pixel comes from a reflection

    # The same nearest source pixels as apply_labels used, before the border folds them back inside.
    source = _nearest_source_map(params)
    source_x, source_y = source[:, :, 0], source[:, :, 1]  # int16
    height, width = params.shape
    mirrored = (warped > 0) & ((source_x < 0) | (source_x >= width) | (source_y < 0) | (source_y >= height))
    if not mirrored.any():
        return warped, instance_classes.copy()
    # one integer key per (source id, copy row, copy column), ordered as that tuple
    copy_row = _mirror_copy_index(source_y[mirrored].astype(np.int64), height)
    copy_column = _mirror_copy_index(source_x[mirrored].astype(np.int64), width)
    copy_row -= copy_row.min()
    copy_column -= copy_column.min()
    rows, columns = int(copy_row.max()) + 1, int(copy_column.max()) + 1
    keys = (warped[mirrored].astype(np.int64) * rows + copy_row) * columns + copy_column
    unique_keys, copy_index = np.unique(keys, return_inverse=True)
    warped[mirrored] = num_instances + 1 + copy_index.reshape(-1)
    mirrored_ids = unique_keys // (rows * columns)
    return warped, np.concatenate([instance_classes, instance_classes[mirrored_ids - 1]])


def boxes_from_instances(
    instance_labels: np.ndarray, instance_classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tight boxes of the instances present in a label map.

    Args:
        instance_labels: (H, W) non-negative integer array; 0 is background, instance id i >= 1.
        instance_classes: (N,) integer array; instance id i has class ``instance_classes[i - 1]``.
            Ids above N raise ValueError.

    Returns:
        boxes: (M, 4) float32 [y0, x0, y1, x1] in pixels, y1/x1 exclusive.
        classes: (M,) int32 class of each box.
        ids: (M,) int32 instance id of each box, ascending; ids absent from the map are dropped.
    """
    instance_labels = np.asarray(instance_labels)
    instance_classes = np.asarray(instance_classes)
    if instance_labels.ndim != 2:
        raise ValueError(f"instance_labels must be (H, W), got shape {instance_labels.shape}")
    if not np.issubdtype(instance_labels.dtype, np.integer):
        raise TypeError(f"instance_labels must have an integer dtype, got {instance_labels.dtype}")
    num_instances = len(instance_classes)
    if instance_labels.size:
        lowest, highest = int(instance_labels.min()), int(instance_labels.max())
        if lowest < 0:
            raise ValueError(f"instance_labels must be >= 0, found {lowest}")
        if highest > num_instances:
            raise ValueError(f"instance id {highest} has no class: instance_classes has {num_instances} entries")
    slices = scipy.ndimage.find_objects(instance_labels, max_label=num_instances) if num_instances else []
    ids = np.array([index + 1 for index, found in enumerate(slices) if found is not None], dtype=np.int32)
    boxes = np.array(
        [[rows.start, columns.start, rows.stop, columns.stop] for rows, columns in (slices[i - 1] for i in ids)],
        dtype=np.float32,
    ).reshape(-1, 4)
    classes = instance_classes[ids - 1].astype(np.int32) if len(ids) else np.zeros(0, dtype=np.int32)
    return boxes, classes, ids


def augment_example(
    rng: np.random.Generator,
    config: AugmentConfig,
    image: np.ndarray,
    semantic_mask: np.ndarray | None,
    instance_labels: np.ndarray | None = None,
    instance_classes: np.ndarray | None = None,
    image_range: Any = None,
) -> dict[str, np.ndarray | None]:
    """Sample one transform and apply it to the image and every label map of one example.

    Args:
        rng: per-sample generator.
        config: augmentation settings.
        image: (H, W, C) float32 (any real dtype accepted).
        semantic_mask: (H, W) integer class map, or None.
        instance_labels: (H, W) integer instance ids (0 background), or None.
        instance_classes: (N,) int class per instance id (id i -> instance_classes[i - 1]); required
            with instance_labels.
        image_range: forwarded to ``sample_params``.

    Returns:
        dict with "image" (H, W, C) float32, "semantic_mask" (H, W) same dtype or None,
        "instance_labels" (H, W) int32 or None and "instance_classes" (N + K,) or None (see
        ``apply_instance_labels``: mirror copies get ids above N), and, when instance_labels is
        given, "boxes" (M, 4) float32 [y0, x0, y1, x1], "box_classes" (M,) int32 and "box_ids" (M,)
        int32 recomputed from the warped instance labels (else None).
    """
    if instance_labels is not None and instance_classes is None:
        raise ValueError("instance_classes is required when instance_labels is given")
    params = sample_params(rng, config, np.shape(image)[:2], image_range=image_range)
    result: dict[str, np.ndarray | None] = {
        "image": apply_image(image, params),
        "semantic_mask": None if semantic_mask is None else apply_labels(semantic_mask, params),
        "instance_labels": None,
        "instance_classes": None,
        "boxes": None,
        "box_classes": None,
        "box_ids": None,
    }
    if instance_labels is not None:
        warped, classes = apply_instance_labels(instance_labels, instance_classes, params)
        boxes, box_classes, box_ids = boxes_from_instances(warped, classes)
        result.update(instance_labels=warped, instance_classes=classes)
        result.update(boxes=boxes, box_classes=box_classes, box_ids=box_ids)
    return result
