"""Finds the builder's sources (each image with its labels) and splits them into train and test.

The split is made by source image before tiling, from a seed, so no image contributes to both
databases and the same seed gives the same split.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enki_seg.data import coco
from enki_seg.data import image_io
from enki_seg.data.image_io import InputError

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """One source image and its labels; ``coco_entry`` is set for COCO input."""

    stem: str
    image: Path
    mask: Path | None = None
    instance: Path | None = None
    coco_entry: coco.CocoImage | None = None


def discover(image_folder, image_format: str, *, mask_folder=None, instance_folder=None, coco_json=None,
             skip_bad: bool = False, skipped: list[str] | None = None
             ) -> tuple[list[Source], coco.CocoDataset | None]:
    """Pair every image with its labels (matched by file stem) or its COCO entry.

    A missing partner raises InputError, or with ``skip_bad`` is logged, appended to ``skipped``
    and the image left out. Returns the sources and the parsed COCO file (None without one).
    """
    skipped = [] if skipped is None else skipped
    images = image_io.list_images(image_folder, image_format)
    sources = []
    if coco_json:
        dataset = coco.load(coco_json)
        for path in images:
            entry = dataset.images.get(path.stem)
            if entry is None:
                _bad(skip_bad, skipped, f"image {path} has no entry in {coco_json}; add it or remove "
                     "the image")
                continue
            sources.append(Source(path.stem, path, coco_entry=entry))
        return sources, dataset
    masks = image_io.index_by_stem(mask_folder, "mask") if mask_folder else None
    instances = image_io.index_by_stem(instance_folder, "instance") if instance_folder else None
    for path in images:
        mask = inst = None
        if masks is not None:
            mask = masks.get(path.stem)
            if mask is None:
                _bad(skip_bad, skipped, f"image {path} has no mask named {path.stem}.* in {mask_folder}; "
                     "add the mask or remove the image")
                continue
        if instances is not None:
            inst = instances.get(path.stem)
            if inst is None:
                _bad(skip_bad, skipped, f"image {path} has no instance labels named {path.stem}.* in "
                     f"{instance_folder}; add them or remove the image")
                continue
        sources.append(Source(path.stem, path, mask, inst))
    return sources, None


def _bad(skip_bad: bool, skipped: list[str], message: str) -> None:
    if not skip_bad:
        raise InputError(message)
    logger.warning("skipping: %s", message)
    skipped.append(message)


def split_sources(sources: list[Source], train_fraction: float, seed: int
                  ) -> tuple[list[Source], list[Source]]:
    """Seeded split by source image (before tiling, so no image leaks into both sets); each side sorted
    by file stem."""
    order = sorted(sources, key=lambda s: s.stem)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_train = int(round(train_fraction * len(order)))
    train = sorted((order[i] for i in perm[:n_train]), key=lambda s: s.stem)
    test = sorted((order[i] for i in perm[n_train:]), key=lambda s: s.stem)
    return train, test
