"""Volume sampler: `statvfs` of each watched path, its fill rate, and how often to look.

The guard must win a race against a writer at full disk speed, so the poll interval is
adaptive: the time the fastest plausible writer (`max_write_speed`) needs to eat half of
the headroom left above `pause_below`, clamped to [poll_min, poll_max]. Far from every
threshold that is `poll_max` (1 s: idle costs nothing); close to it, a millisecond.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import VolumeConfig
from .model import VolumeSampled, VolumeUnavailable

log = logging.getLogger(__name__)

# Inodes can be used up fast too (a tree of small files): files per second to assume
# (or twice the rate seen, when faster).
MAX_FILE_CREATE_RATE = 200_000
# Re-check that the path is still a mount point at most this often (a cheap fsid
# comparison on every sample catches an unmount in between).
MOUNT_CHECK_INTERVAL = 1.0
RATE_WINDOW = 1.0
# A statvfs (or mount check) that has not returned within this makes the volume
# unavailable; a local file system answers in microseconds, a hung network one never.
ANSWER_DEADLINE = 2.0
HANG_CHECK_INTERVAL = 0.5  # how often the loop looks for a call in flight too long
HUNG_RETRY_INTERVAL = 0.05  # a sampler waiting for another one's call on its path

_calls_lock = threading.Lock()
_calls_in_flight: dict[str, float] = {}  # path → when its statvfs/mount check began


def _begin_call(path: str) -> float | None:
    """Claim the path for one file-system call: None, or when the call in flight began."""
    with _calls_lock:
        since = _calls_in_flight.get(path)
        if since is not None:
            return since
        _calls_in_flight[path] = time.monotonic()
        return None


def _end_call(path: str) -> None:
    with _calls_lock:
        _calls_in_flight.pop(path, None)


@dataclass(frozen=True)
class Usage:
    avail_bytes: int
    size_bytes: int
    avail_files: int
    files: int
    fsid: int


def read_usage(path: str) -> Usage:
    """What an unprivileged writer can still use: f_bavail / f_favail, not f_bfree."""
    st = os.statvfs(path)
    return Usage(
        avail_bytes=st.f_bavail * st.f_frsize,
        size_bytes=st.f_blocks * st.f_frsize,
        avail_files=st.f_favail,
        files=st.f_files,
        fsid=st.f_fsid,
    )


class FillRate:
    """Bytes (or inodes) per second being consumed, over the last `window` seconds of
    samples."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque(maxlen=4096)

    def add(self, when: float, avail_bytes: int) -> float:
        samples = self.samples
        samples.append((when, avail_bytes))
        # keep at least two samples, and at most those within the window
        while len(samples) > 2 and when - samples[1][0] >= self.window:
            samples.popleft()
        first_time, first_avail = samples[0]
        span = when - first_time
        if span <= 0:
            return 0.0
        return (first_avail - avail_bytes) / span

    def reset(self) -> None:
        self.samples.clear()


def poll_interval(
    config: VolumeConfig, usage: Usage, fill_rate: float, low: bool, file_rate: float = 0.0
) -> float:
    """Seconds until the next sample (`fill_rate` in bytes, `file_rate` in inodes per
    second, as seen)."""
    if low:
        # Paused already: recovery is not a race. Still sample often enough for metrics
        # and for the hold-down clock.
        return min(config.poll_max, 0.25)
    pause_bytes = config.pause_below.limit(usage.size_bytes)
    pause_files = config.pause_below_inodes.limit(usage.files)
    if (fill_rate > 0 and usage.avail_bytes - pause_bytes <= fill_rate * config.poll_min) or (
        usage.files
        and file_rate > 0
        and usage.avail_files - pause_files <= file_rate * config.poll_min
    ):
        # At this rate the threshold falls before a timer could fire again (the loop's
        # timers have 1 ms granularity): look again on the next loop turn, until it is
        # crossed or the writer slows down.
        return 0.0
    speed = max(float(config.max_write_speed), 2.0 * fill_rate)
    byte_time = (usage.avail_bytes - pause_bytes) / speed / 2.0
    interval = byte_time
    if usage.files:
        files_speed = max(float(MAX_FILE_CREATE_RATE), 2.0 * file_rate)
        file_time = (usage.avail_files - pause_files) / files_speed / 2.0
        interval = min(interval, file_time)
    return max(config.poll_min, min(config.poll_max, interval))


