"""Builds a train/test pair of LMDB databases from a folder of sources, all or nothing.

``build(BuildConfig(...))`` checks the settings, pairs images with labels (``sources.py``), splits
them by source image, converts them in a worker pool (``convert.py``) and writes the databases and
the manifest (``writer.py``). Everything is written to a hidden ``.build-NAME-PID`` folder inside
the output folder and renamed into place only when complete: a killed build never leaves a
database that looks finished, and the next build removes the leftovers of a dead one.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from enki_seg.data import records
from enki_seg.data.convert import ConvertOptions, convert_task
from enki_seg.data.image_io import InputError
from enki_seg.data.sources import Source, discover, split_sources
from enki_seg.data.writer import MIN_MAP_SIZE, LmdbWriter, SplitAccumulator, write_manifest

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".build-"
_PATH_FIELDS = ("image_folder", "mask_folder", "instance_folder", "coco_json", "output_folder")


def default_workers() -> int:
    """The CPUs this process may use, at most 8."""
    return min(8, len(os.sched_getaffinity(0)))


@dataclass(kw_only=True)
class BuildConfig:
    """The settings of one build; the fields are the flags of ``build_lmdb.py`` (see its --help)."""

    image_folder: str
    mask_folder: str | None = None
    instance_folder: str | None = None
    coco_json: str | None = None
    output_folder: str
    dataset_name: str = "dataset"
    train_fraction: float = 0.8
    image_format: str = "tif"
    use_tiling: int = 0  # 0/1 like the flags, as build_args records them
    tile_size: int = 256
    tile_overlap: int = 0
    size_multiple: int = 16
    number_classes: int | None = None
    seed: int = 0
    compression: str = "none"
    workers: int = field(default_factory=default_workers)
    skip_bad: int = 0
    overwrite: int = 0
    quiet: bool = False

    def check(self) -> None:
        """Setting errors that need no file access; raises InputError."""
        if self.coco_json is None and self.mask_folder is None and self.instance_folder is None:
            raise InputError("give --mask_folder (semantic masks), --instance_folder, or --coco_json")
        if self.coco_json is not None and (self.mask_folder or self.instance_folder):
            raise InputError("--coco_json replaces --mask_folder/--instance_folder; give one or the other")
        if not 0.0 < self.train_fraction < 1.0:
            raise InputError(f"--train_fraction {self.train_fraction} must be in (0, 1): both databases "
                             "need at least one image")
        if self.size_multiple < 1:
            raise InputError(f"--size_multiple {self.size_multiple} must be >= 1")
        if self.use_tiling:
            if self.tile_size <= 0 or self.tile_size % self.size_multiple:
                raise InputError(
                    f"--tile_size {self.tile_size} is not a multiple of --size_multiple "
                    f"{self.size_multiple}; use e.g. {max(1, round(self.tile_size / self.size_multiple)) * self.size_multiple}"
                )
            if not 0 <= self.tile_overlap < self.tile_size:
                raise InputError(f"--tile_overlap {self.tile_overlap} must be in [0, --tile_size)")
        if self.number_classes is not None and self.number_classes < 1:
            raise InputError(f"--number_classes {self.number_classes} must be >= 1")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers} must be >= 1")
        if not self.dataset_name or "/" in self.dataset_name:
            raise InputError(f"--dataset_name {self.dataset_name!r} must be a plain, non-empty name")

    def recorded(self) -> dict:
        """The settings as stored in each database's metadata (``build_args``), input paths absolute."""
        out = asdict(self)
        for key in _PATH_FIELDS:
            if out[key]:
                out[key] = str(Path(out[key]).resolve())
        return out

    def output_paths(self) -> dict[str, Path]:
        out = Path(self.output_folder)
        name = self.dataset_name
        return {"train": out / f"train-{name}.lmdb", "test": out / f"test-{name}.lmdb",
                "manifest": out / f"manifest-{name}.csv"}


