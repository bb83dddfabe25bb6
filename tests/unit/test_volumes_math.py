"""volumes.py, the pure parts: the fill rate and the adaptive poll interval."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spaceguard.config import VolumeConfig
from spaceguard.quantities import Threshold
from spaceguard.volumes import MAX_FILE_CREATE_RATE, FillRate, Usage, poll_interval

GiB = 1024**3
MiB = 1024**2
SIZE = 100 * GiB  # pause below 5 GiB
FILES = 1_000_000  # pause below 10 000 inodes


def volume(**changes: object) -> VolumeConfig:
    base: dict[str, object] = {
        "name": "space",
        "path": "/space",
        "pause_below": Threshold(percent=5.0),
        "resume_above": Threshold(percent=10.0),
        "pause_below_inodes": Threshold(percent=1.0),
        "resume_above_inodes": Threshold(percent=2.0),
        "resume_after": 120.0,
        "predict": 600.0,
        "max_write_speed": 2 * GiB,
        "poll_min": 0.001,
        "poll_max": 1.0,
    }
    base.update(changes)
    return VolumeConfig(**base)  # type: ignore[arg-type]


def usage(avail: int, files_free: int = FILES // 2, files: int = FILES) -> Usage:
    return Usage(avail_bytes=avail, size_bytes=SIZE, avail_files=files_free, files=files, fsid=1)


# --- FillRate ---------------------------------------------------------------------------


def test_a_single_sample_has_no_rate() -> None:
    assert FillRate().add(10.0, 50 * GiB) == 0.0


def test_zero_span_has_no_rate() -> None:
    rate = FillRate()
    rate.add(10.0, 50 * GiB)
    assert rate.add(10.0, 40 * GiB) == 0.0  # two samples at the same instant: no division


def test_rate_from_samples() -> None:
    rate = FillRate(window=1.0)
    rate.add(0.0, 100 * MiB)
    assert rate.add(0.5, 90 * MiB) == pytest.approx(20 * MiB)
    # freeing space is a negative fill rate
    rate = FillRate(window=1.0)
    rate.add(0.0, 100 * MiB)
    assert rate.add(0.25, 101 * MiB) == pytest.approx(-4 * MiB)


def test_window_trimming() -> None:
    rate = FillRate(window=1.0)
    rate.add(0.0, 1000 * MiB)  # a fast burst, then a slow second
    rate.add(0.1, 900 * MiB)
    for step in range(1, 21):
        current = rate.add(0.1 + step * 0.1, 900 * MiB - step * MiB)
    # only the last second of samples (10 MiB/s) counts, not the burst
    assert current == pytest.approx(10 * MiB, rel=0.05)
    assert rate.samples[-1][0] - rate.samples[0][0] <= 1.0 + 1e-9
    assert len(rate.samples) <= 12


def test_two_samples_are_kept_even_if_far_apart() -> None:
    rate = FillRate(window=1.0)
    rate.add(0.0, 100 * MiB)
    assert rate.add(10.0, 90 * MiB) == pytest.approx(1 * MiB)
    assert len(rate.samples) == 2
    assert rate.add(20.0, 80 * MiB) == pytest.approx(1 * MiB)
    assert len(rate.samples) == 2


def test_reset() -> None:
    rate = FillRate()
    rate.add(0.0, 100 * MiB)
    rate.reset()
    assert rate.add(1.0, 0) == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 10 * GiB)), min_size=1, max_size=50))
def test_the_rate_is_the_slope_over_the_kept_samples(steps: list[tuple[float, int]]) -> None:
    rate, now = FillRate(window=1.0), 0.0
    for dt, avail in steps:
        now += dt
        value = rate.add(now, avail)
        first_time, first_avail = rate.samples[0]
        if now > first_time:
            assert value == pytest.approx((first_avail - avail) / (now - first_time))
        else:
            assert value == 0.0
        # at most two samples, or only those inside the window (plus the one that opens it)
        assert len(rate.samples) <= 2 or now - rate.samples[1][0] < 1.0


# --- poll_interval -------------------------------------------------------------------------


def test_far_from_every_threshold_polls_slowly() -> None:
    assert poll_interval(volume(), usage(80 * GiB), 0.0, low=False) == 1.0
    assert poll_interval(volume(poll_max=2.0), usage(80 * GiB, FILES), 0.0, low=False) == 2.0
    # with plenty of both, the slower of the two clocks still bounds it: inodes here
    assert poll_interval(
        volume(poll_max=5.0), usage(80 * GiB, FILES), 0.0, low=False
    ) == pytest.approx((FILES - 10_000) / MAX_FILE_CREATE_RATE / 2)


def test_near_the_threshold_polls_fast() -> None:
    # 1 MiB of headroom at 2 GiB/s: gone in 0.5 ms; half of that, clamped to poll_min
    interval = poll_interval(volume(), usage(5 * GiB + MiB), 0.0, low=False)
    assert interval == 0.001
    assert poll_interval(volume(poll_min=0.01), usage(5 * GiB), 0.0, low=False) == 0.01
    assert poll_interval(volume(), usage(0), 0.0, low=False) == 0.001  # below: as fast as allowed


def test_half_the_headroom_at_max_write_speed() -> None:
    # 1 GiB above pause_below, 2 GiB/s → 0.5 s to fill → sample every 0.25 s
    assert poll_interval(volume(), usage(6 * GiB), 0.0, low=False) == pytest.approx(0.25)
    # a slower disk: 1 GiB/s → 0.5 s
    assert poll_interval(
        volume(max_write_speed=GiB), usage(6 * GiB), 0.0, low=False
    ) == pytest.approx(0.5)


def test_an_observed_file_creation_rate_counts_too() -> None:
    # 30 000 inodes above pause_below_inodes (10 000), no bytes pressure
    near = usage(80 * GiB, files_free=40_000)
    assumed = poll_interval(volume(poll_max=5.0), near, 0.0, low=False)
    assert assumed == pytest.approx(30_000 / MAX_FILE_CREATE_RATE / 2)
    # files created at 1,000,000/s: assume twice that
    seen = poll_interval(volume(poll_max=5.0), near, 0.0, low=False, file_rate=1e6)
    assert seen == pytest.approx(30_000 / 2e6 / 2)
    # a slow creation rate does not lengthen it beyond the assumed one
    assert poll_interval(volume(poll_max=5.0), near, 0.0, False, 10.0) == pytest.approx(assumed)
    # at this rate the inodes are gone before a timer could fire: the next loop turn
    close = usage(80 * GiB, files_free=10_500)
    assert poll_interval(volume(), close, 0.0, low=False, file_rate=1e6) == 0.0


def test_an_observed_rate_faster_than_max_write_speed_counts() -> None:
    # observed 4 GiB/s → assume twice that: 8 GiB/s → 1 GiB lasts 0.125 s → 0.0625 s
    assert poll_interval(volume(), usage(6 * GiB), 4 * GiB, low=False) == pytest.approx(0.0625)
    # a slow observed rate does not lengthen the interval beyond max_write_speed's
    assert poll_interval(volume(), usage(6 * GiB), MiB, low=False) == pytest.approx(0.25)
    assert poll_interval(volume(), usage(6 * GiB), -GiB, low=False) == pytest.approx(0.25)


def test_inode_headroom() -> None:
    # plenty of bytes, 10 000 inodes above the pause threshold at 200 000 files/s
    files_free = 10_000 + 10_000
    expected = 10_000 / MAX_FILE_CREATE_RATE / 2
    assert poll_interval(volume(), usage(80 * GiB, files_free), 0.0, low=False) == pytest.approx(
        expected
    )
    # a file system without inode counts only looks at bytes
    assert poll_interval(volume(), usage(80 * GiB, 0, 0), 0.0, low=False) == 1.0


def test_when_low_the_poll_is_relaxed_but_frequent() -> None:
    assert poll_interval(volume(), usage(0), GiB, low=True) == 0.25
    assert poll_interval(volume(), usage(80 * GiB), 0.0, low=True) <= 0.25
    assert poll_interval(volume(poll_max=0.1), usage(0), 0.0, low=True) == 0.1


@settings(max_examples=300, deadline=None)
@given(
    avail=st.integers(0, SIZE),
    files_free=st.integers(0, FILES),
    rate=st.floats(-10 * GiB, 10 * GiB),
    low=st.booleans(),
    poll_min=st.sampled_from([0.001, 0.01, 0.1]),
    poll_max=st.sampled_from([0.5, 1.0, 10.0]),
)
def test_the_interval_is_always_within_bounds(
    avail: int, files_free: int, rate: float, low: bool, poll_min: float, poll_max: float
) -> None:
    config = volume(poll_min=poll_min, poll_max=poll_max)
    interval = poll_interval(config, usage(avail, files_free), rate, low)
    if interval == 0.0:
        # only when the threshold falls before a timer could fire again: next loop turn
        assert not low and rate > 0 and avail - 5 * GiB <= rate * poll_min
        return
    assert poll_min <= interval <= poll_max
    if low:
        assert interval <= 0.25
    elif interval > poll_min:
        # a writer at full speed cannot cross the pause threshold before the next sample
        speed = max(config.max_write_speed, 2 * rate)
        assert interval * speed <= avail - 5 * GiB


def test_an_imminent_crossing_is_sampled_on_the_next_loop_turn() -> None:
    # 1 MiB above the 5 GiB threshold, filling at 2 GiB/s: crossed in 0.5 ms, before a
    # 1 ms timer could fire
    assert poll_interval(volume(), usage(5 * GiB + MiB), 2.0 * GiB, low=False) == 0.0
    # the same headroom at 100 MiB/s is 10 ms away: a timer will do
    assert poll_interval(volume(), usage(5 * GiB + MiB), 100.0 * MiB, low=False) > 0
    # not filling (rate <= 0): never spin
    assert poll_interval(volume(), usage(5 * GiB + 1), 0.0, low=False) > 0
