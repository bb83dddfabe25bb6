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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import VolumeConfig
from .model import VolumeSampled, VolumeUnavailable

log = logging.getLogger(__name__)

# Inodes can be used up fast too (a tree of small files): files per second to assume.
MAX_FILE_CREATE_RATE = 200_000
# Re-check that the path is still a mount point at most this often (a cheap fsid
# comparison on every sample catches an unmount in between).
MOUNT_CHECK_INTERVAL = 1.0
RATE_WINDOW = 1.0


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
    """Bytes per second being consumed, over the last `window` seconds of samples."""

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


def poll_interval(config: VolumeConfig, usage: Usage, fill_rate: float, low: bool) -> float:
    """Seconds until the next sample."""
    if low:
        # Paused already: recovery is not a race. Still sample often enough for metrics
        # and for the hold-down clock.
        return min(config.poll_max, 0.25)
    pause_bytes = config.pause_below.limit(usage.size_bytes)
    pause_files = config.pause_below_inodes.limit(usage.files)
    if fill_rate > 0 and usage.avail_bytes - pause_bytes <= fill_rate * config.poll_min:
        # At this rate the threshold falls before a timer could fire again (the loop's
        # timers have 1 ms granularity): look again on the next loop turn, until it is
        # crossed or the writer slows down.
        return 0.0
    speed = max(float(config.max_write_speed), 2.0 * fill_rate)
    byte_time = (usage.avail_bytes - pause_bytes) / speed / 2.0
    interval = byte_time
    if usage.files:
        file_time = (usage.avail_files - pause_files) / MAX_FILE_CREATE_RATE / 2.0
        interval = min(interval, file_time)
    return max(config.poll_min, min(config.poll_max, interval))


def is_mount_point(path: str) -> bool:
    return os.path.ismount(path)


class VolumeSampler:
    """Samples one volume on the asyncio loop and hands each result to `emit`."""

    def __init__(
        self,
        config: VolumeConfig,
        emit: Callable[[VolumeSampled | VolumeUnavailable], None],
        is_low: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,  # for the fill rate: a wall step is no fill
    ) -> None:
        self.config = config
        self.emit = emit
        self.is_low = is_low
        self.clock = clock
        self.rate = FillRate()
        self.last_report = time.monotonic()
        self.samples = 0
        self._handle: asyncio.Handle | None = None
        self._mount_checked_at = 0.0
        self._fsid: int | None = None
        self._path = str(config.path)

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_soon(self._run)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        interval = self.sample()
        loop = asyncio.get_running_loop()
        self._handle = (
            loop.call_later(interval, self._run) if interval > 0 else loop.call_soon(self._run)
        )

    def sample(self) -> float:
        """Take one sample, emit it, and return the interval until the next one."""
        now = self.clock()
        self.last_report = time.monotonic()
        self.samples += 1
        try:
            usage = read_usage(self._path)
            problem = self._mount_problem(usage)
        except OSError as error:
            usage, problem = None, f"cannot read {self._path}: {error.strerror or error}"
        if problem or usage is None:
            self.rate.reset()
            self._fsid = None
            self.emit(VolumeUnavailable(self.config.name, problem))
            return min(self.config.poll_max, 0.25)
        rate = self.rate.add(now, usage.avail_bytes)
        self.emit(
            VolumeSampled(
                self.config.name,
                usage.avail_bytes,
                usage.size_bytes,
                usage.avail_files,
                usage.files,
                rate,
            )
        )
        return poll_interval(self.config, usage, rate, self.is_low())

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
