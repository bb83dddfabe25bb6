#!/usr/bin/env python3
"""A stand-in for a migration: write BYTES into DIR/NAME, surviving a full disk.

    writer.py DIR BYTES --status FILE [--name writer.bin] [--rate BYTES_PER_S]
              [--resume] [--fsync] [--retry-interval 0.05]

Writes in 1 MiB chunks with plain os.write (fsync only with --fsync), as fast as it can
or throttled to --rate. On ENOSPC (or EDQUOT) it does not crash: it appends
``ENOSPC <bytes-written> <unix-time>`` to the status file and retries the same write
every --retry-interval seconds, so a migration the guard paused or stopped can finish
once space is back (then ``RESUMED <bytes> <time>``). At the end it appends
``DONE <bytes> <time>`` and exits 0. On SIGTERM it appends ``TERM <bytes> <time>`` and
dies of SIGTERM (what systemd's stop expects). The status file must live elsewhere than
the volume being filled. Progress lines go to stdout (the journal) every ~10 MiB.
BYTES may carry a K/M/G suffix (powers of 1024). Dependency-free on purpose.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from types import FrameType

CHUNK = 1024 * 1024
PROGRESS_EVERY = 10 * CHUNK
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Status:
    def __init__(self, path: str) -> None:
        self.path = path

    def note(self, word: str, written: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{word} {written} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("bytes", type=parse_size)
    ap.add_argument("--status", required=True, help="file to append events to")
    ap.add_argument("--name", default="writer.bin")
    ap.add_argument("--rate", type=parse_size, default=None, help="bytes per second")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue after the existing file's bytes instead of truncating",
    )
    ap.add_argument("--fsync", action="store_true", help="fsync after each chunk")
    ap.add_argument("--retry-interval", type=float, default=0.05)
    args = ap.parse_args(argv)

    status = Status(args.status)
    path = os.path.join(args.directory, args.name)
    flags = os.O_WRONLY | os.O_CREAT | (0 if args.resume else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    written = os.lseek(fd, 0, os.SEEK_END) if args.resume else 0
    target: int = args.bytes

    def on_term(signum: int, frame: FrameType | None) -> None:
        status.note("TERM", written)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_term)

    chunk_size = CHUNK
    if args.rate:
        chunk_size = max(4096, min(CHUNK, args.rate // 20))
    block = b"\xa5" * chunk_size
    status.note("START", written)
    print(f"writer: {path}: {written}/{target} bytes, rate {args.rate or 'max'}", flush=True)
    start, start_written = time.monotonic(), written
    next_progress = (written // PROGRESS_EVERY + 1) * PROGRESS_EVERY
    stalled = False
    while written < target:
        view = memoryview(block)[: min(chunk_size, target - written)]
        try:
            n = os.write(fd, view)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            if not stalled:
                stalled = True
                status.note("ENOSPC", written)
                print(f"writer: ENOSPC at {written} bytes, retrying", flush=True)
            time.sleep(args.retry_interval)
            continue
        if stalled:
            stalled = False
            status.note("RESUMED", written)
            print(f"writer: resumed at {written} bytes", flush=True)
            # a stall must not be made up for by a burst at the old rate
            start, start_written = time.monotonic(), written
        written += n
        if args.fsync:
            os.fsync(fd)
        if written >= next_progress:
            print(f"writer: {written // CHUNK} MiB written", flush=True)
            next_progress += PROGRESS_EVERY
        if args.rate:
            now = time.monotonic()
            ahead = (written - start_written) / args.rate - (now - start)
            if ahead > 0:
                time.sleep(ahead)
            elif ahead < -1.0:
                # behind by more than a second (it was frozen, or stopped by SIGSTOP): a
                # rate limit owes at most a second's burst, like a token bucket
                start, start_written = now, written
    os.close(fd)
    status.note("DONE", written)
    print(f"writer: done, {written} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
