"""What every command-line entry point shares: logging, quiet TensorFlow start-up, KEY=VALUE flags."""
from __future__ import annotations

import logging
import os
import re
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: TensorFlow's C++ start-up notices. On some CPUs (seen with AMX) they are written during
#: ``import tensorflow`` whatever TF_CPP_MIN_LOG_LEVEL says, so ``import_tensorflow`` drops them.
_START_UP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|cpu_feature_guard"
    r"|^To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags")
_quiet = False


def quiet_tensorflow(verbose: bool = False) -> None:
    """Silence TensorFlow's C++ start-up lines (oneDNN notices, cpu_feature_guard, absl warnings) that
    a newcomer reads as errors. Call before TensorFlow is imported. ``verbose`` (``--verbose 1``) or
    ``ENKI_VERBOSE=1`` keeps them; an explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment always wins."""
    global _quiet
    if verbose or os.environ.get("ENKI_VERBOSE") == "1":
        return
    _quiet = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ errors still show (level 2 hides INFO/WARNING)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")  # absl::InitializeLog's "before InitializeLog" notice


def without_start_up_noise(text: str) -> str:
    """``text`` without the lines of TensorFlow's start-up notices (every other line kept, in order)."""
    return "".join(line for line in text.splitlines(keepends=True) if not _START_UP_NOISE.search(line))


def import_tensorflow():
    """``import tensorflow``; after :func:`quiet_tensorflow`, the first import runs with the process's
    stderr (file descriptor 2) captured, and what it wrote is replayed without the start-up notices,
    so errors and warnings of the import still show. Returns the module."""
    if not _quiet or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sys.stderr.write(without_start_up_noise(capture.read().decode(errors="replace")))
            sys.stderr.flush()
    return tf


def setup_logging(verbose: bool = False) -> None:
    """INFO lines of the project to stderr; TensorFlow's and absl's Python loggers only from WARNING."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if not verbose:
        for noisy in ("absl", "tensorflow"):  # per-step INFO chatter of tf.distribute and checkpointing
            logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_key_values(items, flag: str, error=ValueError) -> dict[str, str]:
    """``["a=1", "b=x"]`` (a repeatable ``--flag KEY=VALUE``) -> ``{"a": "1", "b": "x"}``; raises
    ``error`` naming the flag and the item when one is not KEY=VALUE. Values stay strings: the caller
    converts them (YAML scalars, dataclass field types)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise error(f"{flag} {item!r} must be KEY=VALUE")
        out[key.strip()] = value.strip()
    return out
