"""MigrationLog: one migration's log bound to its rules; what its events and incidents carry."""

from __future__ import annotations

from pathlib import Path

from spaceguard.model import FailureClass
from spaceguard.rclone import compile_rules
from spaceguard.runtime import CONTEXT_BEFORE, CONTEXT_LINES, MigrationLog

AUTH = "2025/01/01 10:00:00 CRITICAL: Failed to create file system: invalid_grant"
ENOSPC = (
    "2025/01/01 10:00:01 ERROR : a.bin: Failed to copy: write /space/a.bin: no space left on device"
)


def info(n: int) -> str:
    return f"2025/01/01 10:00:00 INFO  : file-{n}: Copied (new)"


def make() -> MigrationLog:
    return MigrationLog("alice", Path("/var/log/alice.log"), compile_rules())


def test_quiet_lines_make_no_event_but_are_counted() -> None:
    log = make()
    assert log.feed(["plain wrapper output", "more"]) is None
    assert log.lines_read == 2
    assert not log.errors


def test_a_classified_line_travels_with_the_lines_before_it_even_across_batches() -> None:
    log = make()
    log.feed([info(n) for n in range(30)])
    event = log.feed([info(30), info(31), AUTH, info(32)])
    assert event is not None and len(event.failures) == 1
    evidence = event.failures[0]
    assert evidence.failure_class is FailureClass.UNRECOVERABLE
    assert evidence.line == AUTH
    assert evidence.seq == 32  # the 33rd line read
    assert evidence.before == tuple(info(n) for n in range(32 - CONTEXT_BEFORE, 32))
    assert log.errors[FailureClass.UNRECOVERABLE] == 1


def test_the_incident_context_adds_the_lines_read_after_the_match_by_number() -> None:
    log = make()
    event = log.feed([info(0), AUTH])
    assert event is not None
    evidence = event.failures[0]
    log.feed([info(1), AUTH, info(2)])  # the same text again must not be taken for it
    context = log.context_for(evidence)
    assert context == [info(0), AUTH, info(1), AUTH, info(2)]
    later = log.feed([AUTH])
    assert later is not None
    assert log.context_for(later.failures[0]) == [info(0), AUTH, info(1), AUTH, info(2), AUTH]


def test_two_matches_in_one_batch_each_have_their_own_context() -> None:
    log = make()
    event = log.feed([info(0), AUTH, info(1), ENOSPC])
    assert event is not None
    first, second = event.failures
    assert (first.seq, first.before) == (1, (info(0),))
    assert second.failure_class is FailureClass.DISK_FULL
    assert (second.seq, second.before) == (3, (info(0), AUTH, info(1)))


def test_without_evidence_the_incident_quotes_the_latest_lines() -> None:
    log = make()
    log.feed([info(n) for n in range(100)])
    assert log.context_for(None) == [info(n) for n in range(60, 100)]


def test_memory_is_bounded_by_the_context_window() -> None:
    log = make()
    for batch in range(50):
        log.feed([info(batch * 100 + n) for n in range(100)])
    assert log.lines_read == 5000
    assert len(log._recent) == CONTEXT_LINES


def test_rebind_keeps_progress_context_and_counts() -> None:
    log = make()
    log.feed(["Transferred:   \t    1.000 GiB / 2.000 GiB, 50%, 10 MiB/s, ETA 1m", AUTH])
    progress = log.parser.progress
    assert progress is not None and progress.bytes_transferred
    log.rebind(Path("/var/log/other.log"), compile_rules())
    assert log.parser.progress == progress
    assert log.path == Path("/var/log/other.log")
    assert log.lines_read == 2 and log.errors[FailureClass.UNRECOVERABLE] == 1