def is_mount_point(path: str) -> bool:
    return os.path.ismount(path)


class VolumeSampler:
    """Samples one volume on a thread of its own and hands each result to `emit`, on the
    loop.

    `statvfs` of a local file system takes microseconds, but on a network or FUSE mount
    whose server stopped answering it blocks in the kernel, for good: the loop must never
    make that call. The thread does (the mount check too) and hands over the newest
    sample; the loop delivers it. A call that has not returned within `deadline` makes the
    volume unavailable, reported by the loop every HANG_CHECK_INTERVAL while it lasts, so
    its migrations are paused, the others guarded as before and the watchdog still earned.
    When the call returns, sampling simply goes on. At most one call per path is in
    flight, across samplers too (a reload replaces samplers; a hung one cannot be
    joined), so a hung mount costs one blocked thread, not one per reload.
    """

    def __init__(
        self,
        config: VolumeConfig,
        emit: Callable[[VolumeSampled | VolumeUnavailable], None],
        is_low: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,  # for the fill rate: a wall step is no fill
        deadline: float = ANSWER_DEADLINE,
    ) -> None:
        self.config = config
        self.emit = emit
        self.is_low = is_low  # called on the sampler thread: it only reads the guard's state
        self.clock = clock
        self.deadline = deadline
        self.rate = FillRate()
        self.file_rate = FillRate()
        self.last_report = time.monotonic()  # loop: when a sample or a hang was reported
        self.samples = 0  # samples delivered
        self.hung_since: float | None = None  # loop: the hang it reported (monotonic)
        self._mount_checked_at = 0.0
        self._fsid: int | None = None
        self._path = str(config.path)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._wake = threading.Event()  # stop() cuts the thread's wait short
        self._taken = threading.Event()  # the loop took the sample handed over
        self._slot_lock = threading.Lock()
        self._slot: VolumeSampled | VolumeUnavailable | None = None
        self._delivery_scheduled = False
        self._waiting_since: float | None = None  # thread: a file-system call in flight
        self._check_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._sample_forever, name=f"sampler {self.config.name}", daemon=True
        )
        self._thread.start()
        self._check_handle = self._loop.call_later(HANG_CHECK_INTERVAL, self._check)

    def stop(self) -> None:
        """Stop sampling. Not joined: a thread blocked in the kernel ends once its call
        returns."""
        self._stopped.set()
        self._wake.set()
        self._taken.set()
        if self._check_handle is not None:
            self._check_handle.cancel()
            self._check_handle = None

    # -- the sampler thread ------------------------------------------------------------

    def _sample_forever(self) -> None:
        while not self._stopped.is_set():
            try:
                event, interval = self.sample()
            except Exception:  # a bug must not end sampling (the watchdog would go)
                log.exception("%s: sampling failed", self.config.name)
                event, interval = None, min(self.config.poll_max, 0.25)
            if self._stopped.is_set():
                return
            if event is not None:
                self._taken.clear()
                self._hand_over(event)
            if interval > 0:
                self._wake.wait(interval)
            elif event is not None:
                # The crossing is less than a timer tick away: look again as soon as the
                # loop has taken this sample (the old "every loop turn"), not faster, which
                # would only fight the loop for the interpreter.
                self._taken.wait(0.01)

    def sample(self) -> tuple[VolumeSampled | VolumeUnavailable | None, float]:
        """Take one sample (blocking: on the sampler thread); return it and the interval
        until the next one. None while another sampler's call on the path is in flight."""
        other = _begin_call(self._path)
        if other is not None:
            self._waiting_since = other
            # a replaced sampler's last call, about to return: look again at once;
            # a hung one: now and then
            if time.monotonic() - other < HUNG_RETRY_INTERVAL:
                return None, self.config.poll_min
            return None, HUNG_RETRY_INTERVAL
        self._waiting_since = time.monotonic()
        try:
            now = self.clock()
            usage: Usage | None = None
            try:
                usage = read = read_usage(self._path)
                problem = self._mount_problem(read)
            except OSError as error:
                usage, problem = None, f"cannot read {self._path}: {error.strerror or error}"
        finally:
            self._waiting_since = None
            _end_call(self._path)
        if problem or usage is None:
            self.rate.reset()
            self.file_rate.reset()
            self._fsid = None
            return VolumeUnavailable(self.config.name, problem), min(self.config.poll_max, 0.25)
        rate = self.rate.add(now, usage.avail_bytes)
        sampled = VolumeSampled(
            self.config.name,
            usage.avail_bytes,
            usage.size_bytes,
            usage.avail_files,
            usage.files,
            rate,
        )
        file_rate = self.file_rate.add(now, usage.avail_files)
        return sampled, poll_interval(self.config, usage, rate, self.is_low(), file_rate)

    def _hand_over(self, event: VolumeSampled | VolumeUnavailable) -> None:
        """The newest sample waits in one slot; the loop is woken once for however many
        arrive before it takes them."""
        loop = self._loop
        assert loop is not None
        with self._slot_lock:
            self._slot = event
            if self._delivery_scheduled:
                return
            self._delivery_scheduled = True
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the guard is stopping
            self._stopped.set()

    # -- on the loop ---------------------------------------------------------------------

    def _deliver(self) -> None:
        try:
            self._deliver_slot()
        finally:
            # only now: a thread looking again meanwhile would compete with the decision
            # (and the freeze it sends) for the interpreter, and read the old is_low()
            self._taken.set()

    def _deliver_slot(self) -> None:
        with self._slot_lock:
            event, self._slot = self._slot, None
            self._delivery_scheduled = False
        if event is None or self._stopped.is_set():
            return
        self.last_report = time.monotonic()
        self.samples += 1
        if self.hung_since is not None:
            log.warning(
                "%s: %s answers again after %.1f s",
                self.config.name,
                self._path,
                self.last_report - self.hung_since,
            )
            self.hung_since = None
        self.emit(event)

    def _check(self) -> None:
        """Runs on the loop every HANG_CHECK_INTERVAL: a call in flight for longer than
        the deadline makes the volume unavailable (and counts as this sampler's report:
        the loop turns and the guard knows what it cannot see)."""
        loop = self._loop
        assert loop is not None
        self._check_handle = loop.call_later(HANG_CHECK_INTERVAL, self._check)
        since = self._waiting_since
        now = time.monotonic()
        if since is None or now - since <= self.deadline:
            return
        if self._thread is not None and not self._thread.is_alive():
            return  # no thread: no report, and the watchdog goes
        if self.hung_since is None:
            self.hung_since = since
            log.error(
                "%s: %s does not answer (statvfs waiting for %.1f s): a hung network or "
                "FUSE mount? Its migrations are paused as unavailable; the other volumes "
                "are still guarded",
                self.config.name,
                self._path,
                now - since,
            )
        self.last_report = now
        self.emit(
            VolumeUnavailable(
                self.config.name,
                f"{self._path} does not answer: statvfs has not returned within "
                f"{self.deadline:g} s (a hung network or FUSE mount?)",
            )
        )

    def _mount_problem(self, usage: Usage) -> str:
        if not self.config.require_mount:
            return ""
        monotonic = time.monotonic()
        if usage.fsid == self._fsid and monotonic - self._mount_checked_at < MOUNT_CHECK_INTERVAL:
            return ""
        self._mount_checked_at = monotonic
        if not is_mount_point(self._path):
            return f"{self._path} is not a mount point (unmounted?)"
        self._fsid = usage.fsid
        return ""
