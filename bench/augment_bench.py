"""Benchmark augment.py against NIST-style skimage/scipy augmentation and albumentations.

Measures milliseconds per example for a 256x256 float32 single-channel image plus a uint8 mask under
the default (NIST) AugmentConfig: reflection, rotation, jitter, scale, noise, blur. cv2 runs on one
thread by default because the loader runs one augmentation per worker process.

Usage:
    python bench/augment_bench.py --examples 200 --repeats 3

Prints a table, then as the last line one JSON object (ours_ms, nist_style_ms, albumentations_ms, ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import scipy.ndimage
import skimage.transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import augment  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest is kept")
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads (one per loader worker)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def time_per_example(function: Callable[[int], object], examples: int, repeats: int) -> float:
    """Best-of-repeats mean milliseconds of function(index) over ``examples`` indices."""
    for index in range(min(10, examples)):  # warm caches and lazy imports
        function(index)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(examples):
            function(index)
        best = min(best, (time.perf_counter() - start) / examples)
    return best * 1e3


@dataclasses.dataclass
class NistDraw:
    """The random numbers NIST's augment_image draws for one example."""

    angle_degrees: float
    flip_x: bool
    flip_y: bool
    jitter_x: int
    jitter_y: int
    scale_x: float
    scale_y: float
    noise_sigma: float
    blur_sigma: float


def nist_draw(rng: np.random.Generator, config: augment.AugmentConfig, height: int, width: int) -> NistDraw:
    jitter_x = int(config.jitter * width * rng.random()) * (1 if rng.random() < 0.5 else -1)
    jitter_y = int(config.jitter * height * rng.random()) * (1 if rng.random() < 0.5 else -1)
    return NistDraw(
        angle_degrees=360.0 * rng.random(),
        flip_x=bool(rng.random() < 0.5),
        flip_y=bool(rng.random() < 0.5),
        jitter_x=jitter_x,
        jitter_y=jitter_y,
        scale_x=rng.uniform(1 - config.scale, 1 + config.scale),
        scale_y=rng.uniform(1 - config.scale, 1 + config.scale),
        noise_sigma=config.noise * rng.random(),  # times the image range at apply time, as NIST did
        blur_sigma=config.blur_max_sigma * rng.random(),
    )


def nist_geometric(array: np.ndarray, draw: NistDraw) -> np.ndarray:
    """NIST's apply_affine_transformation: rotate, then a second warp for scale and jitter, then flips."""
    array = skimage.transform.rotate(array, draw.angle_degrees, order=1, preserve_range=True, mode="reflect")
    transform = skimage.transform.AffineTransform(
        translation=(draw.jitter_x, draw.jitter_y), scale=(draw.scale_x, draw.scale_y)
    )
    array = skimage.transform.warp(array, transform.inverse.params, order=1, mode="reflect", preserve_range=True)
    if draw.flip_x:
        array = np.fliplr(array)
    if draw.flip_y:
        array = np.flipud(array)
    return array


def nist_noise(image: np.ndarray, draw: NistDraw, rng: np.random.Generator) -> np.ndarray:
    sigma = draw.noise_sigma * (image.max() - image.min())
    return image + rng.standard_normal(image.shape) * sigma  # float64, as NIST's np.random.randn


def nist_blur(image: np.ndarray, draw: NistDraw) -> np.ndarray:
    return scipy.ndimage.gaussian_filter(image, draw.blur_sigma, mode="reflect")


def nist_example(image: np.ndarray, mask: np.ndarray, draw: NistDraw, rng: np.random.Generator):
    warped = nist_geometric(image.astype(np.float32), draw)
    warped_mask = np.round(nist_geometric(mask.astype(np.float32), draw))  # bilinear labels, rounded
    warped = nist_blur(nist_noise(warped, draw, rng), draw)
    return warped.astype(np.float32), warped_mask.astype(np.float32)