class Interrupted(BaseException):
    """The build received SIGTERM; nothing was written.

    A BaseException, like KeyboardInterrupt: the handler raises it wherever the main thread is, and
    library code that catches ``Exception`` there (tqdm does, while it starts its monitor thread)
    must not swallow it and let the build run on."""


def build(config: BuildConfig) -> dict:
    """Run the whole build; returns the summary (see :func:`format_summary`).

    Raises InputError on bad input and Interrupted on SIGTERM, leaving nothing behind either way.
    """
    start = time.perf_counter()
    config.check()
    skipped: list[str] = []
    sources, coco_dataset = discover(config.image_folder, config.image_format, mask_folder=config.mask_folder,
                                     instance_folder=config.instance_folder, coco_json=config.coco_json,
                                     skip_bad=bool(config.skip_bad), skipped=skipped)
    if not sources:
        raise InputError(f"no usable image in {config.image_folder}; see the warnings above")
    if len(sources) < 2:
        raise InputError(f"only {len(sources)} image in {config.image_folder}: a train/test split needs "
                         "at least 2")
    train, test = split_sources(sources, config.train_fraction, config.seed)
    if not train or not test:
        raise InputError(
            f"--train_fraction {config.train_fraction} with {len(sources)} images leaves the "
            f"{'test' if not test else 'train'} database empty; use more images or change --train_fraction"
        )
    out, created = _prepare_output(config)
    tmp = out / f"{_TMP_PREFIX}{config.dataset_name}-{os.getpid()}"
    final = config.output_paths()
    options = ConvertOptions(bool(config.use_tiling), config.tile_size, config.tile_overlap,
                             config.number_classes, config.compression,
                             coco_dataset.class_ids if coco_dataset else {})
    class_names = coco_dataset.class_names if coco_dataset else {}
    warnings = list(coco_dataset.warnings) if coco_dataset else []
    summary = {"skipped": skipped}
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    success = False
    pool = None
    try:
        # workers are forked before any LMDB environment exists in this process
        pool = _worker_pool(config.workers, len(train) + len(test))
        tmp.mkdir()
        splits = {}
        for name, split in (("train", train), ("test", test)):
            splits[name] = (split, LmdbWriter(tmp / final[name].name, _estimate_map_size(split, config)),
                            SplitAccumulator(name))
        try:
            _write_all(config, options, splits, skipped, warnings, pool)
            # tests only: hold the build here, records written but not committed, so a signal lands mid-build
            time.sleep(float(os.environ.get("ENKI_TEST_PAUSE_BEFORE_METADATA", "0")))
            for name, (_, writer, acc) in splits.items():
                if acc.source_images == 0:
                    raise InputError(f"every {name} image was skipped as bad; nothing to build")
                metadata = acc.metadata(tile_size=config.tile_size if config.use_tiling else None,
                                        compression=config.compression, number_classes=config.number_classes,
                                        split_seed=config.seed, build_args=config.recorded(),
                                        class_names=class_names)
                writer.put(records.METADATA_KEY, metadata.to_json())
                writer.flush()
        finally:
            for _, writer, _ in splits.values():
                writer.close()
        write_manifest(tmp / final["manifest"].name, {name: acc for name, (_, _, acc) in splits.items()})
        if warnings:
            (tmp / f"warnings-{config.dataset_name}.txt").write_text("\n".join(warnings) + "\n")
        for item in sorted(tmp.iterdir()):
            target = out / item.name
            if target.exists():  # only reachable with --overwrite (checked before the build)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            item.rename(target)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        success = True
        summary.update(_summary(splits, final, time.perf_counter() - start, warnings))
        return summary
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
        if not success and created:
            shutil.rmtree(out, ignore_errors=True)


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signum}")


def _prepare_output(config: BuildConfig) -> tuple[Path, bool]:
    """Create/check the output folder; remove stale temporaries of killed builds."""
    out = Path(config.output_folder)
    created = False
    if not out.exists():
        try:
            out.mkdir(parents=True)
            created = True
        except OSError as exc:
            raise InputError(f"cannot create output folder {out}: {exc.strerror}; choose a writable "
                             "--output_folder") from None
    if not out.is_dir():
        raise InputError(f"--output_folder {out} exists and is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"output folder {out} is not writable; choose another --output_folder or fix "
                         "its permissions")
    for stale in out.glob(f"{_TMP_PREFIX}{config.dataset_name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s left by a build that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
    if not config.overwrite:
        for path in config.output_paths().values():
            if path.exists():
                raise InputError(f"{path} already exists; pass --overwrite 1 to replace it or choose "
                                 "another --dataset_name")
    return out, created


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _estimate_map_size(sources: list[Source], config: BuildConfig) -> int:
    # Decoded images can be much larger than compressed files (PNG/JPG), and overlapping tiles
    # repeat pixels; start at 2x the input bytes plus masks and grow on MapFullError if needed.
    total = sum(s.image.stat().st_size for s in sources)
    total += sum(s.mask.stat().st_size for s in sources if s.mask)
    total += sum(s.instance.stat().st_size for s in sources if s.instance)
    if config.use_tiling and config.tile_overlap:
        total *= (config.tile_size / (config.tile_size - config.tile_overlap)) ** 2
    return int(2 * total) + MIN_MAP_SIZE


def _worker_pool(workers: int, tasks: int):
    """A process pool for reading/encoding, or None when one process is enough."""
    if workers == 1 or tasks < 2:
        return None
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    return ctx.Pool(min(workers, tasks), initializer=_worker_init)


def _worker_init() -> None:
    # Workers must die on the SIGTERM of Pool.terminate() (not inherit the parent's handler), and
    # leave Ctrl-C to the parent, which then terminates the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_all(config, options, splits, skipped, warnings, pool) -> None:
    tasks = [(source, options) for name in ("train", "test") for source in splits[name][0]]
    owners = [name for name in ("train", "test") for _ in splits[name][0]]
    # disable=None: no bar when stderr is not a terminal (batch jobs, CI logs)
    disable = True if config.quiet else None
    with tqdm(total=len(tasks), unit="image", desc="build_lmdb", disable=disable) as progress:
        results = map(convert_task, tasks) if pool is None else pool.imap(convert_task, tasks, chunksize=1)
        for (status, payload), owner in zip(results, owners):
            progress.update(1)
            if status == "bad":
                if not config.skip_bad:
                    raise InputError(payload)
                logger.warning("skipping: %s", payload)
                skipped.append(payload)
                continue
            warnings.extend(payload.warnings)
            _, writer, acc = splits[owner]
            acc.add(payload, writer)


def _summary(splits, final, seconds, warnings) -> dict:
    out = {"seconds": round(seconds, 2), "warnings": len(warnings)}
    for name, (_, writer, acc) in splits.items():
        out[name] = {
            "path": str(final[name]),
            "source_images": acc.source_images,
            "records": len(acc.sources),
            "bytes": writer.bytes,
            "class_pixels": dict(sorted(acc.class_pixels.items())),
            "class_records": {c: len(v) for c, v in sorted(acc.class_records.items())},
        }
    out["manifest"] = str(final["manifest"])
    return out


def format_summary(summary: dict) -> str:
    """The summary of :func:`build` as the lines the CLI prints."""
    lines = []
    for name in ("train", "test"):
        s = summary[name]
        lines.append(f"{name:5s} {s['records']:7d} records from {s['source_images']} images, "
                     f"{s['bytes'] / 1e6:9.1f} MB  -> {s['path']}")
        total = sum(s["class_pixels"].values()) or 1
        hist = ", ".join(f"{c}: {100 * n / total:.1f}% ({s['class_records'][c]} rec)"
                         for c, n in s["class_pixels"].items())
        lines.append(f"      class pixels {hist}")
    lines.append(f"manifest -> {summary['manifest']}")
    if summary["warnings"]:
        lines.append(f"{summary['warnings']} annotation warnings (see warnings-*.txt)")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} bad input(s):")
        lines.extend(f"  - {m}" for m in summary["skipped"])
    lines.append(f"built in {summary['seconds']:.1f} s")
    return "\n".join(lines)
