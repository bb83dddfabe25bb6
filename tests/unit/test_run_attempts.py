"""What the real migrations of tests/integration/test_real_migrations.py found in the pure
core: rclone's own retries (--retries, 3 by default) log every failed item once per
attempt, and rclone names objects on lines no known message explains (NOTICE lines)."""

from __future__ import annotations

from pathlib import Path

from spaceguard.model import (
    FailureClass,
    ItemErrors,
    LogParsed,
    MigrationState,
    UnitChanged,
    UnitView,
    WriteIncident,
)
from spaceguard.policy import is_current_line
from spaceguard.rclone import ClassifyRule, RcloneLogParser, compile_rules, object_name
from spaceguard.runtime import MigrationLog
from test_policy import ALICE, DEAD, failed, make_config, of_type, started_guard, unit_actions

U, T = FailureClass.UNRECOVERABLE, FailureClass.TRANSIENT
STAMP = "2026/12/01 22:11:51"

# rclone 1.60, `copy` as nobody with its default --retries 3: each attempt logs the items
# that fail again, then a summary; the last summary (3/3) is followed by no attempt.
ITEMS = [
    "401 Unauthorized.txt: Failed to copy: failed to open source object: open /src/401 "
    "Unauthorized.txt: permission denied",
    'locked: failed to open directory "locked": open /src/locked: permission denied',
    "forbidden.txt: Failed to copy: failed to open source object: open /src/forbidden.txt: "
    "permission denied",
]


def attempt(number: int, of: int = 3, failing: list[str] = ITEMS) -> list[str]:
    return [
        *(f"{STAMP} ERROR : {item}" for item in failing),
        f"{STAMP} INFO  : doc-{number}.txt: Copied (new)",
        f"{STAMP} ERROR : Attempt {number}/{of} failed with {len(failing)} errors and: "
        "failed to open source object: open /src/forbidden.txt: permission denied",
    ]


FINAL = (
    f"{STAMP} Failed to copy with 3 errors: last error was: failed to open source object: "
    "open /src/forbidden.txt: permission denied"
)


def test_a_summary_that_rclone_follows_with_another_attempt_is_reported() -> None:
    lines = [*attempt(1), *attempt(2), *attempt(3), FINAL]
    result = RcloneLogParser().feed(lines)
    assert [number for number, _at in result.attempts_ended] == [4, 9]  # not 3/3
    assert len(result.failures) == 9  # every line is still a classified item error
    assert {f.scope for f in result.failures} == {"item"}


def test_json_attempt_summaries_too() -> None:
    line = (
        '{"level":"error","msg":"Attempt 1/3 failed with 2 errors and: permission denied",'
        '"source":"cmd/cmd.go:1","time":"2026-12-01T22:11:51Z"}'
    )
    last = line.replace("1/3", "3/3")
    result = RcloneLogParser().feed([line, last])
    assert result.attempts_ended == [(0, 1796163111.0)]
    assert result.failures == []


def test_the_runs_item_errors_are_its_last_attempts() -> None:
    log = MigrationLog("alice", Path("/l"), compile_rules())
    events = [log.feed(attempt(1)), log.feed([*attempt(2), *attempt(3)[:2]])]
    first, second = events
    assert first is not None and second is not None
    assert first.new_attempt and first.items is None
    assert first.superseded is not None and first.superseded.total == 3
    # the second batch: attempt 2's items are superseded by attempt 3's first two
    assert second.new_attempt
    assert second.superseded is not None and second.superseded.total == 3
    assert second.items is not None
    assert [item.path for item in second.items.shown] == ["401 Unauthorized.txt", "locked"]
    # the metrics count every line rclone wrote
    assert sum(log.item_errors.values()) == 8


def test_an_earlier_runs_attempt_summary_does_not_reset_the_current_run() -> None:
    log = MigrationLog("alice", Path("/l"), compile_rules())
    state = MigrationState("alice", units={ALICE: UnitView("active", "running", started_at=1e10)})
    event = log.feed(attempt(1), True, lambda at, backlog: is_current_line(state, at, backlog))
    assert event is None or not event.new_attempt


def test_the_incident_lists_each_failed_item_once_not_once_per_attempt() -> None:
    guard = started_guard()
    log = MigrationLog("alice", Path("/l"), compile_rules())
    for batch in (attempt(1), attempt(2), [*attempt(3), FINAL]):
        event = log.feed(batch)
        assert event is not None
        guard(event, after=1)
    assert guard.m("alice").run_items.total == 3
    actions = guard(UnitChanged(ALICE, failed(1)), after=1)
    actions += guard(UnitChanged(ALICE, failed(1)), after=1)
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["trigger"] == "item-errors"
    assert incident.record["items"]["total"] == 3
    assert sorted(item["path"] for item in incident.record["items"]["failed"]) == sorted(
        ["401 Unauthorized.txt", "locked", "forbidden.txt"]
    )


