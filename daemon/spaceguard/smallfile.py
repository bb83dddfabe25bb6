"""Reading a small file someone else wrote (the config, a size probe's result) without
trusting it: never blocking on a FIFO, never reading /dev/zero for ever."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotARegularFile(Exception):
    """The path is a directory, a FIFO, a device or a socket: nothing was read."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_small_file(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """At most `limit` + 1 bytes of a regular file (more than `limit`: the caller says it
    is too large) and its stat. Raises NotARegularFile, or OSError when it cannot be read."""
    # O_NONBLOCK: opening a FIFO nobody writes to returns at once instead of blocking
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(file_kind(info.st_mode))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), info
    finally:
        os.close(fd)
