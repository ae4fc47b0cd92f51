"""The run folder of one training run: its layout, the resume checks, the trainer state next to each
checkpoint, metrics.csv and curves.png, train.log, the exported model and the software versions.

Every file here is written atomically (``enki_seg.files``): a reader, or a run killed mid-write,
sees the old complete file or the new one, never half of one.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from enki_seg import cli
from enki_seg.files import WriteError, atomic_path, atomic_write_text, is_storage_error, remove_leftovers
from enki_seg.run_config import RunConfigError, load_sections
from enki_seg.training.errors import TrainError

logger = logging.getLogger(__name__)


class RunFolder:
    """The output folder of one run: config.json, checkpoints, logs, curves, exports."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.checkpoints = self.path / "checkpoints"
        self.best = self.path / "best"
        self.state = self.path / "checkpoints" / "trainer_state.json"
        self.metrics_csv = self.path / "metrics.csv"
        self.curves = self.path / "curves.png"
        self.tensorboard = self.path / "tensorboard"
        self.keras_model = self.path / "model.keras"
        self.saved_model = self.path / "saved_model"
        self.summary = self.path / "summary.json"

    def has_checkpoint(self) -> bool:
        return self.state.exists()

    def saved_sections(self) -> dict:
        """config.json of the run in this folder as plain sections ({} when there is none)."""
        try:
            return load_sections(self.config)
        except RunConfigError as exc:
            raise TrainError(f"--output_dir {self.path}: {exc}") from None

    def prepare(self, train_settings: dict, resume: bool, compare_ignore=(), defaults: dict | None = None) -> bool:
        """Create or check the folder; returns True when the run resumes from a checkpoint.

        train_settings: the run's config dataclass as a dict, compared with config.json's ``train``;
        defaults: the config class's defaults, so that a setting added to the code after the run
        started (absent from its config.json) counts as unchanged while it keeps its default (a
        preempted job requeued after an upgrade resumes)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainError(f"cannot create --output_dir {self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise TrainError(f"--output_dir {self.path} is not writable")
        remove_leftovers(self.path)  # temporary files of a run killed while writing
        if self.has_checkpoint():
            diffs = config_differences(self.saved_sections().get("train", {}), train_settings, ignore=compare_ignore,
                                       defaults=defaults)
            if diffs and not resume:
                raise TrainError(
                    f"--output_dir {self.path} holds a different run ({'; '.join(diffs[:4])}); pass "
                    "--resume 1 to continue it with these settings, or choose another --output_dir"
                )
            if diffs:
                logger.warning("resuming with changed settings: %s", "; ".join(diffs))
            return True
        if resume:
            logger.warning("--resume given but %s holds no checkpoint; starting a new run", self.path)
        stale = [p.name for p in (self.keras_model, self.saved_model, self.metrics_csv) if p.exists()]
        if stale:
            raise TrainError(
                f"--output_dir {self.path} holds a finished run ({', '.join(stale)}); choose another "
                "--output_dir or delete that one"
            )
        return False


def config_differences(old: dict, new: dict, ignore=(), defaults: dict | None = None) -> list[str]:
    """``"key: old -> new"`` for every setting that differs, except those in ``ignore`` and settings
    missing from ``old`` (added to the code since) whose new value is their default in ``defaults``."""
    defaults = defaults or {}
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if k not in ignore and old.get(k) != new.get(k)
            and not (k not in old and k in defaults and new.get(k) == defaults[k])]


def check_resumed_data(folder: RunFolder, train_meta, test_meta) -> None:
    """TrainError when a resumed run's databases are not the ones it started with (by record counts).

    The paths may differ (launch/ copies the databases to node-local scratch, a new path per job)."""
    data = folder.saved_sections().get("data", {})
    for name, meta in (("train", train_meta), ("test", test_meta)):
        before = data.get(f"{name}_records")
        if before is not None and before != meta.record_count:
            raise TrainError(
                f"--{name}_database has {meta.record_count} records but the run in {folder.path} was trained on "
                f"{before} ({data.get(f'{name}_database')}); resume with the same databases or choose another "
                "--output_dir")


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs; saved next to each checkpoint."""

    step: int = 0
    interval: int = 0
    checkpoint: str | None = None
    early_stopping: dict = field(default_factory=dict)
    # no reader position: each reader's start is a function of step and topology (Trainer.reader_config),
    # and the readers' own positions run ahead of the trained steps (tf.data prefetches)
    interval_losses: list[float] = field(default_factory=list)  # the current test interval's training losses
    history: list[dict] = field(default_factory=list)
    starvation_events: int = 0
    elapsed_seconds: float = 0.0
    topology: dict = field(default_factory=dict)  # workers, replicas, global batch size of the run

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        """The saved state; keys this version no longer has (``reader_position``) are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


class MetricsLog:
    """metrics.csv (one row per test interval) and curves.png, redrawn each interval."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def write(self, history: list[dict]) -> None:
        if not history:
            return
        columns = list(dict.fromkeys(k for row in history for k in row))
        with atomic_path(self.folder.metrics_csv) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
        self._plot(history)

    def _plot(self, history: list[dict]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plots are a convenience; metrics.csv has the numbers
            return
        steps = [row["step"] for row in history]
        metric_keys = [k for k in ("test_mean_iou", "test_foreground_iou", "test_macro_dice", "test_mask_AP",
                                   "test_mask_AP50", "test_box_AP", "test_box_AP50")
                       if k in history[0]]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        try:
            for key in ("train_loss", "test_loss"):
                if key in history[0]:
                    axes[0].plot(steps, [row[key] for row in history], marker="o", label=key)
            axes[0].set_xlabel("step")
            axes[0].set_ylabel("loss")
            axes[0].set_yscale("log")
            axes[0].legend()
            for key in metric_keys:
                axes[1].plot(steps, [row[key] for row in history], marker="o", label=key)
            axes[1].set_xlabel("step")
            axes[1].set_ylim(0, 1)
            axes[1].legend()
            fig.tight_layout()
            with atomic_path(self.folder.curves) as tmp:
                fig.savefig(tmp, dpi=80)
        finally:
            plt.close(fig)


def export_model(model, folder: RunFolder) -> None:
    """model.keras (rebuilds the architecture) and a SavedModel (serving), both written atomically."""
    with atomic_path(folder.keras_model) as tmp:
        model.save(tmp)
    with atomic_path(folder.saved_model) as tmp:
        model.export(str(tmp), format="tf_saved_model", verbose=False)


#: What TensorFlow's file errors say when the disk refused the data (they carry no errno)
_STORAGE_MESSAGES = ("No space left on device", "Disk quota exceeded", "Input/output error", "File too large",
                     "Read-only file system")


def save_checkpoint(manager, number: int, kept: str | None) -> str:
    """``manager.save(checkpoint_number=number)`` (a ``tf.train.CheckpointManager``); returns its path.

    When the disk refuses the data (full, quota, I/O error) the partial checkpoint (TensorFlow leaves
    ``ckpt-N_temp/``) is removed and WriteError names the folder, the checkpoint ``kept`` and the fix.
    The previous checkpoints stay usable: the manager updates its index and deletes old checkpoints
    only after a complete save.
    """
    import tensorflow as tf

    try:
        return manager.save(checkpoint_number=number)
    except (tf.errors.OpError, OSError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        if not (is_storage_error(exc) or any(text in reason for text in _STORAGE_MESSAGES)):
            raise
        folder = Path(manager.directory)
        prefix = Path(getattr(manager, "_checkpoint_prefix", "ckpt")).name  # CheckpointManager(checkpoint_name=)
        index = tf.train.get_checkpoint_state(str(folder))
        if not (index and Path(index.model_checkpoint_path).name == f"{prefix}-{number}"):  # not indexed: partial
            for leftover in folder.glob(f"{prefix}-{number}[._]*"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        why = next((text for text in _STORAGE_MESSAGES if text in reason), reason.splitlines()[0][:200])
        raise WriteError(f"cannot write checkpoint {folder / f'{prefix}-{number}'}: {why}"
                         f"{_free_space(folder)}; the last good checkpoint {kept or '(none yet)'} is kept: free "
                         "space (or move --output_dir) and run the same command to resume") from None


def _free_space(folder: Path) -> str:
    try:
        return f", {shutil.disk_usage(folder).free / 1e6:.1f} MB free on its disk"
    except OSError:
        return ""


def log_to_file(folder: RunFolder) -> logging.Handler:
    """Copy every log line to RUN/train.log; returns the handler (remove it when the run ends)."""
    handler = logging.FileHandler(folder.path / "train.log")
    handler.setFormatter(logging.Formatter(cli.LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def software_versions() -> dict:
    """Python, TensorFlow, Keras, NumPy and the git commit: config.json's ``versions``."""
    import keras
    import numpy as np
    import tensorflow as tf

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out
