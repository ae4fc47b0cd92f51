"""One slide across many processes: ``inference.py --num_blocks N --block_index I``, then ``--assemble 1``.

A SLURM job array (``launch/inference_array.sbatch``) runs task I of N on every image of the folder:

* **Blocks.** The image's tile plan (the one a single-process run uses: ``Segmenter.plan`` or
  ``Detector.plan``) is cut into N blocks of whole rows of tiles, block I holding rows
  ``[I * R // N, (I + 1) * R // N)`` of the R rows. A block runs the model on its tiles only (each
  read with the margin it needs, from the image or by region from a slide), in exactly the batches
  of a single-process run (``core.normalized_batches(wanted=...)``: a batch that straddles two
  blocks is computed by both), so every output pixel is bit for bit the single-process one.
* **Stored.** Task I writes ``OUT/.blocks/NAME/block-000I-of-000N/``: for semantic and boundary
  runs the rows its tiles keep as compressed zarr arrays (``labels``; ``probabilities`` in the dtype
  the single-process run writes: with ``--save_probabilities``, and always for boundary runs, whose
  watershed needs them), for Mask R-CNN runs the tiles' detections before merging
  (``candidates.npz``), and ``block.json``: the settings it was made with (model file, tile and
  batch flags, ...), the source file's size and modification time, its rows. The folder is written
  under a temporary name and renamed when complete: a block is there whole or not at all.
* **Skipped when done.** A resubmitted task (after preemption or a failure) finds its finished
  blocks with the same settings and source and skips them (before loading the model when every one
  is done); a block made with other settings, or of a file changed since, is made again.
* **Assembled.** ``--assemble 1`` (same flags, no model needed) checks that every block of every
  image is there, made with the same settings and covering the image's rows, and refuses (exit 2,
  naming the images and the missing block indices) before writing anything otherwise. It then
  writes the ordinary outputs of a single-process run (labels, probabilities, overlays,
  detections.json, metrics with ``--mask_folder``; pyramidal OME-TIFFs for slides, band by band)
  from the stored blocks: semantic labels and probabilities are copied, Mask R-CNN candidates of all
  blocks are merged across tiles in plan order as one process merges them, boundary probabilities
  are stitched and go through the same watershed. Then the image's blocks are removed.

Memory of the assembly: a slide's semantic outputs stream band by band; Mask R-CNN holds the
detection crops (as a single process does); a boundary run holds the (H, W, 3) probabilities for
the watershed (as a single process does).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from enki_seg.data import tiling
from enki_seg.files import atomic_path, atomic_write_text
from enki_seg.inference import core, instance, watershed

logger = logging.getLogger("inference")

#: Where the blocks of ``OUT`` are stored until assembled.
FOLDER = ".blocks"
#: Rows copied at a time from a stored semantic block when assembling a slide.
ASSEMBLY_ROWS = 512
_KINDS = ("semantic", "boundary", "maskrcnn")


@dataclass(frozen=True)
class Blocks:
    """``--num_blocks`` N and ``--block_index`` I (None: ``--assemble 1``)."""

    count: int
    index: int | None = None


def name(index: int, count: int) -> str:
    return f"block-{index:04d}-of-{count:04d}"


def store(output: Path, image: Path) -> Path:
    """The folder holding the blocks of ``image``."""
    return Path(output) / FOLDER / image.stem


def block_tiles(tiles: list[tiling.Tile], count: int, index: int) -> set[int]:
    """Indices (in ``tiles``) of the tiles of block ``index`` of ``count``: whole rows of tiles."""
    rows = sorted({tile.y for tile in tiles})
    mine = set(rows[index * len(rows) // count : (index + 1) * len(rows) // count])
    return {i for i, tile in enumerate(tiles) if tile.y in mine}


def kept_rows(tiles: list[tiling.Tile], wanted: set[int], height: int) -> tuple[int, int]:
    """The image rows [y0, y1) that the ``wanted`` tiles keep (empty: (0, 0))."""
    chosen = [tiles[i] for i in wanted]
    if not chosen:
        return 0, 0
    y0 = min(tile.keep_y0 for tile in chosen)
    y1 = min(max(tile.keep_y1 for tile in chosen), height)
    return (y0, y1) if y1 > y0 else (0, 0)


def settings(run: core.RunInfo, args) -> dict:
    """What makes a block: the model file and the flags that change tiles, batches or stored outputs.

    Compared when a finished block is found (skipped only when equal) and when assembling (all blocks
    must have the assembly's settings). Flags that only change what the assembly writes (overlays,
    masks, the output format) are not part of it.
    """
    stat = run.model_path.stat()
    kind = "maskrcnn" if run.model_name == instance.MODEL_NAME else ("boundary" if run.instance_target else "semantic")
    return {
        "kind": kind,
        "model": str(run.model_path.resolve()),
        "model_bytes": stat.st_size,
        "model_mtime_ns": stat.st_mtime_ns,
        "precision": args.precision,
        "tile_size": args.tile_size,
        "batch_size": args.batch_size,
        "margin": args.margin if kind != "maskrcnn" else None,
        "tta": getattr(args, "tta", "none") if kind != "maskrcnn" else None,
        "overlap": args.overlap if kind == "maskrcnn" else None,
        "score_threshold": args.score_threshold if kind == "maskrcnn" else None,
        "max_detections": getattr(args, "max_detections", None) if kind == "maskrcnn" else None,
        "probabilities": args.probability_dtype if kind == "semantic" and args.save_probabilities else None,
    }


def _source(path: Path) -> dict:
    stat = Path(path).stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "block.json").read_text())
    except (OSError, ValueError):
        return None


def finished(output: Path, image: Path, blocks: Blocks, made_with: dict) -> bool:
    """True when block ``blocks.index`` of ``image`` is stored, made with ``made_with`` from the file as it is now."""
    meta = _read_meta(store(output, image) / name(blocks.index, blocks.count))
    return meta is not None and meta.get("settings") == made_with and meta.get("source") == _source(image)


def _probability_dtype(kind: str, made_with: dict, tile_wise: bool):
    """The probabilities a block stores: what the single-process run writes (or feeds its watershed)."""
    if kind == "boundary":
        return np.dtype(np.float16)  # Segmenter.probabilities: the float16 softmax, as float32
    if made_with["probabilities"] is None:
        return None
    dtype = np.dtype(made_with["probabilities"])
    return np.dtype(np.float32) if tile_wise and dtype == np.float16 else dtype  # slides: OME-TIFF has no float16


def _zarr_array(path: Path, shape, dtype):
    import zarr

    chunks = (min(256, max(shape[0], 1)), min(4096, max(shape[1], 1)), *shape[2:])
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def _remove_own_leftovers(folder: Path, block: str) -> None:
    """Temporaries of this block index left by a killed task (other indices may be running now)."""
    if folder.is_dir():
        pattern = re.compile(rf"^\.{re.escape(block)}\.tmp-\d+$")
        for p in folder.iterdir():
            if pattern.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- one block


def run_block(job: core.Job, worker, blocks: Blocks, made_with: dict) -> int:
    """Make block ``blocks.index`` of every image of ``job`` with ``worker`` (a ``Segmenter``, ``BoundaryDetector``
    or ``Detector``); finished blocks are skipped. Returns the exit code."""
    import time

    kind = made_with["kind"]
    segmenter = worker.segmenter if kind == "boundary" else worker

    def handle(path: Path, image) -> None:
        block = name(blocks.index, blocks.count)
        folder = store(job.output, path)
        if finished(job.output, path, blocks, made_with):
            logger.info("%s: %s is already done (skipped)", path.name, block)
            return
        height, width = image.shape[:2]
        tiles = segmenter.plan(height, width)
        wanted = block_tiles(tiles, blocks.count, blocks.index)
        y0, y1 = kept_rows(tiles, wanted, height)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_own_leftovers(folder, block)
        with atomic_path(folder / block) as tmp:
            tmp.mkdir()
            if kind == "maskrcnn":
                _save_candidates(tmp / "candidates.npz", worker.candidates(image, wanted=wanted) if wanted
                                 else instance._Candidates.concatenate([]))
            else:
                dtype = _probability_dtype(kind, made_with, getattr(image, "tile_wise", False))
                labels = _zarr_array(tmp / "labels.zarr", (y1 - y0, width), segmenter.label_dtype)
                probabilities = (None if dtype is None else
                                 _zarr_array(tmp / "probabilities.zarr", (y1 - y0, width, segmenter.num_classes), dtype))
                if wanted:
                    for y, band_labels, band_probabilities in segmenter.bands(image, dtype, wanted=wanted):
                        labels[y - y0 : y - y0 + band_labels.shape[0]] = band_labels
                        if probabilities is not None:
                            probabilities[y - y0 : y - y0 + band_labels.shape[0]] = band_probabilities
            meta = {"settings": made_with, "source": _source(path), "block": blocks.index,
                    "num_blocks": blocks.count, "height": height, "width": width, "rows": [y0, y1],
                    "tiles": len(wanted), "probability_dtype": None if kind == "maskrcnn" or dtype is None
                    else dtype.name}
            atomic_write_text(tmp / "block.json", json.dumps(meta, indent=1))
        logger.info("%s: %s done (%d tile(s), rows %d-%d) in %s", path.name, block, len(wanted), y0, y1, folder)

    started = time.perf_counter()
    done = core.process_images(job, handle)
    return core.finish(job, done, time.perf_counter() - started)


def all_finished(job: core.Job, blocks: Blocks, made_with: dict) -> bool:
    """Every image of ``job`` has block ``blocks.index`` done (the task has nothing to do)."""
    return all(finished(job.output, path, blocks, made_with) for path in job.files)


def _save_candidates(path: Path, candidates) -> None:
    shapes = np.array([crop.shape for crop in candidates.masks], np.int64).reshape(-1, 2)
    flat = (np.concatenate([crop.ravel() for crop in candidates.masks]) if candidates.masks
            else np.zeros(0, bool))
    np.savez_compressed(path, tiles=candidates.tiles, boxes=candidates.boxes, scores=candidates.scores,
                        classes=candidates.classes, offsets=candidates.offsets, in_core=candidates.in_core,
                        cut=candidates.cut, shapes=shapes, masks=np.packbits(flat), mask_bits=flat.size)


def _load_candidates(path: Path):
    with np.load(path) as data:
        flat = np.unpackbits(data["masks"], count=int(data["mask_bits"])).astype(bool)
        shapes = data["shapes"]
        ends = np.cumsum(shapes[:, 0] * shapes[:, 1])
        masks = [piece.reshape(shape) for piece, shape in zip(np.split(flat, ends[:-1]) if len(ends) else [], shapes)]
        return instance._Candidates(data["tiles"], data["boxes"], data["scores"], data["classes"], masks,
                                    data["offsets"], data["in_core"], data["cut"])


# ----------------------------------------------------------------------------- assembly


def check_complete(job: core.Job, made_with: dict, count: int | None) -> tuple[int, dict[Path, list[dict]]]:
    """The block count and each image's block metadata, in order; InferenceError naming every gap otherwise.

    ``count``: the ``--num_blocks`` given to the assembly (None: taken from the stored blocks).
    """
    problems: list[str] = []
    found: dict[Path, list[dict]] = {}
    counts = set()
    for path in job.files:
        folder = store(job.output, path)
        metas = [m for m in (_read_meta(p) for p in sorted(folder.glob("block-*-of-*"))) if m] if folder.is_dir() else []
        counts.update(m["num_blocks"] for m in metas)
        found[path] = metas
    if count is None:
        if len(counts) > 1:
            raise core.InferenceError(f"blocks of {len(counts)} different --num_blocks ({sorted(counts)}) are stored "
                                      f"under {Path(job.output) / FOLDER}; pass --num_blocks N to assemble those of N")
        if not counts:
            raise core.InferenceError(f"no blocks are stored under {Path(job.output) / FOLDER}: run the blocks first "
                                      "(inference.py --num_blocks N --block_index I for I = 0..N-1)")
        count = counts.pop()
    for path, metas in found.items():
        metas = {m["block"]: m for m in metas if m["num_blocks"] == count}
        missing = [i for i in range(count) if i not in metas]
        stale = [i for i, m in sorted(metas.items())
                 if m.get("settings") != made_with or m.get("source") != _source(path)]
        if missing:
            problems.append(f"{path.name}: block(s) {_ranges(missing)} of {count} missing")
        if stale:
            changed = sorted({k for i in stale for k in made_with
                              if metas[i].get("settings", {}).get(k) != made_with[k]})
            problems.append(f"{path.name}: block(s) {_ranges(stale)} of {count} were made "
                            + (f"with other settings ({', '.join(changed)})" if changed else "from a file changed since"))
        if not missing and not stale:
            ordered = [metas[i] for i in range(count)]
            rows = [tuple(m["rows"]) for m in ordered if m["rows"][1] > m["rows"][0]]
            height = ordered[0]["height"]
            edges = [0] + [r for pair in rows for r in pair] + [height]  # 0, a0, a1, b0, b1, ..., height
            if any(edges[k] != edges[k + 1] for k in range(0, len(edges), 2)):
                problems.append(f"{path.name}: the stored blocks do not cover its {height} rows")
            found[path] = ordered
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise core.InferenceError(
            f"cannot assemble {Path(job.output)}: {shown}. Run those blocks (inference.py with the same flags and "
            f"--num_blocks {count} --block_index I, or resubmit those array tasks), then assemble again")
    return count, found


def _ranges(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices[:20]) + (" ..." if len(indices) > 20 else "")


def remove(output: Path, paths: list[Path]) -> None:
    """Remove the stored blocks of ``paths`` (assembled), and the blocks folder when nothing else is left."""
    for path in paths:
        shutil.rmtree(store(output, path), ignore_errors=True)
    try:
        (Path(output) / FOLDER).rmdir()
    except OSError:
        pass


class _StoredImage:
    """One image's stored semantic/boundary blocks with the ``Segmenter`` interface that writing uses."""

    def __init__(self, folder: Path, metas: list[dict], num_classes: int, label_dtype):
        self.folder, self.metas = folder, [m for m in metas if m["rows"][1] > m["rows"][0]]
        self.num_classes, self.label_dtype = num_classes, label_dtype

    def plan(self, height: int, width: int) -> list:
        return []  # no tiles to run: no progress bar

    def _arrays(self, meta: dict, what: str):
        import zarr

        return zarr.open_array(str(self.folder / name(meta["block"], meta["num_blocks"]) / f"{what}.zarr"), mode="r")

    def bands(self, image, probability_dtype=None, progress=None):
        """(y, labels, probabilities) row bands of the stored blocks, ``ASSEMBLY_ROWS`` at a time."""
        for meta in self.metas:
            y0, y1 = meta["rows"]
            labels = self._arrays(meta, "labels")
            probabilities = self._arrays(meta, "probabilities") if probability_dtype is not None else None
            if probabilities is not None and probabilities.dtype != np.dtype(probability_dtype):
                raise core.InferenceError(f"{self.folder}: stored probabilities are {probabilities.dtype}, "
                                          f"not {np.dtype(probability_dtype)}")
            for y in range(0, y1 - y0, ASSEMBLY_ROWS):
                yield (y0 + y, np.asarray(labels[y : y + ASSEMBLY_ROWS]),
                       None if probabilities is None else np.asarray(probabilities[y : y + ASSEMBLY_ROWS]))

    def segment(self, image, probabilities=None, progress=None) -> np.ndarray:
        from enki_seg.inference.semantic import _release_pages

        labels = np.zeros(image.shape[:2], self.label_dtype)
        dtype = None if probabilities is None else probabilities.dtype
        for y, band, band_probabilities in self.bands(image, dtype):
            labels[y : y + band.shape[0]] = band
            if probabilities is not None:
                probabilities[:, y : y + band.shape[0]] = np.moveaxis(band_probabilities, -1, 0)
                _release_pages(probabilities)
        return labels

    def probabilities(self, image) -> np.ndarray:
        """The stitched (H, W, K) float32 probabilities (boundary runs: float16 values, as ``Segmenter.probabilities``)."""
        out = np.zeros((*image.shape[:2], self.num_classes), np.float32)
        for y, _, band in self.bands(image, np.float16):
            out[y : y + band.shape[0]] = band
        return out


