"""VolumeSampler against a real FUSE file system that stops answering (tests/fusefs.py):
the loop never blocks, the volume becomes unavailable within the deadline, sampling goes
on once the file system answers again, and a replaced sampler adds no second blocked call.

Root and /dev/fuse are needed (under CI=true their absence fails the test)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spaceguard.config import VolumeConfig
from spaceguard.model import VolumeSampled, VolumeUnavailable
from spaceguard.quantities import Threshold
from spaceguard.volumes import VolumeSampler

from tests.fusefs import FUSE_STATFS, HangingFuse, missing_for_fuse
from tests.sandbox import require

Event = VolumeSampled | VolumeUnavailable


def volume_config(path: Path, require_mount: bool = True) -> VolumeConfig:
    return VolumeConfig(
        name="net",
        path=path,
        pause_below=Threshold(percent=5.0),
        resume_above=Threshold(percent=10.0),
        pause_below_inodes=Threshold(percent=1.0),
        resume_above_inodes=Threshold(percent=2.0),
        resume_after=1.0,
        predict=0.0,
        require_mount=require_mount,
        poll_max=0.1,
    )


@pytest.fixture
def fuse(tmp_path: Path) -> Iterator[HangingFuse]:
    missing = missing_for_fuse()
    require(not missing, "cannot mount FUSE: " + "; ".join(missing))
    fs = HangingFuse(tmp_path / "net")
    try:
        fs.mount()
    except OSError as error:
        require(False, f"FUSE did not mount: {error}")
    yield fs
    fs.umount()


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Ticks:
    """A loop timer every 10 ms: its count grows only while the loop turns."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_gap = 0.0
        self._last = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(0.01, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self._last)
        self._last = now
        self.count += 1
        self.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


def test_a_hung_mount_is_unavailable_and_the_loop_keeps_turning(fuse: HangingFuse) -> None:
    async def scenario() -> None:
        events: list[Event] = []
        sampler = VolumeSampler(
            volume_config(fuse.mountpoint), events.append, lambda: False, deadline=0.5
        )
        ticks = Ticks()
        ticks.start()
        sampler.start()
        await until(lambda: any(isinstance(e, VolumeSampled) for e in events), 5, "a sample")
        first = next(e for e in events if isinstance(e, VolumeSampled))
        assert first.avail_bytes == 512 << 20 and first.size_bytes == 1 << 30

        fuse.hang()
        await until(lambda: fuse.held(FUSE_STATFS) == 1, 5, "a statfs held by the FUSE")
        hung_at = len(events)
        await until(
            lambda: any(isinstance(e, VolumeUnavailable) for e in events[hung_at:]),
            5,
            "the volume reported unavailable",
        )
        ticks_then = ticks.count
        unavailable = [e for e in events[hung_at:] if isinstance(e, VolumeUnavailable)]
        assert "does not answer" in unavailable[0].error
        assert sampler.hung_since is not None
        # reported again while it lasts; the loop turns all along; the report is recent
        await until(
            lambda: sum(isinstance(e, VolumeUnavailable) for e in events[hung_at:]) >= 3,
            5,
            "repeated reports",
        )
        assert ticks.count > ticks_then
        assert time.monotonic() - sampler.last_report < 1.0
        assert fuse.held(FUSE_STATFS) == 1  # one call in flight, no pile-up

        fuse.answer()
        answered_at = len(events)
        await until(
            lambda: sum(isinstance(e, VolumeSampled) for e in events[answered_at:]) >= 2,
            5,
            "samples again",
        )
        assert sampler.hung_since is None
        sampler.stop()
        ticks.stop()

    asyncio.run(scenario())


def test_a_replaced_sampler_does_not_pile_up_blocked_calls(fuse: HangingFuse) -> None:
    """A reload replaces the sampler; the old one's thread cannot be joined while its call
    hangs. The new one waits for that call instead of making a second one, and reports
    the hang from its start."""

    async def scenario() -> None:
        events: list[Event] = []
        config = volume_config(fuse.mountpoint)
        old = VolumeSampler(config, events.append, lambda: False, deadline=0.5)
        old.start()
        await until(lambda: events, 5, "a sample")
        fuse.hang()
        await until(lambda: fuse.held(FUSE_STATFS) == 1, 5, "a statfs held")
        old.stop()
        news = []
        for _ in range(5):  # five reloads while it hangs
            new = VolumeSampler(config, events.append, lambda: False, deadline=0.5)
            new.start()
            news.append(new)
            mark = len(events)
            await until(
                lambda mark=mark: any(isinstance(e, VolumeUnavailable) for e in events[mark:]),
                5,
                "the new sampler to report the hang",
            )
            assert new.hung_since is not None
            new.stop()
        assert fuse.held() == 1 and fuse.held_total == 1
        current = VolumeSampler(config, events.append, lambda: False, deadline=0.5)
        current.start()
        fuse.answer()
        mark = len(events)
        await until(
            lambda: any(isinstance(e, VolumeSampled) for e in events[mark:]), 5, "samples again"
        )
        current.stop()

    asyncio.run(scenario())


def test_a_local_volume_is_sampled_off_the_loop(tmp_path: Path) -> None:
    async def scenario() -> None:
        events: list[Event] = []
        sampler = VolumeSampler(
            volume_config(tmp_path, require_mount=False), events.append, lambda: False
        )
        sampler.start()
        await until(lambda: len(events) >= 3, 5, "samples")
        assert all(isinstance(e, VolumeSampled) for e in events)
        assert sampler.samples == len(events)
        thread = sampler._thread
        assert thread is not None and thread.name == "sampler net"
        sampler.stop()
        thread.join(5)
        assert not thread.is_alive()

    asyncio.run(scenario())
