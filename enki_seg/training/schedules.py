"""Learning rate and stopping: the optimizer, the learning-rate schedules and NIST's early-stopping rule."""
from __future__ import annotations

import math
from dataclasses import dataclass

from enki_seg.training.errors import TrainError

#: NIST's early-stopping tolerance: a change smaller than this is not an improvement.
EARLY_STOPPING_TOLERANCE = 1e-4


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


def make_optimizer(config, policy: str = "float32"):
    """The Keras optimizer of a run (``config``: a BaseTrainConfig): adam, sgd or rmsprop, with weight
    decay, wrapped in a LossScaleOptimizer under mixed precision. The loop sets its learning rate each
    step from :func:`learning_rate_at`."""
    import keras

    kwargs = dict(learning_rate=config.learning_rate)
    if config.weight_decay:
        kwargs["weight_decay"] = config.weight_decay
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**kwargs)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=config.momentum, **kwargs)
    else:
        optimizer = keras.optimizers.RMSprop(momentum=config.momentum, **kwargs)
    if policy == "mixed_float16":  # float16's range needs loss scaling; bfloat16 has float32's range
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
