"""What every command-line entry point shares: logging, quiet TensorFlow start-up, KEY=VALUE flags."""
from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_tensorflow(verbose: bool = False) -> None:
    """Silence TensorFlow's C++ start-up lines (oneDNN notices, cpu_feature_guard, absl warnings) that
    a newcomer reads as errors. Call before TensorFlow is imported. ``verbose`` (``--verbose 1``) or
    ``ENKI_VERBOSE=1`` keeps them; an explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment always wins."""
    if verbose or os.environ.get("ENKI_VERBOSE") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ errors still show (level 2 hides INFO/WARNING)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")  # absl::InitializeLog's "before InitializeLog" notice


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
