"""The minimal sequences of the fault-matrix issue that broke the README's promises, each
replayed against the pure policy, the way the daemon drives it (restarts included: the
state goes through state.py's durable form and back, like a real restart)."""

from __future__ import annotations

from pathlib import Path

import pytest
from spaceguard.config import Config
from spaceguard.model import (
    ActionDone,
    BusChanged,
    ClockStepped,
    FailureClass,
    LogEvidence,
    LogParsed,
    OperatorRequest,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    WriteIncident,
)
from spaceguard.policy import initial_state, reload_problem
from spaceguard.rclone import compile_rules
from spaceguard.runtime import MigrationLog
from spaceguard.state import _restore, durable
from test_policy import (
    ALICE,
    ALICE_RESUME,
    BOB,
    BOB_RESUME,
    CAROL,
    DEAD,
    FROZEN,
    RUNNING,
    T0,
    Guard,
    fail_alice,
    failed,
    make_config,
    of_type,
    sample,
    started_guard,
    unit_actions,
)


def restart(guard: Guard, config: Config | None = None) -> Guard:
    """A new guard process: durable state only, every unit unknown until it is read."""
    saved = _restore(durable(guard.state))
    new = Guard(config or guard.config, saved, now=guard.now + 1)
    return new


def read_all(guard: Guard, views: dict[str, UnitView]) -> list:
    actions = guard(BusChanged(True))
    for unit, view in views.items():
        actions += guard(UnitChanged(unit, view))
    return actions


@pytest.fixture(name="guard")
def started() -> Guard:
    return started_guard()


def test_2_a_failure_first_seen_under_a_hold_is_a_failure(guard: Guard) -> None:
    guard(sample(4), after=1)  # freeze ALICE pending, stop BOB pending
    guard(BusChanged(False), after=0.1)
    new = restart(guard)
    new(sample(4))
    actions = read_all(
        new, {ALICE: failed(5), ALICE_RESUME: DEAD, BOB: RUNNING, BOB_RESUME: DEAD, CAROL: RUNNING}
    )
    alice = new.m("alice")
    assert alice.failure is not None, "the run that failed under the hold is a failure"
    actions += new(Tick(), after=1)
    assert [a for a in of_type(actions, WriteIncident) if a.record["account"] == "alice"]
    # after recovery it is retried (transient), not forgotten
    new(sample(50), after=1)
    actions = []
    for _ in range(10):
        actions += new(sample(50), after=120)
    assert ("start", ALICE_RESUME, "retry") in unit_actions(actions)


def test_4_a_stall_does_not_count_frozen_time_after_a_takeover() -> None:
    guard = started_guard(make_config(stall_after="60s"))
    guard(sample(4), at=T0 + 1)
    guard.done("freeze", ALICE)
    guard(UnitChanged(ALICE, FROZEN))
    guard(UnitChanged(ALICE, RUNNING), at=T0 + 31)  # a person thaws it
    assert guard.m("alice").hold is None
    actions = guard(Tick(), at=T0 + 62)  # 31 s of running: not a stall
    assert guard.m("alice").failure is None, unit_actions(actions)
    guard(Tick(), at=T0 + 92)
    assert guard.m("alice").failure is not None  # 61 s of running without progress


