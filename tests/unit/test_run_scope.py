"""Scenario 1 on real migrations (pure parts): the scope of an error, the current run, the
circuit breaker, the outcomes of a run, and pausing units that cannot be frozen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from spaceguard.model import (
    ITEM_SAMPLES,
    ActionDone,
    BusChanged,
    FailureClass,
    ItemError,
    ItemErrors,
    LogParsed,
    MigrationState,
    OperatorRequest,
    RaiseAlert,
    ReadUnit,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    WriteIncident,
    migration_state,
)
from spaceguard.policy import diagnostics, is_current_line, pause_mode
from spaceguard.rclone import (
    RcloneLogParser,
    compile_rules,
    mask_name,
    split_text,
    text_line_time,
)
from spaceguard.runtime import MigrationLog
from test_policy import (
    ALICE,
    DEAD,
    RUNNING,
    T0,
    Guard,
    failed,
    make_config,
    of_type,
    sample,
    started_guard,
    unit_actions,
)

U, T, D = FailureClass.UNRECOVERABLE, FailureClass.TRANSIENT, FailureClass.DISK_FULL

# Lines as rclone 1.60 wrote them here (copy as an unprivileged user: an unreadable file,
# an unreadable folder, a file named "401 Unauthorized.txt", a missing source root).
STAMP = "2026/12/01 21:57:50"
ITEM_LINES = [
    f'{STAMP} ERROR : locked: failed to open directory "locked": open /src/locked: '
    "permission denied",
    f"{STAMP} ERROR : noread.bin: Failed to copy: failed to open source object: open "
    "/src/noread.bin: permission denied",
    f"{STAMP} ERROR : 401 Unauthorized.txt: Failed to copy: open /dst/401 Unauthorized.txt: "
    "permission denied",
    f"{STAMP} ERROR : shared/budget.xlsx: Failed to copy: accessDenied: Access denied",
    f"{STAMP} ERROR : gone/: error reading source directory: directory not found",
    f"{STAMP} ERROR : big.bin: Failed to copy: 429 Too Many Requests",
]
SUMMARY_LINES = [
    f"{STAMP} ERROR : Attempt 1/2 failed with 2 errors and: failed to open source object: "
    "open /src/noread.bin: permission denied",
    f"{STAMP} Failed to copy with 2 errors: last error was: failed to open source object: "
    "open /src/noread.bin: permission denied",
]
RUN_LINES = [
    f"{STAMP} ERROR : Local file system at /src/nonexist: error reading source root directory: "
    "directory not found",
    f"{STAMP} Failed to copy: directory not found",
    f'{STAMP} CRITICAL: Failed to create file system for "m365-alice:": couldn\'t fetch token',
    f"{STAMP} ERROR : doc.docx: Failed to copy: 401 Unauthorized: InvalidAuthenticationToken",
]


# --- the structure of a line ---------------------------------------------------------------


def test_item_errors_name_their_item_and_classify_only_the_message() -> None:
    failures = RcloneLogParser().feed(ITEM_LINES).failures
    assert [f.scope for f in failures] == ["item"] * len(ITEM_LINES)
    assert [f.object for f in failures] == [
        "locked", "noread.bin", "401 Unauthorized.txt", "shared/budget.xlsx", "gone/", "big.bin",
    ]  # fmt: skip
    by_object = {f.object: f for f in failures}
    # the name says 401, the message says permission denied: never an auth failure
    assert by_object["401 Unauthorized.txt"].rule == "local_permission"
    assert by_object["shared/budget.xlsx"].rule == "forbidden"
    assert by_object["gone/"].rule == "directory_not_found"
    assert by_object["big.bin"].failure_class == T


def test_a_name_that_looks_like_an_error_is_not_one() -> None:
    line = f"{STAMP} INFO  : forbidden 401 Unauthorized.txt: Copied (new)"
    assert RcloneLogParser().feed([line]).failures == []
    notice = (
        f"{STAMP} NOTICE: 401 Unauthorized - forbidden.txt: Failed to set modification time: ok"
    )
    assert RcloneLogParser().feed([notice]).failures == []


def test_summaries_repeat_item_errors_and_are_not_failures() -> None:
    assert RcloneLogParser().feed(SUMMARY_LINES).failures == []


def test_run_level_errors() -> None:
    failures = RcloneLogParser().feed(RUN_LINES).failures
    assert [f.scope for f in failures] == ["run"] * 4
    assert [f.rule for f in failures] == [
        "directory_not_found", "directory_not_found", "token_error", "unauthorized",
    ]  # fmt: skip


def test_json_lines_have_object_and_message_apart() -> None:
    item = (
        '{"level":"error","msg":"Failed to copy: failed to open source object: permission '
        'denied","object":"401 Unauthorized.txt","objectType":"*local.Object",'
        '"source":"operations/copy.go:1","time":"2026-12-01T21:57:50.123456+00:00"}'
    )
    run = (
        '{"level":"error","msg":"error reading source root directory: directory not found",'
        '"object":"Local file system at /x","time":"2026-12-01T21:57:50Z"}'
    )
    first, second = RcloneLogParser().feed([item, run]).failures
    assert (first.scope, first.object, first.rule) == (
        "item",
        "401 Unauthorized.txt",
        "local_permission",
    )
    assert first.logged_at == pytest.approx(1796162270.123456)
    assert (second.scope, second.rule) == ("run", "directory_not_found")


def test_mask_name_hides_the_item_even_inside_a_path() -> None:
    assert mask_name(
        "open /dst/401 Unauthorized.txt: permission denied", "401 Unauthorized.txt"
    ) == ("open /dst/<item>: permission denied")
    assert mask_name("a permission denied", "a") == "<item> permission denied"
    assert mask_name("xa: ab", "a") == "xa: ab"


def test_split_text_takes_the_first_known_message() -> None:
    assert split_text("a: b: Failed to copy: x") == ("item", "a: b", "Failed to copy: x")
    assert split_text("just words") == ("run", "", "just words")


def test_line_times_local_and_utc() -> None:
    assert text_line_time("2026/12/01 21:57:50 ERROR : x", utc=True) == 1796162270.0
    assert text_line_time("2026/12/01 21:57:50.250000 ERROR : x", utc=True) == 1796162270.25
    assert text_line_time("2026/12/01 21:57:50 ERROR : x") == pytest.approx(
        __import__("time").mktime((2026, 12, 1, 21, 57, 50, 0, 0, -1))
    )
    assert text_line_time("no date here") is None
    assert text_line_time("2026/13/45 99:99:99 ERROR : x", utc=True) is None


# --- only the current run acts ----------------------------------------------------------


def test_current_line_rule() -> None:
    started = MigrationState(
        "alice", units={ALICE: UnitView("active", "running", started_at=1000.7)}
    )
    assert is_current_line(started, 1000.0, backlog=True)  # the run's first second
    assert not is_current_line(started, 999.0, backlog=False)  # dated before the start
    assert is_current_line(started, None, backlog=False)  # undated, appended while we read
    assert not is_current_line(started, None, backlog=True)  # undated, the file's past
    never = MigrationState("alice", units={ALICE: UnitView("inactive", "dead")})
    assert not is_current_line(never, 1.0, backlog=True)
    assert is_current_line(never, 1.0, backlog=False)


def test_an_earlier_runs_errors_in_the_backlog_never_act() -> None:
    log = MigrationLog("alice", Path("/l"), compile_rules(), utc=True)
    state = MigrationState(
        "alice", units={ALICE: UnitView("active", "running", started_at=1796162300.0)}
    )
    old = [*ITEM_LINES, *RUN_LINES, f"{STAMP} ERROR : a: Failed to copy: no space left on device"]
    event = log.feed(old, True, lambda at, backlog: is_current_line(state, at, backlog))
    assert event is None
    assert log.past_errors == len(old)


def test_run_level_and_disk_full_evidence_and_item_errors_are_apart() -> None:
    log = MigrationLog("alice", Path("/l"), compile_rules())
    enospc = f"{STAMP} ERROR : a.bin: Failed to copy: write /space/a.bin: no space left on device"
    event = log.feed([*ITEM_LINES, enospc, RUN_LINES[2]])
    assert event is not None and event.items is not None
    assert event.items.total == len(ITEM_LINES)
    assert [(e.failure_class, e.scope) for e in event.failures] == [(D, "item"), (U, "run")]
    assert [i.path for i in event.items.shown][:2] == ["locked", "noread.bin"]


def test_a_million_item_errors_are_kept_bounded() -> None:
    log = MigrationLog("alice", Path("/l"), compile_rules())
    total = ItemErrors()
    for batch in range(100):
        lines = [
            f"{STAMP} ERROR : f{batch}-{n}.bin: Failed to copy: permission denied"
            for n in range(1000)
        ]
        event = log.feed(lines)
        assert event is not None and event.items is not None
        total = total.plus(event.items)
    assert total.total == 100_000
    assert len(total.first) == ITEM_SAMPLES and len(total.last) == ITEM_SAMPLES
    assert total.first[0].path == "f0-0.bin" and total.last[-1].path == "f99-999.bin"
    assert total.by_rule == (("local_permission", U, 100_000),)


# --- the policy: item errors, the breaker, outcomes ---------------------------------------


@pytest.fixture(name="guard")
def started() -> Guard:
    return started_guard()


def items(n: int, cls: FailureClass = U, rule: str = "local_permission") -> ItemErrors:
    shown = tuple(ItemError(f"f{i}", cls, rule, "permission denied") for i in range(min(n, 3)))
    return ItemErrors(total=n, by_rule=((rule, cls, n),), first=shown)


def test_item_errors_never_stop_a_running_migration(guard: Guard) -> None:
    for _ in range(10):
        actions = guard(LogParsed("alice", items=items(40)), after=120)
        assert unit_actions(actions) == []
    assert guard.m("alice").run_items.total == 400
    assert guard.m("alice").failure is None


def test_the_breaker_trips_on_a_burst_of_item_errors(guard: Guard) -> None:
    guard(LogParsed("alice", items=items(300)), after=1)
    actions = guard(LogParsed("alice", items=items(201)), after=1)
    assert unit_actions(actions) == [("stop", ALICE, "failure")]
    failure = guard.m("alice").failure
    assert failure is not None and failure.trigger == "item-error-rate"
    assert failure.failure_class == U and "501 item errors" in failure.detail


def test_the_breaker_window_forgets_old_errors() -> None:
    guard = started_guard(make_config(max_item_errors=10, item_error_window="1m"))
    for _ in range(5):
        assert unit_actions(guard(LogParsed("alice", items=items(8)), after=61)) == []
    assert unit_actions(guard(LogParsed("alice", items=items(3)), after=1)) == [
        ("stop", ALICE, "failure")
    ]


def test_a_run_that_ends_with_item_errors_finished_with_item_errors(guard: Guard) -> None:
    guard(LogParsed("alice", items=items(2)), after=1)
    actions = guard(UnitChanged(ALICE, failed(1)), after=1)
    actions += guard(UnitChanged(ALICE, failed(1)), after=1)
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["trigger"] == "item-errors"
    assert incident.record["items"]["total"] == 2
    assert [i["path"] for i in incident.record["items"]["failed"]] == ["f0", "f1"]
    (alert,) = [a for a in of_type(actions, RaiseAlert) if a.key == "failed/alice"]
    assert (alert.name, alert.severity) == ("SpaceguardMigrationItemErrors", "warning")
    assert migration_state(guard.m("alice")) == "items_failed"
    assert unit_actions(guard(Tick(), after=86400)) == []


def test_only_transient_item_errors_are_retried(guard: Guard) -> None:
    guard(LogParsed("alice", items=items(2, T, "too_many_requests")), after=1)
    actions = guard(UnitChanged(ALICE, failed(1)), after=1)
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["class"] == "transient"
    assert guard.m("alice").failure.phase == "waiting-retry"


def test_a_new_run_starts_with_no_item_errors(guard: Guard) -> None:
    guard(LogParsed("alice", items=items(2)), after=1)
    guard(UnitChanged(ALICE, DEAD), after=1)
    guard(UnitChanged(ALICE, RUNNING), after=1)
    assert guard.m("alice").run_items.total == 0


@pytest.mark.parametrize("status", [0, 9])
def test_exit_0_and_9_are_success(guard: Guard, status: int) -> None:
    view = UnitView(
        "failed" if status else "inactive",
        "dead",
        result="exit-code" if status else "success",
        exec_code="exited",
        exec_status=status,
    )
    actions = guard(UnitChanged(ALICE, view), after=1)
    assert of_type(actions, WriteIncident) == []
    assert guard.m("alice").finished and guard.m("alice").failure is None


def test_run_start_is_remembered_from_systemd(guard: Guard) -> None:
    guard(UnitChanged(ALICE, UnitView("active", "running", started_at=T0 + 5)), after=1)
    assert guard.m("alice").run_started_at == T0 + 5
    assert not is_current_line(guard.m("alice"), math.floor(T0), backlog=False)


# --- wrappers -------------------------------------------------------------------------------


FROZEN_VIEW = UnitView("active", "running", freezer_state="frozen")
ONESHOT = UnitView("activating", "start", service_type="oneshot", started_at=T0)


def test_a_oneshot_wrapper_is_paused_by_stop_and_resumed_by_its_resume_unit() -> None:
    guard = started_guard()
    guard(UnitChanged(ALICE, ONESHOT), after=1)
    assert pause_mode(guard.config.migration("alice"), guard.m("alice")) == "stop"
    assert any("Type=oneshot" in note for note in diagnostics(guard.config, guard.state))
    actions = guard(sample(4), after=1)
    assert ("stop", ALICE, "space") in unit_actions(actions)
    guard.done("stop", ALICE)
    guard(UnitChanged(ALICE, UnitView("inactive", "dead", service_type="oneshot")), after=1)
    guard(sample(50), after=1)
    actions = guard(sample(50), after=121)
    assert ("start", "m365-migrate-resume@alice.service", "resume") in unit_actions(actions)


def test_a_refused_freeze_becomes_a_stop_not_a_retry_loop(guard: Guard) -> None:
    guard(sample(4), after=1)
    actions = guard.done(
        "freeze",
        ALICE,
        ok=False,
        error="org.freedesktop.systemd1.UnitBusy: Unit has a pending job.",
    )
    assert unit_actions(actions) == [("stop", ALICE, "space")]
    assert any("refused to freeze" in note for note in diagnostics(guard.config, guard.state))
    assert not any(isinstance(a, ActionDone) for a in actions)
    assert all(isinstance(a, UnitAction) is False or a.kind != "freeze" for a in actions)


# --- systemd is the truth: actions of unknown outcome, unexplained pauses -------------------


def lost_reply(guard: Guard, kind: str, unit: str) -> list:
    for action in reversed(guard.issued):
        if isinstance(action, UnitAction) and action.kind == kind and action.unit == unit:
            return guard(ActionDone(action, False, "no reply within 30s", unknown=True))
    raise AssertionError(f"no {kind} of {unit}")


def test_a_freeze_that_landed_without_a_reply_is_thawed_at_recovery(guard: Guard) -> None:
    guard(sample(4), after=1)
    actions = lost_reply(guard, "freeze", ALICE)
    assert [a for a in actions if isinstance(a, ReadUnit)] == [ReadUnit(ALICE)]
    assert unit_actions(actions) == []  # not asked again while unsettled
    guard(UnitChanged(ALICE, FROZEN_VIEW), after=0.01)  # systemd: it landed
    assert ALICE in guard.m("alice").paused_units and not guard.m("alice").unsettled
    guard(sample(50), after=1)
    actions = guard(sample(50), after=121)
    assert ("thaw", ALICE, "released") in unit_actions(actions)


def test_a_freeze_that_did_not_land_is_asked_again(guard: Guard) -> None:
    guard(sample(4), after=1)
    lost_reply(guard, "freeze", ALICE)
    actions = guard(UnitChanged(ALICE, RUNNING), after=0.01)
    assert ("freeze", ALICE, "space") in unit_actions(actions)


def test_a_late_thaw_is_the_guards_not_someone_elses(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("freeze", ALICE)
    guard(UnitChanged(ALICE, FROZEN_VIEW))
    guard(sample(50), after=1)
    guard(sample(50), after=121)
    lost_reply(guard, "thaw", ALICE)
    guard(OperatorRequest("r1", "pause", "alice", "disk swap"), after=1)
    guard(UnitChanged(ALICE, RUNNING), after=1)  # the thaw landed after all
    alice = guard.m("alice")
    assert alice.hold is not None and alice.hold.by == "operator"  # not taken for a takeover
    assert ("freeze", ALICE, "operator") in [(a.kind, a.unit, a.reason) for a in guard.issued]


def test_a_unit_found_frozen_without_record_is_held_as_unknown_and_alerted() -> None:
    guard = Guard(make_config())
    guard(BusChanged(True))
    guard(sample(50))
    actions = guard(UnitChanged(ALICE, FROZEN_VIEW))
    hold = guard.m("alice").hold
    assert hold is not None and hold.by == "unknown"
    (alert,) = of_type(actions, RaiseAlert)
    assert alert.name == "SpaceguardMigrationPausedUnknown" and alert.labels["by"] == "unknown"
    assert migration_state(guard.m("alice")) == "paused"
    # never resumed by the guard on its own
    assert unit_actions(guard(sample(50), after=3600)) == []
    # an operator resumes it: thawed
    actions = guard(OperatorRequest("r", "resume", "alice"), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(actions)


def test_an_unknown_pause_is_taken_over_when_the_volume_runs_low() -> None:
    guard = Guard(make_config())
    guard(BusChanged(True))
    guard(sample(50))
    guard(UnitChanged(ALICE, FROZEN_VIEW))
    guard(sample(4), after=1)
    assert guard.m("alice").hold.by == "guard"
    guard(sample(50), after=1)
    actions = guard(sample(50), after=121)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
