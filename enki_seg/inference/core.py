"""What semantic and instance inference share: the run, its model, tile batches, the image folder, outputs.

* The run: :func:`load_run_info` reads ``RUN/config.json`` (``enki_seg.run_config.RunConfig``) and
  checks that ``model.keras`` is there; :func:`load_model` loads it (no TensorFlow before that).
* Tiles: the plans are ``enki_seg.data.tiling``'s; :func:`normalized_batches` cuts the tiles of a
  plan from an image and normalizes each on its own window, as the reader normalizes a record in
  training, preparing the next batch while the model runs one.
* The folder: :func:`list_inputs` and :func:`check_channels` (from image headers) before any model
  is loaded; :func:`process_images` reads the next image in a thread while the current one is
  processed, reports a file that fails in one line and goes on; :func:`finish` sums up.
* Outputs: written under a hidden temporary name and renamed when complete
  (``enki_seg.files.atomic_path``), so a killed run never leaves a file that looks finished; the
  leftovers of killed runs are removed at the next start (``enki_seg.files.remove_leftovers``).

:class:`InferenceError` is a problem found before any image is processed (exit code 2).
"""
from __future__ import annotations

import logging
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enki_seg import cli, exit_codes
from enki_seg.data import image_io, records
from enki_seg.data.normalization import Normalization
from enki_seg.data.tiling import Tile, read_window
from enki_seg.files import WriteError, atomic_path
from enki_seg.run_config import RunConfig, RunConfigError
from enki_seg.visualize import overlay

logger = logging.getLogger("inference")  # one logger for the whole command, named after it

#: Overlays are a preview: images larger than this (pixels a side) are subsampled to fit.
OVERLAY_MAX_SIDE = 2048
#: Above this many bytes a TIFF is written as BigTIFF (classic TIFF offsets are 32-bit).
BIGTIFF_BYTES = 2**31 - 2**25


class InferenceError(RuntimeError):
    """A problem found before any image is processed; the message says what to change (exit 2)."""


# ----------------------------------------------------------------------------- the run


@dataclass
class RunInfo:
    """A training run as inference sees it: where its model is, and what its config.json says."""

    folder: Path
    model_path: Path
    config: RunConfig
    normalization: Normalization
    #: the Keras dtype policy the model runs in: the run's training precision (config.json), or
    #: float32 when inference.py is asked for it (``--precision float32``)
    precision: str = "float32"

    @property
    def model_name(self) -> str:
        return self.config.model.name

    @property
    def num_classes(self) -> int:
        return self.config.classes.number_classes

    @property
    def class_names(self) -> list[str]:
        return self.config.classes.name_list()

    @property
    def channels(self) -> int:
        return self.config.input.channels

    @property
    def input_dtype(self) -> str | None:
        return self.config.input.dtype

    @property
    def size_multiple(self) -> int:
        return self.config.model.size_multiple

    @property
    def tile_size(self) -> int | None:
        """The training tile (or the smaller side of untiled records); None when the run records neither."""
        return self.config.input.default_tile()

    @property
    def inference_overlap(self) -> int | None:
        """The tile overlap the run recommends (Mask R-CNN: the largest training object); None: not recorded."""
        return self.config.input.inference_overlap

    @property
    def instance_target(self) -> str:
        """"boundary" for a semantic model trained on boundary targets (instances by watershed), else ""."""
        return str(self.config.train.get("instance_target") or "")

    @property
    def label_dtype(self) -> np.dtype:
        return records.smallest_label_dtype(self.num_classes - 1)