def test_5_a_reload_that_raises_resume_above_restarts_the_hold_down(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("freeze", ALICE)
    guard(sample(11), after=1)  # above 10 %: the hold-down starts
    config = make_config()
    raised = config.volumes["space"]
    raised = type(raised)(
        **{**raised.__dict__, "resume_above": type(raised.resume_above)(percent=20.0)}
    )
    new_config = type(config)(**{**config.__dict__, "volumes": {**config.volumes, "space": raised}})
    guard.config = new_config
    guard.state = initial_state(new_config, guard.state)
    actions = guard(sample(11), after=121)  # below the new resume_above: still held
    assert ("thaw", ALICE, "released") not in unit_actions(actions)
    assert guard.m("alice").hold is not None


def test_6_a_reload_may_not_drop_a_unit_with_an_action_in_flight(guard: Guard) -> None:
    guard(sample(4), after=1)  # freeze of ALICE in flight
    # the resume unit has nothing in flight: renaming it is fine
    other_resume = make_config(resume_unit="m365-migrate-other@alice.service")
    assert reload_problem(guard.config, other_resume, guard.state) == ""
    # the unit whose freeze is in flight may not be dropped
    renamed = make_config(unit="m365-migrate-new@alice.service")
    assert ALICE in reload_problem(guard.config, renamed, guard.state)
    guard.done("freeze", ALICE)
    guard(UnitChanged(ALICE, FROZEN))
    renamed = make_config(unit="m365-migrate-new@alice.service")
    assert ALICE in reload_problem(guard.config, renamed, guard.state)


def test_6_an_action_completing_after_its_unit_left_the_config_is_dropped(guard: Guard) -> None:
    guard(sample(4), after=1)
    freeze = next(a for a in guard.issued if isinstance(a, UnitAction) and a.unit == ALICE)
    renamed = make_config(unit="m365-migrate-new@alice.service")
    guard.config = renamed
    guard.state = initial_state(renamed, guard.state)
    guard(ActionDone(freeze, True))
    assert ALICE not in guard.m("alice").units
    assert ALICE not in guard.m("alice").paused_units


def test_7_a_reload_may_not_switch_freeze_to_stop_while_paused(guard: Guard) -> None:
    guard(OperatorRequest("r", "pause", "alice", "swap"), after=1)
    guard.done("freeze", ALICE)
    assert "pause" in reload_problem(guard.config, make_config(pause="stop"), guard.state)


def test_8_a_run_missed_during_a_bus_outage_is_a_failure(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("stop", BOB)
    guard(UnitChanged(BOB, UnitView("inactive", "dead", result="success", started_at=T0)))
    guard(BusChanged(False), after=1)
    # meanwhile a person starts bob, and that run fails
    guard(BusChanged(True), after=60)
    guard(
        UnitChanged(
            BOB,
            UnitView(
                "failed",
                "failed",
                result="exit-code",
                exec_code="exited",
                exec_status=1,
                started_at=T0 + 30,
            ),
        )
    )
    bob = guard.m("bob")
    assert bob.failure is not None, "a run that failed while we could not see it is a failure"


def test_9_log_evidence_survives_a_restart(guard: Guard) -> None:
    line = "2025/01/01 10:00:00 ERROR : Failed to copy: 429 Too Many Requests"
    guard(LogParsed("alice", (LogEvidence(FailureClass.TRANSIENT, "too_many_requests", line),)))
    new = restart(guard)
    new(sample(50))
    read_all(
        new, {ALICE: RUNNING, ALICE_RESUME: DEAD, BOB: RUNNING, BOB_RESUME: DEAD, CAROL: RUNNING}
    )
    new(UnitChanged(ALICE, failed(7)), after=1)  # 7 alone would be unrecoverable
    failure = new.m("alice").failure
    assert failure is not None and failure.failure_class == FailureClass.TRANSIENT


def test_10_an_operator_pause_during_an_outage_stands_against_an_earlier_start(
    guard: Guard,
) -> None:
    guard(sample(4), after=1)
    guard.done("stop", BOB)
    guard(UnitChanged(BOB, UnitView("inactive", "dead", result="success", started_at=T0)))
    guard(BusChanged(False), at=T0 + 10)
    # a person starts bob at T0+20; an operator pauses it at T0+30; the bus is back at T0+40
    guard(OperatorRequest("r", "pause", "bob", "hands off"), at=T0 + 30)
    guard(BusChanged(True), at=T0 + 40)
    guard(UnitChanged(BOB, UnitView("active", "running", started_at=T0 + 20)))
    bob = guard.m("bob")
    assert bob.hold is not None and bob.hold.by == "operator"


def test_11_a_sibling_units_success_does_not_reset_the_others_backoff(guard: Guard) -> None:
    guard(UnitChanged(ALICE_RESUME, RUNNING))  # both of alice's units run: both are frozen
    guard(sample(4), after=1)
    for _ in range(3):  # ALICE's freeze fails three times: its backoff grows to 2 s
        guard.done("freeze", ALICE, ok=False, error="org.freedesktop.DBus.Error.Failed: busy")
        guard(sample(4), at=guard.m("alice").action_retry_at)
    assert guard.m("alice").action_errors == {ALICE: 3}
    guard.done("freeze", ALICE_RESUME)  # the sibling's freeze lands
    assert guard.m("alice").action_errors == {ALICE: 3}, "the sibling's success is not ALICE's"
    failed_at = guard.now
    guard.done("freeze", ALICE, ok=False, error="org.freedesktop.DBus.Error.Failed: busy")
    # the fourth failure waits 4 s (0.25 s x 2^4), not the first failure's 0.5 s
    assert guard.m("alice").action_retry_at == pytest.approx(failed_at + 4.0)
    assert unit_actions(guard(sample(4), at=failed_at + 3.9)) == []
    assert ("freeze", ALICE, "space") in unit_actions(guard(sample(4), at=failed_at + 4.0))
    guard.done("freeze", ALICE)
    assert guard.m("alice").action_errors == {}
    assert guard.m("alice").action_retry_at == 0.0


def test_stale_resume_unit_is_not_kept_paused_for_good() -> None:
    """Volume unavailable → StopUnit times out → someone starts the resume unit → operator
    force-resumes bob → guard restarts: nothing of bob stays 'paused'."""
    from spaceguard.model import VolumeUnavailable

    guard = started_guard()
    guard(VolumeUnavailable("space", "not mounted"), after=1)
    stop = next(a for a in guard.issued if isinstance(a, UnitAction) and a.unit == BOB)
    guard(ActionDone(stop, False, "StopUnit: no reply within 30s", unknown=True))
    guard(UnitChanged(BOB, DEAD))  # the stop landed
    guard(UnitChanged(BOB_RESUME, RUNNING), after=1)  # someone starts the resume unit
    guard(OperatorRequest("r", "resume", "bob", force=True), after=1)
    new = restart(guard)
    new(sample(50))
    read_all(
        new, {ALICE: RUNNING, ALICE_RESUME: DEAD, BOB: DEAD, BOB_RESUME: RUNNING, CAROL: RUNNING}
    )
    new(sample(50), after=300)
    bob = new.m("bob")
    assert bob.hold is None and not bob.paused_units, bob


# --- the clock steps ------------------------------------------------------------------------


def test_a_forward_step_beyond_stall_after_is_no_stall() -> None:
    guard = started_guard(make_config(stall_after="30m"))
    # the daemon tells the step at the first event after it, with the new wall time
    actions = guard(ClockStepped(3600.0), after=3600 + 1)
    actions += guard(Tick(), after=1)
    assert unit_actions(actions) == [] and guard.m("alice").failure is None
    guard(Tick(), after=31 * 60)
    assert guard.m("alice").failure is not None  # a real 31 minutes without progress


def test_a_backward_step_does_not_block_a_freeze_for_its_length(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("freeze", ALICE, ok=False, error="org.freedesktop.DBus.Error.Failed: oops")
    actions = guard(ClockStepped(-3600.0), after=1 - 3600)  # 1 s later by elapsed time
    actions += guard(sample(4), after=0.01)
    assert ("freeze", ALICE, "space") in unit_actions(actions)


def test_the_hold_down_keeps_its_length_across_a_step(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)  # recovery starts
    actions = guard(ClockStepped(3600.0), after=3600 + 60)  # 60 s of a 120 s hold-down
    actions += guard(sample(50), after=0.01)
    assert ("thaw", ALICE, "released") not in unit_actions(actions)
    actions = guard(sample(50), after=61)
    assert ("thaw", ALICE, "released") in unit_actions(actions)


# --- found by the real-rclone disk-full test --------------------------------------------


def test_rclones_preallocation_message_is_a_full_disk() -> None:
    from spaceguard.rclone import RcloneLogParser

    line = (
        "2026/12/01 22:00:00 ERROR : big.bin: Failed to copy: preallocate: "
        "file too big for remaining disk space"
    )
    (failure,) = RcloneLogParser().feed([line]).failures
    assert failure.failure_class == FailureClass.DISK_FULL


def test_an_enospc_line_from_before_the_recovery_does_not_pause_again(guard: Guard) -> None:
    line = "2025/01/01 10:00:00 ERROR : a.bin: Failed to copy: no space left on device"
    evidence = LogEvidence(FailureClass.DISK_FULL, "no_space_left", line, logged_at=T0 + 1)
    guard(LogParsed("alice", (evidence,)), at=T0 + 1)
    assert guard.state.volumes["space"].low
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)
    guard(sample(50), after=121)
    assert not guard.state.volumes["space"].low
    # the same item's second line (rclone logs a NOTICE, then an ERROR), read late
    guard(LogParsed("alice", (evidence,)), after=1)
    assert not guard.state.volumes["space"].low
    # a new one, written after the recovery, does pause
    fresh = LogEvidence(FailureClass.DISK_FULL, "no_space_left", line, logged_at=guard.now)
    guard(LogParsed("alice", (fresh,)), after=1)
    assert guard.state.volumes["space"].low


# rclone 1.60's lines in test_destination_full_is_paused_not_failed[preallocate] (one item
# refused, --retries 1): the item, then, once the rest is copied, the run's summary
PREALLOCATE = "preallocate: file too big for remaining disk space"
ITEM_FULL = f"2026/12/02 01:32:19 ERROR : doc-003.bin: Failed to copy: {PREALLOCATE}"
RUN_ENDS_FULL = [
    f"2026/12/02 01:32:22 ERROR : Attempt 1/1 failed with 1 errors and: {PREALLOCATE}",
    f"2026/12/02 01:32:22 Failed to copy: {PREALLOCATE}",
]


def test_rclones_summary_of_a_full_disk_says_how_the_run_ended() -> None:
    from spaceguard.rclone import RcloneLogParser

    many = f"2026/12/02 01:35:12 Failed to copy with 4 errors: last error was: {PREALLOCATE}"
    retried = f"2026/12/02 01:35:12 ERROR : Attempt 1/3 failed with 4 errors and: {PREALLOCATE}"
    failures = RcloneLogParser().feed([ITEM_FULL, *RUN_ENDS_FULL, many, retried]).failures
    assert [(f.line_number, f.scope) for f in failures] == [
        (0, "item"), (1, "summary"), (2, "summary"), (3, "summary"),
    ]  # fmt: skip
    assert {f.failure_class for f in failures} == {FailureClass.DISK_FULL}
    # rclone's last line of any other failure still classifies as before
    (other,) = (
        RcloneLogParser().feed(["2026/12/02 01:36:07 Failed to copy: directory not found"]).failures
    )
    assert (other.scope, other.rule) == ("run", "directory_not_found")


def feed_log(log: MigrationLog, lines: list[str]) -> LogParsed:
    event = log.feed(lines)
    assert event is not None
    return event


def test_a_run_that_ends_on_the_full_disk_it_reported_is_started_again_not_failed(
    guard: Guard,
) -> None:
    """Found by test_destination_full_is_paused_not_failed[preallocate]: the summary was
    taken for a new full disk (a volume with plenty of space paused again, a freeze sent to
    a process on its way out), and the exit after it, status 1, was an unrecoverable
    failure whenever the guard handled it without that line (the line cleared at the
    release, or read after the exit): a failure incident for a full disk."""
    log = MigrationLog("alice", Path("/var/log/m365-migrate-alice.log"), compile_rules())
    actions = guard(feed_log(log, [ITEM_FULL]), after=1)
    assert ("freeze", ALICE, "disk_full") in unit_actions(actions)
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)
    actions = guard(sample(50), after=121)
    assert ("thaw", ALICE, "released") in unit_actions(actions)
    guard.done("thaw", ALICE)
    # rclone copies the rest, then says that the run ended on the refused item
    actions = guard(feed_log(log, RUN_ENDS_FULL), after=1)
    assert unit_actions(actions) == [] and not guard.state.volumes["space"].low
    actions = guard(UnitChanged(ALICE, failed(1)), after=0.01)  # rclone's status for it
    alice = guard.m("alice")
    assert alice.failure is None and of_type(actions, WriteIncident) == []
    assert ("start", ALICE_RESUME, "resume") in unit_actions(actions)
    assert not guard.state.volumes["space"].low  # nothing else on the volume is paused
    guard(UnitChanged(ALICE_RESUME, RUNNING), after=1)
    actions = guard(UnitChanged(ALICE_RESUME, DEAD), after=5)  # the restarted run copies it
    assert guard.m("alice").finished and of_type(actions, WriteIncident) == []


def test_a_full_disk_summary_while_still_paused_restarts_at_the_release(guard: Guard) -> None:
    log = MigrationLog("alice", Path("/var/log/m365-migrate-alice.log"), compile_rules())
    guard(feed_log(log, [ITEM_FULL]), after=1)
    guard(feed_log(log, RUN_ENDS_FULL), after=0.01)  # it finished before the freeze landed
    guard(UnitChanged(ALICE, failed(1)), after=0.01)
    guard.done("freeze", ALICE, ok=False, error="unit not active")
    alice = guard.m("alice")
    assert alice.failure is None and alice.hold is not None and alice.restart_on_release
    guard(sample(50), after=1)
    actions = guard(Tick(), after=120)
    assert ("start", ALICE_RESUME, "resume") in unit_actions(actions)


def test_a_unit_that_ended_while_the_freeze_went_out_is_not_paused(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard(UnitChanged(ALICE, DEAD), after=0.01)  # it ended first
    guard.done("freeze", ALICE)  # then systemd's late "done"
    assert ALICE not in guard.m("alice").paused_units


def test_a_thaw_refused_as_inactive_is_not_asked_for_ever(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)
    guard(sample(50), after=121)
    actions = guard.done(
        "thaw", ALICE, ok=False, error="org.freedesktop.systemd1.UnitInactive: Unit is not active."
    )
    assert ALICE not in guard.m("alice").paused_units
    later = unit_actions(guard(Tick(), after=60))
    assert not [a for a in unit_actions(actions) + later if a[0] == "thaw"]


def test_a_backward_step_does_not_hold_back_the_next_resume_batch() -> None:
    from test_planning import paused_writers
    from test_planning import sample as planned_sample

    guard = paused_writers(4, rate=0.0, volume={"resume_batch": 1, "resume_step": "10s"})
    first = guard(planned_sample(20), after=61)
    assert len([a for a in unit_actions(first) if a[0] == "thaw"]) == 1
    actions = guard(ClockStepped(-3600.0), after=11 - 3600)  # 11 s later by elapsed time
    actions += guard(Tick(), after=0.01)
    assert len([a for a in unit_actions(actions) if a[0] == "thaw"]) == 1


@pytest.mark.parametrize(("landed", "resume_runs"), [(False, True), (False, False), (True, True)])
def test_a_restart_during_a_retry_does_not_take_the_old_failure_for_a_new_one(
    guard: Guard, landed: bool, resume_runs: bool
) -> None:
    """Found by tests/integration/test_kill_windows.py: the guard killed with a retry's
    StartUnit (of the resume unit) in flight, or once it runs; the migration unit stays
    `failed` from the run the incident documents. The restarted guard wrote a second
    incident for it, spent a retry and stopped the running resume unit."""
    fail_alice(guard, 5)
    failure = guard.m("alice").failure
    assert failure is not None and failure.next_retry_at is not None
    assert unit_actions(guard(Tick(), at=failure.next_retry_at)) == [
        ("start", ALICE_RESUME, "retry")
    ]
    if landed:
        guard.done("start", ALICE_RESUME)
        guard(UnitChanged(ALICE_RESUME, UnitView("active", "running", started_at=guard.now)))
    new = restart(guard)
    new(sample(50))
    resume = UnitView("active", "running", started_at=guard.now) if resume_runs else DEAD
    alice_failed = UnitView(
        "failed",
        "failed",
        result="exit-code",
        exec_code="exited",
        exec_status=5,
        started_at=T0,
    )
    actions = read_all(
        new,
        {ALICE: alice_failed, ALICE_RESUME: resume, BOB: RUNNING, BOB_RESUME: DEAD, CAROL: RUNNING},
    )
    actions += new(Tick(), after=1)
    alice = new.m("alice")
    assert alice.failure is None and alice.retries == 1
    assert not [a for a in of_type(actions, WriteIncident) if a.record["account"] == "alice"]
    # nothing stopped; a start that did not land may be sent again
    assert [a for a in unit_actions(actions) if a[1] in (ALICE, ALICE_RESUME)] in (
        [],
        [("start", ALICE_RESUME, "retry")],
    )
