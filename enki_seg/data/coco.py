"""Converts COCO instance annotations (polygons and RLE) into instance-label and semantic-mask arrays.

Categories are remapped to contiguous class ids starting at 1 (sorted by COCO category id), as TAO
requires; 0 is background. Annotations that cannot be used are skipped and reported, like TAO's
``dataset_convert`` warnings: crowd regions, unknown categories, malformed or empty segmentations,
and objects entirely outside the image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from enki_seg.data.image_io import InputError


@dataclass
class CocoImage:
    """One COCO image entry with its usable annotations."""

    image_id: int
    file_name: str
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)


@dataclass
class CocoDataset:
    images: dict[str, CocoImage]            # keyed by file stem
    class_ids: dict[int, int]               # COCO category id -> contiguous class id (1..K)
    class_names: dict[int, str]             # contiguous class id -> category name
    warnings: list[str]                     # one line per skipped annotation


def load(path: str | Path) -> CocoDataset:
    """Parse a COCO instances JSON file; raises InputError naming the file on structural errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"COCO file {path} does not exist; check --coco_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"COCO file {path} is not valid JSON ({exc}); re-export it") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise InputError(f"COCO file {path} has no '{key}' list; is it an instances file?")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_ids = {c["id"]: i + 1 for i, c in enumerate(categories)}
    class_names = {i + 1: str(c.get("name", c["id"])) for i, c in enumerate(categories)}
    images: dict[str, CocoImage] = {}
    by_id: dict[int, CocoImage] = {}
    for entry in data["images"]:
        try:
            img = CocoImage(int(entry["id"]), str(entry["file_name"]), int(entry["height"]),
                            int(entry["width"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"COCO file {path}: image entry {entry!r} lacks id/file_name/height/width") from None
        stem = Path(img.file_name).stem
        if stem in images:
            raise InputError(f"COCO file {path}: two images named {stem!r}; file stems must be unique")
        images[stem] = img
        by_id[img.image_id] = img
    warnings: list[str] = []
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        img = by_id.get(ann.get("image_id"))
        if img is None:
            warnings.append(f"annotation {ann_id}: image_id {ann.get('image_id')} not in images; skipped")
        elif ann.get("category_id") not in class_ids:
            warnings.append(f"annotation {ann_id} ({img.file_name}): unknown category_id "
                            f"{ann.get('category_id')}; skipped")
        elif ann.get("iscrowd", 0):
            warnings.append(f"annotation {ann_id} ({img.file_name}): crowd region; skipped")
        elif "segmentation" not in ann:
            warnings.append(f"annotation {ann_id} ({img.file_name}): no segmentation; skipped")
        else:
            img.annotations.append(ann)
    return CocoDataset(images, class_ids, class_names, warnings)


def decode_rle(counts, height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (list of run lengths, or the compressed string form) into (H, W) bool.

    The runs must cover the image exactly; anything else raises ValueError.
    """
    # pycocotools checks neither form fully: it keeps runs as uint32 (a negative run wraps around)
    # and leaves the pixels after the last run undefined
    if isinstance(counts, list):
        if not all(isinstance(run, int) and run >= 0 for run in counts) or sum(counts) != height * width:
            raise ValueError(f"RLE runs must be non-negative integers adding up to {height}x{width} pixels")
        return mask_util.decode(mask_util.frPyObjects(
            {"size": [height, width], "counts": counts}, height, width)).astype(bool)
    if not isinstance(counts, str):
        raise TypeError(f"RLE counts must be a list or a string, not {type(counts).__name__}")
    string = counts.encode("ascii")
    try:
        mask = mask_util.decode({"size": [height, width], "counts": string})
    except ValueError:  # pycocotools' "Invalid RLE mask representation"
        raise ValueError(f"RLE string is malformed or runs past the {height}x{width} image") from None
    # re-encoding gives the same string only when every pixel was decoded (and the string is in the
    # form pycocotools writes): catches a string that stops short of the last pixel
    if mask_util.encode(mask)["counts"] != string:
        raise ValueError(f"RLE string does not cover the {height}x{width} image")
    return mask.astype(bool)


def _polygon_mask(polygons, height: int, width: int) -> np.ndarray:
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        coords = np.asarray(poly, dtype=np.float64)
        if coords.ndim != 1 or coords.size < 6 or coords.size % 2:
            raise ValueError("polygon needs an even number (>= 6) of coordinates")
        rr, cc = draw_polygon(coords[1::2], coords[0::2], shape=(height, width))
        mask[rr, cc] = True
    return mask


def rasterize(image: CocoImage, dataset: CocoDataset, height: int, width: int,
              warnings: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance labels (H, W) int32, semantic mask (H, W) uint8/uint16, classes (N,) int32.

    Larger objects are drawn first, so where objects overlap the smaller one stays visible. Objects
    left with no visible pixel are dropped and reported in ``warnings``.
    """
    if (image.height, image.width) != (height, width):
        raise InputError(
            f"COCO entry {image.file_name} says {image.height}x{image.width} but the image file is "
            f"{height}x{width}; fix the JSON or the file"
        )
    drawn = []
    for ann in image.annotations:
        seg = ann["segmentation"]
        try:
            if isinstance(seg, dict):
                size = seg.get("size", [height, width])
                if list(size) != [height, width]:
                    raise ValueError(f"RLE size {size} != image size {[height, width]}")
                mask = decode_rle(seg["counts"], height, width)
            else:
                mask = _polygon_mask(seg, height, width)
        except (ValueError, KeyError, TypeError) as exc:
            warnings.append(f"annotation {ann.get('id', '?')} ({image.file_name}): malformed "
                            f"segmentation ({exc}); skipped")
            continue
        if not mask.any():
            warnings.append(f"annotation {ann.get('id', '?')} ({image.file_name}): empty or out of "
                            "bounds; skipped")
            continue
        drawn.append((int(mask.sum()), mask, dataset.class_ids[ann["category_id"]], ann.get("id", "?")))
    drawn.sort(key=lambda item: -item[0])
    instance = np.zeros((height, width), np.int32)
    for i, (_, mask, _, _) in enumerate(drawn):
        instance[mask] = i + 1
    visible = np.bincount(instance.ravel(), minlength=len(drawn) + 1)
    classes_all = np.array([0] + [c for _, _, c, _ in drawn], np.int32)
    keep = [i for i in range(1, len(drawn) + 1) if visible[i] > 0]
    for i in range(1, len(drawn) + 1):
        if visible[i] == 0:
            warnings.append(f"annotation {drawn[i - 1][3]} ({image.file_name}): fully covered by other "
                            "objects; skipped")
    relabel = np.zeros(len(drawn) + 1, np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1)
    instance = relabel[instance]
    semantic = classes_all[np.asarray([0] + keep, np.int64)][instance]
    max_class = max(dataset.class_ids.values(), default=0)
    semantic = semantic.astype(np.uint8 if max_class < 256 else np.uint16)
    return instance, semantic, classes_all[keep].astype(np.int32)
