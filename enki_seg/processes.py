"""Worker processes for the reader and the builder: one safe start method, set up once per process.

* **Start method**: forkserver where it exists (spawn elsewhere). Plain fork copies the parent's
  state, and a parent that has already run OpenCV's or TensorFlow's thread pools hands its children
  locks whose owner threads do not exist there: a forked worker then deadlocks in its first cv2 call
  (seen in this project's test suite).
* **One forkserver per process, configured the same by whoever starts it first** (the reader or the
  builder, in any order): its preload imports this module, and importing this module inside the
  forkserver makes the server ignore the signals meant for the trainer (below). The forkserver is the
  parent of the workers and reports their exit codes; if such a signal killed it, every live worker
  would read as "exited with code 255". It ends by itself when the process that started it goes (its
  alive pipe closes).
* **The user's script is not re-run in children** (``main_module_hidden``).

Imports nothing heavy: the forkserver loads it before any worker forks.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys

#: Signals meant for the trainer that often reach its whole process group or process tree (Ctrl-C,
#: SLURM's SIGUSR1 warning, SIGTERM on preemption or from launch/local.py, which SLURM's linuxproc
#: tracking sends to every process of a step). Reader processes ignore them: the consumer owns their
#: lifetime, and one dying of them would fail the trainer before it could write its checkpoint.
TRAINER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

_preload: list[str] | None = None


def ignore_trainer_signals() -> None:
    for sig in TRAINER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _imported_by_forkserver() -> bool:
    """True while multiprocessing's forkserver imports this module (directly or through its preload)."""
    from multiprocessing import forkserver

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if _imported_by_forkserver():
    ignore_trainer_signals()


def default_start_method(preload: list[str]) -> str:
    """forkserver where it exists (else spawn). The first call in a process sets the server's preload:
    modules it imports once so that each worker forks from it ready; each must import this module
    (directly or not), which keeps the server alive through the trainer's signals."""
    global _preload
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if _preload is None:
        _preload = [__name__, *preload]
        multiprocessing.get_context("forkserver").set_forkserver_preload(_preload)
    return "forkserver"


@contextlib.contextmanager
def main_module_hidden(method: str):
    """Keep spawn/forkserver children from re-running the user's main script.

    multiprocessing re-imports ``__main__`` in every spawned child so that targets defined there can
    be found. Our workers need nothing from it (their targets and arguments live in importable
    modules), and the re-import would run the script's top-level imports (TensorFlow...) in every
    worker, or fail for scripts without an ``if __name__ == "__main__"`` guard.
    """
    main = sys.modules.get("__main__")
    if method == "fork" or main is None:
        yield
        return
    saved = {k: main.__dict__.pop(k) for k in ("__file__",) if k in main.__dict__}
    spec = getattr(main, "__spec__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        main.__spec__ = spec
