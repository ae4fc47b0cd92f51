"""Preemption: SIGTERM/SIGUSR1 become a flag the training loop checks, so a run stops at a step
boundary with a full checkpoint and exits ``exit_codes.PREEMPTED`` (75: requeue me)."""
from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)

#: With several workers, SIGTERM/SIGUSR1 are acted on at steps that are multiples of this: agreeing on
#: the flag is a collective (~5 ms on loopback, bench/multiworker_bench.py); SLURM warns minutes ahead.
PREEMPTION_CHECK_STEPS = 10


class PreemptionGuard:
    """Turns SIGTERM/SIGUSR1 into a flag the training loop checks after each step.

    SLURM sends SIGUSR1 (``--signal=USR1@secs``) before a time limit and SIGTERM on preemption; the
    loop then finishes its step, writes a full checkpoint and exits with ``exit_codes.PREEMPTED``.
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


def ignore_sigusr1_outside_the_loop() -> None:
    """SIGUSR1's default action kills the process: one arriving outside the training loop (while the
    model is built, tested or exported) must not lose a run. PreemptionGuard takes it over inside the loop."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: logger.warning(
        "SIGUSR1 outside the training loop: ignored (the run is starting or finishing)"))