def load_run_info(path: str | os.PathLike) -> RunInfo:
    """The run of ``path`` = a run folder, its ``model.keras`` or its ``config.json`` (no TensorFlow needed)."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"--model {path} does not exist; pass a run folder of train_unet.py "
                             "(with config.json and model.keras) or the model.keras inside it")
    if path.is_dir():
        folder, model_path = path, path / "model.keras"
    elif path.name == "config.json":
        folder, model_path = path.parent, path.parent / "model.keras"
    else:
        folder, model_path = path.parent, path
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InferenceError(f"{config_path} is missing; --model must be a run folder written by "
                             "train_unet.py (or the model.keras inside one)")
    if not model_path.is_file():
        raise InferenceError(f"{model_path} is missing; train_unet.py exports it when a run finishes — "
                             "let the run finish (or resume it) first")
    try:
        config = RunConfig.load(config_path)
        normalization = Normalization.from_dict(config.normalization)
    except RunConfigError as exc:
        raise InferenceError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"{config_path} has no valid normalization section ({type(exc).__name__}: "
                             f"{exc})") from None
    return RunInfo(folder=folder, model_path=model_path, config=config, normalization=normalization,
                   precision=str(config.extra.get("precision", "float32")))


def load_model(run: RunInfo, check_outputs: bool = True):
    """The run's model.keras; ``import models`` first registers the model classes with Keras.

    ``check_outputs`` compares a segmenter's output channels with the run's class count.
    """
    cli.import_tensorflow()  # first, so that its start-up notices are dropped (after cli.quiet_tensorflow)
    import models  # noqa: F401  (registers UNet / FCDenseNet / MaskRCNN for deserialization)
    import keras

    keras.config.set_dtype_policy(run.precision)  # the models build their layers under the global policy
    try:
        model = keras.models.load_model(run.model_path, compile=False)
    except Exception as exc:  # Keras raises many types for corrupt or foreign files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InferenceError(f"cannot load {run.model_path}: {detail}") from None
    outputs = model.output_shape[-1] if check_outputs else run.num_classes
    if outputs != run.num_classes:
        raise InferenceError(f"{run.model_path} has {outputs} outputs but config.json says "
                             f"{run.num_classes} classes; the run folder is inconsistent")
    return model


# ----------------------------------------------------------------------------- tiles


def normalized_batches(image: np.ndarray, tiles: list[Tile], normalize, batch_size: int, wanted=None):
    """Yield (start, tiles, (B, h, w, C) float32 batch) of ``image``, preparing the next batch while the caller runs one.

    ``normalize(raw_tile, out=float32 array)`` fills ``out`` (``Normalization.apply``): each tile is
    normalized on its own window, as the reader normalizes a record in training. All tiles of a
    group must have one size (those of ``tiling.plan_tiles`` do). ``start`` is the index in
    ``tiles`` of the group's first tile. Groups are always ``tiles[k * batch_size : (k + 1) *
    batch_size]``; with ``wanted`` (a set of tile indices) only the groups holding one of them are
    prepared, so a part of a plan (a block of ``--num_blocks``) goes through the model in exactly the
    batches a run over the whole plan uses (kernels may round differently in another batch).
    """
    starts = [i for i in range(0, len(tiles), batch_size)
              if wanted is None or any(j in wanted for j in range(i, min(i + batch_size, len(tiles))))]

    def prepare(start):
        group = tiles[start : start + batch_size]
        batch = np.empty((len(group), group[0].height, group[0].width, image.shape[2]), np.float32)
        for j, tile in enumerate(group):
            # the reader's exact operation on a record: copy the raw tile to float32, normalize
            normalize(read_window(image, tile.y, tile.x, tile.height, tile.width), out=batch[j])
        return batch

    if not starts:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tiles") as pool:
        pending = pool.submit(prepare, starts[0])
        for i, start in enumerate(starts):
            batch = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(prepare, starts[i + 1])
            yield start, tiles[start : start + batch_size], batch


# ----------------------------------------------------------------------------- inputs


def probe_channels(path: Path) -> int | None:
    """Channels of an image from its header alone (TIFF, PNG, JPEG); None when not cheaply known."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = list(series.shape), series.axes
            if len(shape) > 3:  # as image_io: length-1 axes other than Y, X are dropped
                keep = [i for i, n in enumerate(shape) if n != 1 or axes[i] in "YX"]
                shape, axes = [shape[i] for i in keep], "".join(axes[i] for i in keep)
            if len(shape) == 2:
                return 1
            if len(shape) == 3:
                return shape[0] if axes.endswith("YX") else shape[2]
            return None
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        if suffix == ".png" and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return {0: 1, 2: 3, 4: 2, 6: 4}.get(head[25])  # palette (3) decodes to RGB(A): read it
        if suffix in (".jpg", ".jpeg"):
            return _jpeg_components(head)
    except Exception:  # an unreadable file is reported when it is read
        return None
    return None


