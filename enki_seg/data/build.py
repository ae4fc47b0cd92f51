"""Builds a train/test pair of LMDB databases from a folder of sources, all or nothing.

``build(BuildConfig(...))`` checks the settings, pairs images with labels (``sources.py``), splits
them by source image, converts them in a worker pool (``convert.py``) and writes the databases and
the manifest (``writer.py``). Everything is written to a hidden ``.build-NAME-PID`` folder inside
the output folder and moved into place only when complete: a killed build never leaves a
database that looks finished, and the next build removes the leftovers of a dead one.

Every build has an id (``new_build_id``), stored in both databases' metadata and in the manifest;
the trainers refuse a train/test pair of different builds. The finished set replaces the previous
one of the same name as a whole (:func:`_replace_set`): a journal ``.replace-NAME.json`` is written
first, then the old set is moved into ``.old-NAME-PID`` (test database first) and the new set in
(test database last), so no visible train/test pair ever mixes two builds. A build killed after
the journal exists is finished by the next build of that name (rolled forward, never discarded).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from enki_seg import processes
from enki_seg.data import records
from enki_seg.data.convert import ConvertOptions, convert_source, convert_task, parse_label_map
from enki_seg.data.image_io import InputError
from enki_seg.data.sources import Source, discover, split_sources
from enki_seg.data.writer import MIN_MAP_SIZE, LmdbWriter, SplitAccumulator, write_manifest
from enki_seg.files import WriteError, atomic_write_text, is_storage_error, write_failure

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".build-"
_OLD_PREFIX = ".old-"
_PATH_FIELDS = ("image_folder", "mask_folder", "instance_folder", "coco_json", "output_folder")


def default_workers() -> int:
    """The CPUs this process may use, at most 8 (all CPUs where affinity is unknown, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return min(8, len(os.sched_getaffinity(0)))
    return min(8, os.cpu_count() or 1)


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
    label_map: str | None = None  # "255=1": mask value -> class id (convert.parse_label_map)
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
        if self.label_map is not None:
            if self.coco_json is not None or self.mask_folder is None:
                raise InputError("--label_map maps the values of --mask_folder masks; give --mask_folder")
            parse_label_map(self.label_map)
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

    Raises InputError on bad input, WriteError when the output disk refuses data (full, quota, I/O
    error) and Interrupted on SIGTERM, leaving nothing behind in each case.
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
    build_id = new_build_id()
    final = config.output_paths()
    options = ConvertOptions(bool(config.use_tiling), config.tile_size, config.tile_overlap,
                             config.number_classes, config.compression,
                             coco_dataset.class_ids if coco_dataset else {},
                             parse_label_map(config.label_map) if config.label_map else {})
    class_names = coco_dataset.class_names if coco_dataset else {}
    warnings = list(coco_dataset.warnings) if coco_dataset else []
    summary = {"skipped": skipped}
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    success = False
    pool = None
    try:
        # workers are started before any LMDB environment exists in this process
        pool = _worker_pool(config.workers, len(train) + len(test))
        tmp.mkdir()
        splits = {}
        for name, split in (("train", train), ("test", test)):
            splits[name] = (split, LmdbWriter(tmp / final[name].name, _estimate_map_size(split, config), final[name]),
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
                                        class_names=class_names, build_id=build_id)
                writer.put(records.METADATA_KEY, metadata.to_json())
                writer.flush()
        finally:
            for _, writer, _ in splits.values():
                writer.close()
        write_manifest(tmp / final["manifest"].name, {name: acc for name, (_, _, acc) in splits.items()},
                       build_id)
        if warnings:
            (tmp / f"warnings-{config.dataset_name}.txt").write_text("\n".join(warnings) + "\n")
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        _replace_set(out, config.dataset_name, tmp, build_id)
        success = True
        summary.update(_summary(splits, final, time.perf_counter() - start, warnings))
        summary["build_id"] = build_id
        return summary
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        raise WriteError(write_failure(exc.filename or out, exc, "--output_folder")) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.terminate()
            pool.join()
        if not success and _journal_pid(out, config.dataset_name) == os.getpid():
            # the set was complete and half moved into place: leave it for the next build to finish
            logger.error("the replacement of the %s set in %s was interrupted; run build_lmdb.py again with "
                         "the same --output_folder and --dataset_name to finish it", config.dataset_name, out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            if not success and created:
                shutil.rmtree(out, ignore_errors=True)


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signum}")


def new_build_id() -> str:
    """A new build id: UTC time of the build plus 8 random hex digits (sortable, unique in practice)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def _set_items(name: str) -> list[str]:
    """The names of a set's items in the output folder, in the order they are moved aside (test first)."""
    return [f"test-{name}.lmdb", f"train-{name}.lmdb", f"manifest-{name}.csv", f"warnings-{name}.txt"]


def _journal_path(out: Path, name: str) -> Path:
    return out / f".replace-{name}.json"


def _journal_pid(out: Path, name: str) -> int | None:
    """The pid of the build whose replacement journal of ``name`` is in ``out``, or None."""
    try:
        return int(json.loads(_journal_path(out, name).read_text())["pid"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return -1  # unreadable: not this build's


def _replace_set(out: Path, name: str, tmp: Path, build_id: str) -> None:
    """Replace the set ``name`` in ``out`` (whatever of it exists) by the finished set in ``tmp``.

    The journal written first makes the replacement restartable (:func:`_roll_forward`); SIGTERM
    waits until it is done (milliseconds: renames within one folder)."""
    if _journal_pid(out, name) is not None:
        raise InputError(f"another build is replacing the {name} set in {out} right now (see "
                         f"{_journal_path(out, name)}); build again when it has finished")
    late = []
    signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))
    journal = {"build_id": build_id, "pid": os.getpid(), "new": tmp.name,
               "old": f"{_OLD_PREFIX}{name}-{os.getpid()}", "items": sorted(p.name for p in tmp.iterdir())}
    _test_kill_point("before_journal")
    atomic_write_text(_journal_path(out, name), json.dumps(journal))
    _fsync_dir(out)
    _test_kill_point("journal_written")
    _roll_forward(out, name, journal)
    if late:
        logger.info("SIGTERM arrived while the finished set was moved into place; the build is complete")


def _roll_forward(out: Path, name: str, journal: dict) -> None:
    """Finish the replacement the journal describes (again, if a killed build began it); idempotent."""
    new, old = out / journal["new"], out / journal["old"]
    if all((new / item).exists() for item in journal["items"]):  # nothing moved in yet
        old.mkdir(exist_ok=True)
        for item in _set_items(name):  # test first: from here on no train/test pair is visible
            if os.path.lexists(out / item):
                os.replace(out / item, old / item)
                _test_kill_point(f"aside:{item}")
    test_last = sorted(journal["items"], key=lambda item: item.startswith("test-"))
    for item in test_last:
        if (new / item).exists():
            os.replace(new / item, out / item)
            _test_kill_point(f"in:{item}")
    _fsync_dir(out)
    _journal_path(out, name).unlink()
    _test_kill_point("journal_removed")
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)


