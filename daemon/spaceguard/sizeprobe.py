"""The size probe's file: what `rclone size --json` wrote for a migration's size_unit.

rclone prints one JSON object, `{"count":N,"bytes":B,"sizeless":S}` (rclone 1.60; newer
versions add keys). The guard uses "bytes" as what the run still has to copy. The file is
read strictly, since it decides whether a migration may start: a regular file (not a FIFO
that would block, not /dev/zero), at most MAX_SIZE_FILE bytes, written after the probe
started (not a result left by an earlier run), one JSON object with a whole, non-negative
"bytes". Anything else raises SizeFileError naming the file and what is wrong. Blocking:
the daemon calls it on a worker thread.
"""

from __future__ import annotations

import json
from pathlib import Path

from .smallfile import NotARegularFile, read_small_file

MAX_SIZE_FILE = 64 * 1024
# file systems stamp mtimes coarsely (ext4: jiffies): allow this much before the start
MTIME_SLACK = 1.0


class SizeFileError(ValueError):
    """The size probe's file is missing, unreadable or not rclone size's JSON."""


def read_size_file(path: Path, not_before: float | None = None) -> int:
    """The "bytes" of the size probe's file; `not_before`: the probe's start (wall clock)."""
    try:
        data, info = read_small_file(path, MAX_SIZE_FILE)
    except NotARegularFile:
        raise SizeFileError(f"{path}: not a regular file") from None
    except OSError as error:
        raise SizeFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if not_before is not None and info.st_mtime < not_before - MTIME_SLACK:
        raise SizeFileError(
            f"{path}: not written by this probe (last modified "
            f"{not_before - info.st_mtime:.0f}s before it started): does size_unit "
            "write it?"
        )
    if len(data) > MAX_SIZE_FILE:
        raise SizeFileError(
            f"{path}: larger than {MAX_SIZE_FILE // 1024} KiB: not rclone size --json output"
        )
    return parse_size_json(path, data)


def parse_size_json(path: Path, data: bytes) -> int:
    if not data.strip():
        raise SizeFileError(f'{path}: empty (expected rclone size --json output, {{"bytes": N}})')
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SizeFileError(f"{path}: not UTF-8 text") from None
    except ValueError as error:
        raise SizeFileError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise SizeFileError(
            f"{path}: expected a JSON object like rclone size --json prints, got "
            f"{type(document).__name__}"
        )
    if "bytes" not in document:
        raise SizeFileError(f'{path}: no "bytes" key (expected rclone size --json output)')
    size = document["bytes"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise SizeFileError(f'{path}: "bytes" must be a whole number, got {size!r}')
    if size < 0:
        # rclone says -1 when a backend cannot tell sizes
        raise SizeFileError(f'{path}: "bytes" is {size}: the source did not say its size')
    if size >= 2**63:
        raise SizeFileError(f'{path}: "bytes" is {size}: more than any volume holds')
    return size
