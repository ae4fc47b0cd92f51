"""Atomic file writing: an output is either complete under its real name or absent (never half-written).

Every writer in the project goes through :func:`atomic_path`: it hands out a temporary name in the
same folder (``.NAME.tmp-PID.EXT``, hidden, same suffix so format-by-suffix writers still work),
renames it into place only when the block finishes, and removes it on any error. Leftovers of a
process killed with SIGKILL carry the temporary pattern, and :func:`remove_leftovers` deletes them.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

#: ``.NAME.tmp-PID.EXT`` (and ``.NAME.tmp-PID`` for folders): what :func:`temp_path` makes
TEMP_PATTERN = re.compile(r"^\..+\.tmp-\d+(\.[^.]+)?$")


#: errno values by which storage refuses data: the fix is on the disk's side (space, quota, hardware)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})


class WriteError(OSError):
    """An output could not be written (a full disk, a quota, an I/O error); the message names the
    file and the fix in one line. Whatever was half-written has been removed. An OSError, so code
    that handles OSError still does; code that skips a bad input and goes on must not skip this one
    (the next output would fail alike)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def is_storage_error(exc: BaseException) -> bool:
    """True for an OSError by which the disk refused data (see STORAGE_ERRNOS)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def write_failure(path: str | Path, exc: BaseException, where: str = "output folder") -> str:
    """The one-line message for ``exc`` raised while writing ``path``: what, how much space is left, the fix."""
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
    free = ""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f", {shutil.disk_usage(folder).free / 1e6:.1f} MB free on its disk"
    except OSError:
        pass
    return f"cannot write {path}: {reason}{free}; free space there or choose another {where}"


def temp_path(path: str | Path) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under (same folder, same suffix)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path):
    """``with atomic_path(out) as tmp:`` write ``tmp`` (a file or a folder); it replaces ``out`` when the
    block succeeds and is removed when it raises. ``os.replace`` is atomic within one file system.
    A disk that refuses the data (:func:`is_storage_error`) raises :class:`WriteError` naming ``out``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
    except BaseException as exc:
        _remove(tmp)
        if is_storage_error(exc):
            raise WriteError(write_failure(path, exc)) from None
        raise
    if tmp.is_dir() and not tmp.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)  # a folder cannot replace a non-empty folder in one step
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def reserve(path: str | Path) -> None:
    """Allocate the disk blocks of the file at ``path`` up to its size, so that a full disk is an
    ENOSPC now rather than a SIGBUS later, when a memory map of the (sparse) file writes a page.
    No-op where ``os.posix_fallocate`` does not exist (macOS) or the file system does not support it."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


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