def test_items_that_a_later_attempt_copied_leave_a_successful_run() -> None:
    guard = started_guard()
    log = MigrationLog("alice", Path("/l"), compile_rules())
    for batch in (attempt(1, failing=ITEMS[:1]), [f"{STAMP} INFO  : x.txt: Copied (new)"]):
        event = log.feed(batch)
        assert event is not None
        guard(event, after=1)
    actions = guard(UnitChanged(ALICE, DEAD), after=1)  # rclone exited 0
    assert of_type(actions, WriteIncident) == []
    assert guard.m("alice").finished and guard.m("alice").failure is None


def test_the_breaker_counts_the_attempts_rclone_tried_again() -> None:
    """300 items fail, rclone ends its first attempt and will try again, all in one batch:
    the breaker trips on the attempt that ended, and the incident reports its items."""
    guard = started_guard(make_config(max_item_errors=5))
    log = MigrationLog("alice", Path("/l"), compile_rules())
    failing = [f"f{n}.bin: Failed to copy: permission denied" for n in range(300)]
    event = log.feed(attempt(1, of=20, failing=failing))
    assert event is not None and event.items is None
    actions = guard(event, after=1)
    assert unit_actions(actions) == [("stop", ALICE, "failure")]
    failure = guard.m("alice").failure
    assert failure is not None and failure.trigger == "item-error-rate"
    assert failure.failure_class == U  # permission denied is not worth a retry
    assert guard.m("alice").run_items.total == 300  # what the incident will list
    # the next attempt, logged before the stop lands, adds to it; it resets nothing
    second = log.feed(attempt(2, of=20, failing=failing[:10]))
    assert second is not None
    guard(second, after=1)
    assert guard.m("alice").run_items.total == 310


def test_a_whole_run_breaker_window_is_one_bucket() -> None:
    guard = started_guard(make_config(max_item_errors=1000, item_error_window="0s"))
    for _ in range(50):
        guard(LogParsed("alice", items=ItemErrors(total=1, by_rule=(("r", U, 1),))), after=3600)
    assert guard.m("alice").item_window[0][1] == 50
    assert len(guard.m("alice").item_window) == 1


# --- names on lines that no known message explains -------------------------------------


def test_a_notice_naming_an_item_is_not_classified_by_its_name() -> None:
    lines = [
        # rclone 1.60 on a symlink called "401 Unauthorized link" (local source, no -L)
        f"{STAMP} NOTICE: 401 Unauthorized link: Can't follow symlink without -L/--copy-links",
        f"{STAMP} ERROR : forbidden 403.bin: corrupted on transfer: sizes differ 1 vs 2",
    ]
    assert RcloneLogParser().feed(lines).failures == []


def test_what_follows_the_object_is_still_classified() -> None:
    lines = [
        f"{STAMP} NOTICE: big.bin: too many requests, backing off",
        f"{STAMP} ERROR : webdav root '': Statfs failed: 401 Unauthorized",
        f'{STAMP} CRITICAL: Failed to create file system for "x:": something odd',
        f"{STAMP} ERROR : 401 Unauthorized.docx: 401 Unauthorized",  # name and cause
    ]
    failures = RcloneLogParser().feed(lines).failures
    assert [(f.rule, f.failure_class, f.scope, f.object) for f in failures] == [
        ("too_many_requests", T, "run", "big.bin"),
        ("unauthorized", U, "run", "webdav root ''"),
        ("create_fs_failed", U, "run", ""),
        ("unauthorized", U, "run", "401 Unauthorized.docx"),
    ]


def test_your_rules_still_see_the_whole_line() -> None:
    """A rule of the config may name a wrapper's own lines, object and all."""
    rules = compile_rules([ClassifyRule("gave_up", r"^m365-migrate-to-space\.sh: giving up", U)])
    line = f"{STAMP} NOTICE: m365-migrate-to-space.sh: giving up after 3 tries"
    (failure,) = RcloneLogParser(rules).feed([line]).failures
    assert (failure.rule, failure.object) == ("gave_up", "m365-migrate-to-space.sh")


def test_object_name() -> None:
    assert object_name("a b: c: d") == "a b"
    assert object_name("no object here") == ""
    assert object_name(": x") == ""
    assert object_name("trailing: ") == ""
