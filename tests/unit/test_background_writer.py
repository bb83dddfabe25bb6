"""The background writer (atomicfile.BackgroundWriter) and the state store on it: one writer
thread, the latest content of a key wins, bounded, failures kept and retried with backoff.

"A slow disk" here is a job that blocks on an Event: the writer thread is stuck in it the
way it would be in an fsync behind a slow device (this machine's kernel has no dm-delay, so
there is no real slow block device to put a file system on). The faults the store meets for
real (ENOSPC, read-only, EACCES, a directory) are injected on real files in tmp_path; the
integration test test_state_faults.py does the same to the real guard on a loop volume.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
from spaceguard.atomicfile import BackgroundWriter
from spaceguard.model import GuardState, Hold, MigrationState
from spaceguard.state import StateStore

WAIT = 10.0  # generous: a deadline for threads, never a measured duration


class SlowDisk:
    """Jobs that block until released, recording what was written in which order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.written: list[str] = []
        self.threads: set[str] = set()

    def job(self, what: str) -> object:
        def run() -> None:
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            assert self.release.wait(WAIT)
            self.written.append(what)

        return run


def test_the_latest_content_wins_behind_a_slow_disk() -> None:
    writer = BackgroundWriter("test", max_pending=4)
    disk = SlowDisk()
    assert writer.submit("state", disk.job("v0"))  # type: ignore[arg-type]
    assert disk.entered.wait(WAIT)  # v0 is being written: the disk is "slow"
    for version in range(1, 1000):  # 999 changes meanwhile
        assert writer.submit("state", disk.job(f"v{version}"))  # type: ignore[arg-type]
    assert writer.health().pending == 1  # coalesced: one waiting copy, not 999
    disk.release.set()
    assert writer.flush(WAIT)
    assert disk.written == ["v0", "v999"]  # the one in flight, then only the newest
    assert disk.threads == {"test"}  # one writer thread did every write
    assert writer.health().written_total == 2
    writer.close()


def test_pending_keys_are_bounded() -> None:
    writer = BackgroundWriter("test", max_pending=2)
    disk = SlowDisk()
    writer.submit("busy", disk.job("busy"))  # type: ignore[arg-type]
    assert disk.entered.wait(WAIT)
    assert writer.submit("a", disk.job("a"))  # type: ignore[arg-type]
    # the key being written holds its place: were its write to fail, it would wait again
    assert not writer.submit("b", disk.job("b"))  # type: ignore[arg-type]
    assert writer.submit("a", disk.job("a2"))  # type: ignore[arg-type]  # a replacement fits
    assert writer.submit("busy", disk.job("busy2"))  # type: ignore[arg-type]  # this one too
    assert writer.health().dropped_total == 1
    disk.release.set()
    assert writer.flush(WAIT)
    assert disk.written == ["busy", "a2", "busy2"]
    writer.close()


def test_a_failing_write_in_flight_counts_against_the_bound() -> None:
    """A job that fails goes back to the queue: the keys held never exceed max_pending,
    whether the limit is met while the failing write is in flight or in its backoff."""
    writer = BackgroundWriter("test", max_pending=2, initial_backoff=5.0, max_backoff=5.0)
    entered, release = threading.Event(), threading.Event()

    def failing() -> None:
        entered.set()
        assert release.wait(WAIT)
        raise OSError(errno.ENOSPC, "No space left on device")

    assert writer.submit("first", failing)
    assert entered.wait(WAIT)  # in flight
    assert writer.submit("second", failing)
    assert not writer.submit("third", failing)  # (before: taken, and three were kept)
    release.set()
    assert not writer.flush(WAIT)  # the first failed again: it is back in the queue
    assert writer.health().pending == 2
    assert not writer.submit("third", failing)  # and in its backoff it still counts
    assert writer.health().dropped_total == 2
    writer.close(timeout=0.1)


