"""Durable files: replace atomically, and set a bad file aside instead of deleting it.

Used for everything the guard keeps on disk (state, incidents, alert spools), so a crash
leaves either the old or the new content, never half of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, fsync the directory."""
    directory = path.parent
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # the rename is durable only once the directory entry is
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_aside(path: Path, why: str) -> Path:
    """Rename a bad file out of the way (never delete it: a person may want to read it)."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    suffix = 1
    while aside.exists():  # two in one second must not overwrite each other
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{suffix}")
        suffix += 1
    os.rename(path, aside)
    log.error("%s: %s; set aside as %s", path, why, aside)
    return aside
