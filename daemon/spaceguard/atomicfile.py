"""Durable files: replace atomically, and set a bad file aside instead of deleting it.

Used for everything the guard keeps on disk (state, incidents, alert spools), so a crash
leaves either the old or the new content, never half of it. `BackgroundWriter` does those
writes on a thread of their own, so that an fsync behind a slow or broken disk never holds
up the event loop, and keeps what it could not write until it can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class WriterHealth:
    """What a BackgroundWriter has managed, for metrics, STATUS= and alerts."""

    writable: bool = True  # False from a failed write until the next write succeeds
    errors_total: int = 0  # failed attempts since start
    last_error: str = ""  # of the current failing streak ("" while writable)
    failing_since: float | None = None  # wall time of the first failure of the streak
    pending: int = 0  # jobs waiting (coalesced: at most one per key)
    dropped_total: int = 0  # jobs refused because max_pending was reached
    written_total: int = 0
    busy_since: float | None = None  # wall time the write now in progress began (None: idle)


Job = Callable[[], None]


class BackgroundWriter:
    """One thread that does a component's disk writes off the event loop.

    Jobs are keyed by what they write: a job submitted while an older one of the same key
    still waits replaces it (the latest content wins; a slow disk makes the guard write
    less often, never queue up stale copies). At most `max_pending` keys are held, waiting
    or being written (a write that fails is queued again, so the one in flight holds its
    place); beyond that `submit` refuses and says so. A job that fails (OSError: disk
    full, read-only, EACCES, a directory in the way) stays queued, unless a newer one of
    its key replaced it, and is tried again after a backoff (initial_backoff doubling up to
    max_backoff); meanwhile the caller keeps the content in memory and the health says
    what is wrong. One failing streak is logged once, and its end once.
    """

    def __init__(
        self,
        name: str,
        *,
        max_pending: int = 64,
        initial_backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        if max_pending < 1 or not 0 < initial_backoff <= max_backoff:
            raise ValueError("need max_pending >= 1 and 0 < initial_backoff <= max_backoff")
        self.name = name
        self.max_pending = max_pending
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, Job] = OrderedDict()
        self._in_flight: str | None = None
        self._retry_at = 0.0  # monotonic
        self._delay = initial_backoff
        self._closing = False
        self._attempts = 0
        self._thread: threading.Thread | None = None
        self._health = WriterHealth()

    # -- the caller's side (any thread) ---------------------------------------------------

    def submit(self, key: str, job: Job) -> bool:
        """Queue `job` (replacing a waiting job of the same key); False when full."""
        with self._cond:
            if self._closing:
                return False
            held = len(self._pending)
            if self._in_flight is not None and self._in_flight not in self._pending:
                held += 1
            if key not in self._pending and key != self._in_flight and held >= self.max_pending:
                self._health = replace(self._health, dropped_total=self._health.dropped_total + 1)
                return False
            self._pending[key] = job
            self._health = replace(self._health, pending=len(self._pending))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def health(self) -> WriterHealth:
        with self._cond:
            return self._health

    def room(self) -> int:
        """How many more keys submit() would take now."""
        with self._cond:
            held = len(self._pending)
            if self._in_flight is not None and self._in_flight not in self._pending:
                held += 1
            return max(0, self.max_pending - held)

    def is_pending(self, key: str) -> bool:
        with self._cond:
            return key in self._pending or self._in_flight == key

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits and nothing is being written, or `timeout` passed (a
        failing disk keeps jobs queued: then this returns False). Tries failed jobs again
        at once instead of after their backoff."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._retry_at = 0.0
            self._cond.notify_all()
            attempts = self._attempts
            while self._pending or self._in_flight is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
                if self._attempts > attempts and not self._health.writable:
                    return False  # a retry just failed: do not spin on a broken disk
            return True

    def close(self, timeout: float = 5.0) -> bool:
        """Write what waits (one more try each, no backoff), then stop the thread; returns
        whether everything was written. A hung disk costs at most `timeout`."""
        done = self.flush(timeout)
        with self._cond:
            self._closing = True
            lost = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        if lost:
            log.error("%s: not written at shutdown: %s", self.name, ", ".join(lost))
        return done and not lost

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    wait = self._retry_at - time.monotonic()
                    if self._pending and wait <= 0:
                        key, job = self._pending.popitem(last=False)
                        self._in_flight = key
                        self._health = replace(self._health, busy_since=time.time())
                        break
                    self._cond.wait(wait if self._pending else None)
            error = self._attempt(job)
            with self._cond:
                self._in_flight = None
                self._attempts += 1
                self._finish(key, job, error)
                self._health = replace(self._health, pending=len(self._pending), busy_since=None)
                self._cond.notify_all()

    def _attempt(self, job: Job) -> str:
        try:
            job()
        except OSError as error:
            return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        except Exception as error:  # a bug must not end the writer: log it, retry
            log.exception("%s: unexpected error in a write", self.name)
            return f"{type(error).__name__}: {error}"
        return ""

    def _finish(self, key: str, job: Job, error: str) -> None:
        health = self._health
        if not error:
            if not health.writable:
                log.warning(
                    "%s: writing again after %d failed attempt(s) since %s",
                    self.name,
                    health.errors_total,
                    time.strftime("%H:%M:%S", time.localtime(health.failing_since or 0)),
                )
            self._delay = self.initial_backoff
            self._retry_at = 0.0
            self._health = replace(
                health,
                writable=True,
                last_error="",
                failing_since=None,
                written_total=health.written_total + 1,
            )
            return
        if key not in self._pending:  # not replaced by a newer job meanwhile: keep it
            self._pending[key] = job
            self._pending.move_to_end(key, last=False)
        if health.writable or error != health.last_error:
            log.error(
                "%s: cannot write %s: %s (kept in memory; retrying every %gs at most)",
                self.name,
                key,
                error,
                self.max_backoff,
            )
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.max_backoff)
        self._health = replace(
            health,
            writable=False,
            errors_total=health.errors_total + 1,
            last_error=error,
            failing_since=health.failing_since if not health.writable else time.time(),
        )