def test_a_failing_write_is_kept_retried_and_reported() -> None:
    writer = BackgroundWriter("test", initial_backoff=0.01, max_backoff=0.02)
    attempts: list[int] = []
    healthy = threading.Event()

    def job() -> None:
        attempts.append(1)
        if not healthy.is_set():
            raise OSError(errno.ENOSPC, "No space left on device", "/state/state.json")

    writer.submit("state", job)
    assert not writer.flush(WAIT)  # fails: flush says so instead of hanging
    health = writer.health()
    assert not health.writable and health.pending == 1
    assert health.last_error == "No space left on device: /state/state.json"
    assert health.failing_since is not None and health.errors_total >= 1
    healthy.set()  # the fault clears: the next retry (after the backoff) writes it
    assert writer.flush(WAIT)
    health = writer.health()
    assert health.writable and health.pending == 0 and health.last_error == ""
    assert health.errors_total == len(attempts) - 1
    writer.close()


def test_a_newer_job_replaces_a_failed_one() -> None:
    writer = BackgroundWriter("test", initial_backoff=0.01, max_backoff=0.01)
    written: list[str] = []
    broken = True

    def job(what: str) -> object:
        def run() -> None:
            if broken:
                raise OSError(errno.EROFS, "Read-only file system")
            written.append(what)

        return run

    writer.submit("state", job("old"))  # type: ignore[arg-type]
    assert not writer.flush(WAIT)
    writer.submit("state", job("new"))  # type: ignore[arg-type]
    broken = False
    assert writer.flush(WAIT)
    assert written == ["new"]
    writer.close()


def test_close_gives_up_on_a_broken_disk_and_says_what_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = BackgroundWriter("test", initial_backoff=5.0, max_backoff=5.0)

    def job() -> None:
        raise OSError(errno.EACCES, "Permission denied")

    writer.submit("state", job)
    assert not writer.close(timeout=WAIT)
    assert "not written at shutdown: state" in caplog.text
    assert not writer.submit("state", job)  # closed


# --- the state store on it -----------------------------------------------------------------


def state(seq: int) -> GuardState:
    return GuardState(
        incident_seq=seq,
        migrations={
            "alice": MigrationState(
                account="alice",
                hold=Hold(by="guard", reason="space", since=1000.0),
                paused_units=frozenset({"m365-migrate@alice.service"}),
            )
        },
    )


def saved_seq(directory: Path) -> int:
    return int(json.loads((directory / "state.json").read_bytes())["state"]["incident_seq"])


def test_store_write_failure_keeps_the_last_good_file_and_writes_the_latest_later(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    store.writer.initial_backoff = store.writer.max_backoff = 0.01
    assert store.save(state(1), {})
    # someone moves the good file away and puts a directory in its place: every rename
    # onto it fails (EISDIR), for root too
    (tmp_path / "state.json").rename(tmp_path / "good.json")
    (tmp_path / "state.json").mkdir()
    (tmp_path / "state.json" / "x").write_text("")
    for seq in range(2, 50):
        assert store.save_soon(state(seq), {})
    assert not store.flush(WAIT)
    health = store.health()
    assert not health.writable and health.pending == 1  # one copy waits: the newest
    assert "Is a directory" in health.last_error
    assert saved_seq_file(tmp_path / "good.json") == 1  # the last good state, intact
    (tmp_path / "state.json" / "x").unlink()
    (tmp_path / "state.json").rmdir()
    assert store.flush(WAIT)
    assert saved_seq(tmp_path) == 49  # complete and the newest
    assert store.health().writable
    store.close()


def saved_seq_file(path: Path) -> int:
    return int(json.loads(path.read_bytes())["state"]["incident_seq"])


def test_a_state_file_that_is_a_directory_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    store = StateStore(tmp_path)
    assert store.load() is None
    assert "cannot be read" in store.problem and "set aside" in store.problem
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
    assert store.save(state(3), {})
    assert saved_seq(tmp_path) == 3
    store.close()


def test_an_unreadable_state_file_is_set_aside_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    store = StateStore(tmp_path)
    assert store.save(state(7), {})
    real_read = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    again = StateStore(tmp_path)
    assert again.load() is None
    assert "Permission denied" in again.problem
    monkeypatch.undo()
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert saved_seq_file(aside) == 7  # kept for a person, whole
    store.close()
    again.close()


def test_a_bad_file_that_cannot_be_set_aside_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "state.json").mkdir()

    def read_only(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "rename", read_only)
    store = StateStore(tmp_path)
    assert store.load() is None
    assert "could not set it aside either (Read-only file system)" in store.problem
    store.close()
