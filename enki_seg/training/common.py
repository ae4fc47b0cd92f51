"""What every trainer shares: devices and strategy, run folder, checkpoints and resume, preemption,
early stopping, learning-rate schedules, metrics.csv and curves, exports.

The UNet and Mask R-CNN trainers build on these pieces; model- and loss-specific code stays in them.
TensorFlow is imported inside the functions that need it, so importing this module is cheap and
reader workers started by a trainer never pay for TensorFlow.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Exit code of a run that stopped on SIGTERM/SIGUSR1 after writing a full checkpoint ("requeue me";
#: EX_TEMPFAIL from sysexits.h). launch/ scripts requeue the job when they see it.
PREEMPTED_EXIT_CODE = 75
#: Exit code when training stopped because the loss became NaN/inf.
NAN_EXIT_CODE = 3
#: NIST's early-stopping tolerance: a change smaller than this is not an improvement.
EARLY_STOPPING_TOLERANCE = 1e-4


class TrainError(RuntimeError):
    """A problem found before or during training; the message says what to do."""


# ----------------------------------------------------------------------------- devices


def configure_devices(cpu_replicas: int = 0, deterministic: bool = False, seed: int = 0,
                      mixed_precision: bool = False):
    """Set up TensorFlow before its first op; returns the tensorflow module.

    cpu_replicas > 1 splits the CPU into that many logical devices (real MirroredStrategy without a
    GPU: tests and laptops). deterministic turns on TF op determinism and seeds Keras.
    """
    import tensorflow as tf

    if cpu_replicas > 1:
        cpus = tf.config.list_physical_devices("CPU")
        current = tf.config.get_logical_device_configuration(cpus[0])
        if current is None or len(current) < cpu_replicas:  # set once per process, before the first op
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return tf


def make_strategy(cpu_replicas: int = 0):
    """MirroredStrategy over the visible GPUs (or over logical CPUs); the default strategy otherwise."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    if cpu_replicas > 1:
        cpus = tf.config.list_logical_devices("CPU")[:cpu_replicas]
        return tf.distribute.MirroredStrategy([c.name for c in cpus])
    return tf.distribute.get_strategy()


def versions() -> dict:
    import numpy as np
    import tensorflow as tf
    import keras

    out = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


# ----------------------------------------------------------------------------- preemption


class PreemptionGuard:
    """Turns SIGTERM/SIGUSR1 into a flag the training loop checks after each step.

    SLURM sends SIGUSR1 (``--signal=USR1@secs``) before a time limit and SIGTERM on preemption; the
    loop then finishes its step, writes a full checkpoint and exits with PREEMPTED_EXIT_CODE.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            logger.warning("received %s: finishing this step, then checkpoint and exit",
                           signal.Signals(signum).name)
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def triggered(self) -> bool:
        return self.received is not None


# ----------------------------------------------------------------------------- early stopping


@dataclass
class EarlyStopping:
    """NIST's rule: stop after ``patience`` test intervals without an improvement > tolerance.

    mode "min" for losses, "max" for IoU/Dice.
    """

    patience: int
    mode: str = "min"
    tolerance: float = EARLY_STOPPING_TOLERANCE
    best: float | None = None
    best_step: int | None = None
    bad_intervals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record one interval's value; returns True when it is the new best."""
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best - self.tolerance
        else:
            improved = value > self.best + self.tolerance
        if improved:
            self.best, self.best_step, self.bad_intervals = float(value), step, 0
        else:
            self.bad_intervals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_intervals >= self.patience


# ----------------------------------------------------------------------------- learning rate