def _test_kill_point(point: str) -> None:
    # tests only: SIGKILL this build at a chosen step of the replacement (ENKI_TEST_KILL_AT=<point>)
    if os.environ.get("ENKI_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a power cut, not only a killed process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some network file systems refuse fsync on a folder; the renames still happened
        pass


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
    _finish_interrupted_replacement(out, config.dataset_name)
    for prefix in (_TMP_PREFIX, _OLD_PREFIX):
        for stale in out.glob(f"{prefix}{config.dataset_name}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            # exactly this name's (".build-a-1" is not the set "a-b"'s ".build-a-b-1")
            if stale.name == f"{prefix}{config.dataset_name}-{pid}" and pid.isdigit() and not _pid_alive(int(pid)):
                logger.info("removing %s left by a build that did not finish", stale)
                shutil.rmtree(stale, ignore_errors=True)
    if not config.overwrite:
        for path in config.output_paths().values():
            if path.exists():
                raise InputError(f"{path} already exists; pass --overwrite 1 to replace it or choose "
                                 "another --dataset_name")
    return out, created


def _finish_interrupted_replacement(out: Path, name: str) -> None:
    """Roll forward a replacement of the set ``name`` that a killed build left half done (its new set
    was complete: nothing is rebuilt or discarded)."""
    path = _journal_path(out, name)
    if not path.exists():
        return
    try:
        journal = json.loads(path.read_text())
        pid, build_id = int(journal["pid"]), journal["build_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a build journal ({exc}); delete it and the .build-{name}-*/.old-{name}-* "
                         "folders, then build again") from None
    if pid != os.getpid() and _pid_alive(pid):
        raise InputError(f"build {build_id} (pid {pid}) is replacing the {name} set in {out} right now; wait "
                         "for it or choose another --dataset_name")
    logger.warning("finishing the replacement of the %s set in %s by build %s (pid %d did not finish it)",
                   name, out, build_id, pid)
    _roll_forward(out, name, journal)


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
    # Not plain fork: a parent that has already run threads (OpenCV's pools, a caller's TensorFlow)
    # hands forked children locks whose owners do not exist there, and a worker can deadlock in its
    # first cv2 call. Spawn, not the reader's forkserver: that server is one per process and ignores
    # the trainer's signals (its children too, until they set their own), so a worker still starting
    # when the build is terminated would ignore Pool.terminate()'s SIGTERM and the build would hang; a
    # build starts its few workers once, so spawn's slower start does not matter.
    method = "spawn"
    with processes.main_module_hidden(method):
        return multiprocessing.get_context(method).Pool(min(workers, tasks), initializer=_worker_init)


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
    binary_255: list[str] = []  # the first 0/255 mask, said once
    with tqdm(total=len(tasks), unit="image", desc="build_lmdb", disable=disable) as progress:
        results = map(convert_task, tasks) if pool is None else pool.imap(convert_task, tasks, chunksize=1)
        for (status, payload), owner, (source, _) in zip(results, owners, tasks):
            if status == "region":  # a slide: converted here, its records written as they are made
                status, payload = _convert_streaming(source, options, *splits[owner][1:])
            progress.update(1)
            if status == "bad":
                if not config.skip_bad:
                    raise InputError(payload)
                logger.warning("skipping: %s", payload)
                skipped.append(payload)
                continue
            warnings.extend(payload.warnings)
            if payload.binary_255_mask and not binary_255:
                binary_255.append(payload.binary_255_mask)
                logger.warning("mask %s holds only the values 0 and 255 (a 0/255 binary export), so its "
                               "foreground is class 255 and training would need 256 classes; rebuild with "
                               "--label_map 255=1", payload.binary_255_mask)
            _, writer, acc = splits[owner]
            acc.add(payload, writer)


def _convert_streaming(source, options, writer, acc) -> tuple[str, object]:
    """Convert a source read by region, each record written to ``writer`` as it is made, under the keys
    ``acc.add`` gives it next; ("ok", result) or ("bad", message) with its records deleted again."""
    start = len(acc.sources)
    written = 0

    def emit(value: bytes) -> None:
        nonlocal written
        writer.put(records.record_key(start + written), value)
        written += 1

    try:
        return "ok", convert_source(source, options, emit=emit)
    except InputError as exc:
        writer.delete([records.record_key(start + i) for i in range(written)])
        return "bad", str(exc)


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
    lines.append(f"build id {summary['build_id']}")
    if summary["warnings"]:
        lines.append(f"{summary['warnings']} annotation warnings (see warnings-*.txt)")
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} bad input(s):")
        lines.extend(f"  - {m}" for m in summary["skipped"])
    lines.append(f"built in {summary['seconds']:.1f} s")
    return "\n".join(lines)