class AssembledSegmenter:
    """Stands for a ``Segmenter`` in ``semantic.segment_folder``: each image's outputs come from its blocks."""

    def __init__(self, run: core.RunInfo, output: Path, found: dict[Path, list[dict]]):
        self.run, self.output, self.found = run, Path(output), found
        self.num_classes, self.label_dtype = run.num_classes, run.label_dtype

    def for_image(self, path: Path) -> _StoredImage:
        return _StoredImage(store(self.output, path), self.found[path], self.num_classes, self.label_dtype)


class _StoredDetections:
    def __init__(self, folder: Path, metas: list[dict], kind: str, num_classes: int, config):
        self.folder, self.metas, self.kind, self.num_classes, self.config = folder, metas, kind, num_classes, config

    def detect(self, image) -> instance.Detections:
        if self.kind == "maskrcnn":  # all blocks' candidates in plan order, merged as one process merges them
            parts = [_load_candidates(self.folder / name(m["block"], m["num_blocks"]) / "candidates.npz")
                     for m in self.metas]
            return instance.merge(instance._Candidates.concatenate(parts))
        stored = _StoredImage(self.folder, self.metas, self.num_classes, None)
        return watershed.detections_from_probabilities(stored.probabilities(image), self.config)


class AssembledDetector:
    """Stands for a ``Detector``/``BoundaryDetector`` in ``instance.detect_folder``: detections from the blocks."""

    def __init__(self, run: core.RunInfo, output: Path, found: dict[Path, list[dict]], kind: str,
                 config=watershed.WatershedConfig()):
        if kind not in ("maskrcnn", "boundary"):
            raise ValueError(f"not an instance kind: {kind}")
        self.run, self.output, self.found, self.kind, self.config = run, Path(output), found, kind, config

    def for_image(self, path: Path) -> _StoredDetections:
        return _StoredDetections(store(self.output, path), self.found[path], self.kind, self.run.num_classes,
                                 self.config)