def learning_rate_at(step: int, base: float, schedule: str, warmup_steps: int, max_steps: int | None,
                     decay_steps: list[int] | None = None, decay_factor: float = 0.1,
                     poly_power: float = 0.9, decay_levels: list[float] | None = None) -> float:
    """Learning rate for ``step`` (0-based).

    Warm-up is NIST's: a tenth of the learning rate for the first ``warmup_steps`` steps. After it:
    constant; cosine (to 0 at max_steps); step (times decay_factor at each of decay_steps, default
    half and three quarters of max_steps; or TAO's learning_rate_steps/learning_rate_decay_levels: from
    decay_steps[i] on, base * decay_levels[i]); polynomial ((1 - t)^poly_power, as TAO/NVIDIA UNet).
    """
    if step < warmup_steps:
        return base * 0.1
    if schedule == "constant":
        return base
    if schedule == "step" and decay_steps:
        passed = sum(step >= s for s in decay_steps)
        if passed == 0:
            return base
        return base * (decay_levels[passed - 1] if decay_levels else decay_factor ** passed)
    if max_steps is None:
        raise TrainError(f"--lr_schedule {schedule} needs --max_steps")
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "polynomial":
        return base * (1 - t) ** poly_power
    if schedule == "step":
        steps = [max_steps // 2, (3 * max_steps) // 4]
        return base * decay_factor ** sum(step >= s for s in steps)
    raise TrainError(f"unknown --lr_schedule {schedule!r}")


# ----------------------------------------------------------------------------- run folder


def config_differences(old: dict, new: dict, ignore=()) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if k not in ignore and old.get(k) != new.get(k)]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs; saved next to each checkpoint."""

    step: int = 0
    interval: int = 0
    checkpoint: str | None = None
    early_stopping: dict = field(default_factory=dict)
    reader_position: int = 0
    history: list[dict] = field(default_factory=list)
    starvation_events: int = 0
    elapsed_seconds: float = 0.0
    topology: dict = field(default_factory=dict)  # workers, replicas, global batch size of the run

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(path.read_text()))


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

    def prepare(self, run_config: dict, resume: bool, compare_ignore=()) -> bool:
        """Create or check the folder; returns True when the run resumes from a checkpoint."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainError(f"cannot create --output_dir {self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise TrainError(f"--output_dir {self.path} is not writable")
        if self.has_checkpoint():
            old = json.loads(self.config.read_text()) if self.config.exists() else {}
            diffs = config_differences(old.get("train", {}), run_config, ignore=compare_ignore)
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


# ----------------------------------------------------------------------------- metrics log and curves


class MetricsLog:
    """metrics.csv (one row per test interval) and curves.png, redrawn each interval."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def write(self, history: list[dict]) -> None:
        if not history:
            return
        columns = list(dict.fromkeys(k for row in history for k in row))
        tmp = self.folder.metrics_csv.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.folder.metrics_csv)
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
        tmp = self.folder.curves.with_name(".curves.tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        os.replace(tmp, self.folder.curves)


def overlay(image, mask, num_classes: int):
    """(H, W) float image + (H, W) labels -> (H, W, 3) uint8 with classes tinted (class 0 untinted)."""
    import numpy as np

    img = np.asarray(image, np.float32)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    palette = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 1, 0.2], [1, 0.3, 1],
                        [0.2, 1, 1]], np.float32)
    for c in range(1, num_classes):
        where = np.asarray(mask) == c
        rgb[where] = 0.55 * rgb[where] + 0.45 * palette[1 + (c - 1) % (len(palette) - 1)]
    return (rgb * 255).astype(np.uint8)


def export_model(model, folder: RunFolder) -> None:
    """model.keras (rebuilds the architecture) and a SavedModel (serving), both written atomically."""
    import shutil

    tmp = folder.keras_model.with_name(".model.keras.tmp.keras")
    model.save(tmp)
    os.replace(tmp, folder.keras_model)
    tmp_dir = folder.path / ".saved_model.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.export(str(tmp_dir), format="tf_saved_model", verbose=False)
    shutil.rmtree(folder.saved_model, ignore_errors=True)
    os.replace(tmp_dir, folder.saved_model)


def log_to_file(folder: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(folder.path / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler

