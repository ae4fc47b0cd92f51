"""Atomic file writing: an output is either complete under its real name or absent (never half-written).

Every writer in the project goes through :func:`atomic_path`: it hands out a temporary name in the
same folder (``.NAME.tmp-PID.EXT``, hidden, same suffix so format-by-suffix writers still work),
renames it into place only when the block finishes, and removes it on any error. Leftovers of a
process killed with SIGKILL carry the temporary pattern, and :func:`remove_leftovers` deletes them.
"""
from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

#: ``.NAME.tmp-PID.EXT`` (and ``.NAME.tmp-PID`` for folders): what :func:`temp_path` makes
TEMP_PATTERN = re.compile(r"^\..+\.tmp-\d+(\.[^.]+)?$")


def temp_path(path: str | Path) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under (same folder, same suffix)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path):
    """``with atomic_path(out) as tmp:`` write ``tmp`` (a file or a folder); it replaces ``out`` when the
    block succeeds and is removed when it raises. ``os.replace`` is atomic within one file system."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and not tmp.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)  # a folder cannot replace a non-empty folder in one step
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_leftovers(folder: str | Path) -> int:
    """Delete the temporary files of killed runs (``.NAME.tmp-PID.EXT``) in ``folder``; returns the count."""
    removed = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMP_PATTERN.match(p.name):
                _remove(p)
                removed += 1
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