def _jpeg_components(data: bytes) -> int | None:
    """Number of colour components from a JPEG's start-of-frame marker."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[position + 9] if position + 9 < len(data) else None
        position += 2 + length
    return None


def list_inputs(image_folder: Path, image_format: str, output_folder: Path) -> list[Path]:
    """Images to process: ``image_io.list_images`` minus anything inside the output folder."""
    files = image_io.list_images(image_folder, image_format)
    output = output_folder.resolve()
    kept = [p for p in files if output not in p.resolve().parents]
    if not kept:
        raise InferenceError(f"every .{image_format} file in {image_folder} lies in the output folder "
                             f"{output_folder}; choose another --output_folder")
    stems: dict[str, Path] = {}
    for p in kept:  # outputs are named by stem: a.tif and a.tiff would write the same mask
        if p.stem in stems:
            raise InferenceError(f"{image_folder} has two images named {p.stem!r} ({stems[p.stem].name} and "
                                 f"{p.name}); their outputs would collide — rename one")
        stems[p.stem] = p
    return kept


def check_channels(files: list[Path], channels: int, model: str) -> None:
    """InferenceError naming the files and both channel counts when an image does not fit the model."""
    bad = [(p, n) for p in files if (n := probe_channels(p)) is not None and n != channels]
    if bad:
        shown = ", ".join(f"{p.name} ({n})" for p, n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InferenceError(
            f"{len(bad)} image(s) do not have the model's channel count: {shown} channel(s), but {model} "
            f"takes {channels}; pass images with {channels} channel(s) (or the model trained on them)")


def read_ahead(paths: list[Path]):
    """Yield (path, image or InputError), reading the next file in a thread while the caller works.

    An image ``image_io.open_image`` reads by region (a large tiled or striped TIFF, OME-Zarr) comes as
    that open ``RegionSource`` (the caller closes it; tiles are read from it as they are needed),
    every other one as its whole (H, W, C) array.
    """
    def read(path):
        try:
            source = image_io.open_image(path)
            return source if source.tile_wise else source.read()
        except image_io.InputError as exc:
            return exc

    if not paths:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
        pending = pool.submit(read, paths[0])
        for i, path in enumerate(paths):
            result = pending.result()
            pending = None
            if i + 1 < len(paths):
                pending = pool.submit(read, paths[i + 1])
            yield path, result
            del result


# ----------------------------------------------------------------------------- outputs


def write_labels(path: Path, labels: np.ndarray) -> Path:
    """(H, W) labels as a zlib TIFF (BigTIFF when large) or PNG (by suffix), written atomically."""
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".png":
            import imagecodecs

            imagecodecs.imwrite(str(tmp), labels)
        else:
            import tifffile

            tifffile.imwrite(tmp, labels, photometric="minisblack", compression="zlib",
                             bigtiff=labels.nbytes > BIGTIFF_BYTES)
    return path


def subsample(image, step: int) -> np.ndarray:
    """``image[::step, ::step]`` of an array or an ``image_io.ImageSource`` (read band by band)."""
    return image[::step, ::step] if isinstance(image, np.ndarray) else image.subsample(step)


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, num_classes: int, step: int | None = None) -> Path:
    """PNG of channel 0 with the classes tinted (``enki_seg.visualize.overlay``), at most OVERLAY_MAX_SIDE a side.

    ``overlay`` needs ~60 bytes per overlay pixel, hence the subsampled preview of large images.
    ``step``: ``labels`` is already ``full_labels[::step, ::step]`` (a slide streamed band by band).
    """
    import imagecodecs

    if step is None:
        step = max(1, -(-max(labels.shape) // OVERLAY_MAX_SIDE))
        labels = labels[::step, ::step]
    rgb = overlay(subsample(image, step)[..., 0], labels, num_classes)
    with atomic_path(path) as tmp:
        imagecodecs.imwrite(str(tmp), rgb)
    return path


# ----------------------------------------------------------------------------- the folder


@dataclass
class Job:
    """A folder of images checked before the model is loaded, and the failures found while processing it."""

    run: RunInfo
    files: list[Path]
    output: Path
    masks: dict[str, Path] | None
    failures: list[str] = field(default_factory=list)
    class_masks: dict[str, Path] | None = None


def progress_bar(total: int, unit: str, **kwargs):
    """A tqdm bar on stderr, shown only on a terminal (batch logs stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def process_images(job: Job, handle) -> int:
    """Call ``handle(path, image)`` on every file of ``job`` (read ahead, channels checked); returns the count done.

    A file that cannot be read or handled (InputError, OSError, MemoryError) is reported in one
    line naming it, added to ``job.failures`` and skipped.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    run = job.run
    warned_dtypes: set[str] = set()
    done = 0
    with logging_redirect_tqdm(), progress_bar(len(job.files), "image") as bar:
        for path, image in read_ahead(job.files):
            bar.set_postfix_str(path.name)
            try:
                if isinstance(image, Exception):
                    raise image
                if image.shape[2] != run.channels:
                    raise image_io.InputError(f"{path} has {image.shape[2]} channel(s) but the model takes "
                                              f"{run.channels}")
                if run.input_dtype and image.dtype.name != run.input_dtype and image.dtype.name not in warned_dtypes:
                    warned_dtypes.add(image.dtype.name)
                    logger.warning("%s is %s but the model was trained on %s images; results depend on the "
                                   "normalization (%s) making them comparable", path.name, image.dtype.name,
                                   run.input_dtype, run.normalization.method)
                handle(path, image)
                done += 1
            except WriteError:
                raise  # a full output disk: every later image would fail alike
            except (image_io.InputError, OSError, MemoryError) as exc:
                detail = str(exc) or type(exc).__name__
                if not detail.startswith(str(path)):
                    detail = f"{path}: {detail}"
                logger.error("skipped: %s", detail)
                job.failures.append(detail)
            finally:
                if isinstance(image, image_io.ImageSource):
                    image.close()
                image = None
                bar.update(1)
    return done


def warn_unmatched(unmatched: list[str], mask_folder) -> None:
    """Warn about the images that were not evaluated because ``mask_folder`` has no mask for them."""
    if unmatched:
        logger.warning("%d image(s) have no mask in %s and were not evaluated: %s", len(unmatched),
                       mask_folder, ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""))


def finish(job: Job, done: int, seconds: float) -> int:
    """Log the throughput and the failures of a folder; returns the exit code (OK, or FAILED on failures)."""
    logger.info("%d images in %.1f s (%.2f images/s)", done, seconds, done / max(seconds, 1e-9))
    if job.failures:
        logger.error("%d of %d image(s) failed:\n  %s", len(job.failures), len(job.files), "\n  ".join(job.failures))
        return exit_codes.FAILED
    return exit_codes.OK