def albumentations_transforms(config: augment.AugmentConfig, seed: int) -> dict[str, object]:
    import albumentations

    affine = albumentations.Affine(
        rotate=(-config.rotation_max_degrees, config.rotation_max_degrees),
        scale={"x": (1 - config.scale, 1 + config.scale), "y": (1 - config.scale, 1 + config.scale)},
        translate_percent={"x": (-config.jitter, config.jitter), "y": (-config.jitter, config.jitter)},
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_REFLECT_101,
        p=1.0,
    )
    flips = [albumentations.HorizontalFlip(p=0.5), albumentations.VerticalFlip(p=0.5)]
    blur = albumentations.GaussianBlur(blur_limit=0, sigma_limit=(0.0, config.blur_max_sigma), p=1.0)
    # std_range is a fraction of the float image maximum (1.0); the bench image spans [0, 1]
    noise = albumentations.GaussNoise(std_range=(0.0, config.noise), p=1.0)
    compose = albumentations.Compose
    return {
        "total": compose([*flips, affine, blur, noise], seed=seed),
        "geometric": compose([*flips, affine], seed=seed),
        "blur": compose([blur], seed=seed),
        "noise": compose([noise], seed=seed),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(args.threads)
    size, examples, repeats = args.size, args.examples, args.repeats
    config = augment.AugmentConfig()
    data_rng = np.random.default_rng(args.seed)
    image = scipy.ndimage.gaussian_filter(data_rng.random((size, size)), 3).astype(np.float32)[:, :, None]
    image = (image - image.min()) / (image.max() - image.min())
    mask = (image[:, :, 0] > 0.5).astype(np.uint8) + (image[:, :, 0] > 0.7).astype(np.uint8)

    all_params = [
        augment.sample_params(np.random.default_rng([args.seed, index]), config, (size, size))
        for index in range(examples)
    ]
    geometric = [dataclasses.replace(p, blur_sigma=0.0, noise_fraction=0.0, noise_seed=None) for p in all_params]
    blur_only = [augment.AugmentParams(shape=p.shape, blur_sigma=p.blur_sigma) for p in all_params]
    noise_only = [
        augment.AugmentParams(shape=p.shape, noise_fraction=p.noise_fraction, noise_seed=p.noise_seed)
        for p in all_params
    ]

    def ours_example(index: int):
        params = augment.sample_params(np.random.default_rng([args.seed, index]), config, (size, size))
        return augment.apply_image(image, params), augment.apply_labels(mask, params)

    ours = {
        "sample": time_per_example(
            lambda i: augment.sample_params(np.random.default_rng([args.seed, i]), config, (size, size)),
            examples,
            repeats,
        ),
        "warp image": time_per_example(lambda i: augment.apply_image(image, geometric[i]), examples, repeats),
        "warp mask": time_per_example(lambda i: augment.apply_labels(mask, all_params[i]), examples, repeats),
        "blur": time_per_example(lambda i: augment.apply_image(image, blur_only[i]), examples, repeats),
        "noise": time_per_example(lambda i: augment.apply_image(image, noise_only[i]), examples, repeats),
        "total": time_per_example(ours_example, examples, repeats),
    }

    draws = [nist_draw(np.random.default_rng([args.seed, index]), config, size, size) for index in range(examples)]
    noise_rng = np.random.default_rng(args.seed)
    image_2d = image[:, :, 0]
    nist = {
        "sample": math.nan,
        "warp image": time_per_example(lambda i: nist_geometric(image_2d, draws[i]), examples, repeats),
        "warp mask": time_per_example(
            lambda i: np.round(nist_geometric(mask.astype(np.float32), draws[i])), examples, repeats
        ),
        "blur": time_per_example(lambda i: nist_blur(image_2d.astype(np.float64), draws[i]), examples, repeats),
        "noise": time_per_example(lambda i: nist_noise(image_2d, draws[i], noise_rng), examples, repeats),
        "total": time_per_example(lambda i: nist_example(image_2d, mask, draws[i], noise_rng), examples, repeats),
    }

    try:
        transforms = albumentations_transforms(config, args.seed)
    except ImportError:
        transforms = None
    albu = dict.fromkeys(ours, math.nan)
    if transforms is not None:
        albu.update(
            {
                "warp image": math.nan,
                "warp mask": math.nan,
                "geometric (image+mask)": time_per_example(
                    lambda i: transforms["geometric"](image=image, mask=mask), examples, repeats
                ),
                "blur": time_per_example(lambda i: transforms["blur"](image=image), examples, repeats),
                "noise": time_per_example(lambda i: transforms["noise"](image=image), examples, repeats),
                "total": time_per_example(lambda i: transforms["total"](image=image, mask=mask), examples, repeats),
            }
        )
    ours["geometric (image+mask)"] = ours["warp image"] + ours["warp mask"]
    nist["geometric (image+mask)"] = nist["warp image"] + nist["warp mask"]

    rows = ["sample", "warp image", "warp mask", "geometric (image+mask)", "blur", "noise", "total"]
    print(f"{size}x{size} float32 image + uint8 mask, default (NIST) config, cv2 threads={args.threads}, "
          f"{examples} examples x {repeats} repeats (best), ms per example")
    print(f"{'step':<24}{'ours':>10}{'nist_style':>12}{'albumentations':>16}")
    for row in rows:
        cells = [ours.get(row, math.nan), nist.get(row, math.nan), albu.get(row, math.nan)]
        text = ["-" if math.isnan(value) else f"{value:.3f}" for value in cells]
        print(f"{row:<24}{text[0]:>10}{text[1]:>12}{text[2]:>16}")
    summary = {
        "ours_ms": round(ours["total"], 4),
        "nist_style_ms": round(nist["total"], 4),
        "albumentations_ms": None if math.isnan(albu["total"]) else round(albu["total"], 4),
        "ours_vs_nist": round(ours["total"] / nist["total"], 4),
        "ours_vs_albumentations": None if math.isnan(albu["total"]) else round(ours["total"] / albu["total"], 4),
        "ours_breakdown_ms": {k: round(v, 4) for k, v in ours.items()},
        "size": size,
        "cv2_threads": args.threads,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
