"""policy.decide(): scenario walk-throughs, one event at a time.

Scenario 3 (space): pause on low space, resume with hysteresis and a hold-down.
Scenario 1 (failure): stop, verify, write an incident, retry with backoff or wait.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from spaceguard.config import Config, parse
from spaceguard.model import (
    Action,
    ActionDone,
    BusChanged,
    FailureClass,
    GuardState,
    Hold,
    Log,
    LogEvidence,
    LogParsed,
    MigrationState,
    OperatorRequest,
    RaiseAlert,
    Reply,
    ResolveAlert,
    RunVerify,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    VolumeSampled,
    VolumeState,
    VolumeUnavailable,
    WriteIncident,
)
from spaceguard.policy import (
    decide,
    initial_state,
    retry_delay,
)
from spaceguard.watermarks import seconds_to_pause

GiB = 1024**3
MiB = 1024**2
SIZE = 100 * GiB  # pause below 5 GiB, resume above 10 GiB
FILES = 1_000_000  # pause below 10 000 inodes, resume above 20 000
T0 = 1_750_000_000.0

ALICE = "m365-migrate@alice.service"
ALICE_RESUME = "m365-migrate-resume@alice.service"
BOB = "m365-migrate@bob.service"
BOB_RESUME = "m365-migrate-resume@bob.service"
CAROL = "m365-migrate@carol.service"
STRANGER = "sshd.service"

RUNNING = UnitView("active", "running")
FROZEN = UnitView("active", "running", freezer_state="frozen")
DEAD = UnitView("inactive", "dead", result="success")


def failed(status: int, code: str = "exited") -> UnitView:
    return UnitView("failed", "failed", result="exit-code", exec_code=code, exec_status=status)


def make_config(**alice: Any) -> Config:
    document: dict[str, Any] = {
        "volumes": {
            "space": {
                "path": "/space",
                "pause_below": "5%",
                "resume_above": "10%",
                "pause_below_inodes": "1%",
                "resume_above_inodes": "2%",
                "resume_after": "2m",
                "predict": "10m",
            },
            "data": {"path": "/data", "pause_below": "5%", "resume_above": "10%"},
        },
        "migrations": [
            {
                "account": "alice",
                "unit": ALICE,
                "volume": "space",
                "resume_unit": ALICE_RESUME,
                "stall_after": "30m",
                "max_retries": 3,
                "retry_backoff": "1m",
                **alice,
            },
            {
                "account": "bob",
                "unit": BOB,
                "volume": "space",
                "pause": "stop",
                "resume_unit": BOB_RESUME,
            },
            {"account": "carol", "unit": CAROL, "volume": "data"},
        ],
    }
    return parse(Path("/etc/spaceguard/test.toml"), document)


def sample(
    avail_gib: float, *, files_free: int = FILES // 2, rate: float = 0.0, volume: str = "space"
) -> VolumeSampled:
    return VolumeSampled(volume, int(avail_gib * GiB), SIZE, files_free, FILES, rate)


def unit_actions(actions: Iterable[Action]) -> list[tuple[str, str, str]]:
    return [(a.kind, a.unit, a.reason) for a in actions if isinstance(a, UnitAction)]


def of_type(actions: Iterable[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def replies(actions: Iterable[Action]) -> list[tuple[bool, str]]:
    return [(a.ok, a.message) for a in actions if isinstance(a, Reply)]


class Guard:
    """The policy with a clock: feed events, keep the state, return the actions."""

    def __init__(self, config: Config, saved: GuardState | None = None, now: float = T0):
        self.config = config
        self.state = initial_state(config, saved)
        self.now = now
        self.issued: list[UnitAction | RunVerify] = []

    def __call__(self, event: Any, *, at: float | None = None, after: float = 0.0) -> list[Action]:
        self.now = at if at is not None else self.now + after
        self.state, actions = decide(self.config, self.state, event, self.now)
        self.issued += [a for a in actions if isinstance(a, UnitAction | RunVerify)]
        return actions

    def m(self, account: str) -> MigrationState:
        return self.state.migrations[account]

    def done(
        self, kind: str, unit: str, ok: bool = True, error: str = "", after: float = 0.0
    ) -> list[Action]:
        """Complete the last issued action of this kind on this unit."""
        for action in reversed(self.issued):
            if isinstance(action, UnitAction) and action.kind == kind and action.unit == unit:
                return self(ActionDone(action, ok, error), after=after)
        raise AssertionError(f"no {kind} of {unit} was issued")

    def verified(self, account: str, ok: bool = True, error: str = "") -> list[Action]:
        for action in reversed(self.issued):
            if isinstance(action, RunVerify) and action.account == account:
                return self(ActionDone(action, ok, error))
        raise AssertionError(f"no verification of {account} was issued")


def started_guard(config: Config | None = None) -> Guard:
    """Bus up, every unit seen, plenty of space."""
    guard = Guard(config or make_config())
    guard(BusChanged(True))
    for unit, view in (
        (ALICE, RUNNING),
        (ALICE_RESUME, DEAD),
        (BOB, RUNNING),
        (BOB_RESUME, DEAD),
        (CAROL, RUNNING),
    ):
        assert unit_actions(guard(UnitChanged(unit, view))) == []
    assert guard(sample(50)) == []
    assert guard(sample(50, volume="data")) == []
    return guard


@pytest.fixture
def guard() -> Guard:
    return started_guard()


def pause_alice(guard: Guard, avail_gib: float = 4) -> None:
    guard(sample(avail_gib), after=1)
    guard.done("freeze", ALICE)
    guard.done("stop", BOB)
    guard(UnitChanged(BOB, DEAD))
    assert guard.m("alice").paused_units == {ALICE}


# --- scenario 3: space -------------------------------------------------------------------


def test_low_volume_pauses_every_running_unit_on_it(guard: Guard) -> None:
    actions = guard(sample(4), after=1)
    assert sorted(unit_actions(actions)) == [("freeze", ALICE, "space"), ("stop", BOB, "space")]
    alerts = {a.key: a for a in of_type(actions, RaiseAlert)}
    assert set(alerts) == {"paused/alice", "paused/bob"}
    assert alerts["paused/alice"].labels["reason"] == "space"
    assert alerts["paused/alice"].labels["by"] == "guard"
    assert any(a.level == "warning" and "low" in a.message for a in of_type(actions, Log))
    assert guard.m("alice").hold == Hold("guard", "space", guard.now, alerted=True)
    assert guard.m("carol").hold is None  # another volume
    assert guard.state.volumes["space"].low
    assert guard.m("alice").pending == {ALICE: "freeze"}


def test_the_freeze_done_marks_the_unit_paused_and_nothing_repeats(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard.done("freeze", ALICE)
    alice = guard.m("alice")
    assert alice.paused_units == {ALICE}
    assert alice.units[ALICE].frozen
    assert alice.pending == {}
    guard.done("stop", BOB)
    guard(UnitChanged(BOB, DEAD))
    for _ in range(5):
        assert unit_actions(guard(sample(3), after=0.01)) == []
        assert of_type(guard(Tick(), after=0.01), RaiseAlert) == []
    assert guard.m("bob").failure is None  # the guard's own stop is not a failure


def test_resume_only_after_the_hold_down(guard: Guard) -> None:
    pause_alice(guard)
    assert unit_actions(guard(sample(11), after=10)) == []  # above resume_above: clock starts
    recovered_at = guard.now
    assert unit_actions(guard(Tick(), at=recovered_at + 60)) == []
    assert unit_actions(guard(sample(12), at=recovered_at + 119.9)) == []
    assert guard.m("alice").hold is not None
    actions = guard(Tick(), at=recovered_at + 120)
    assert sorted(unit_actions(actions)) == [
        ("start", BOB_RESUME, "resume"),
        ("thaw", ALICE, "released"),
    ]
    assert {a.key for a in of_type(actions, ResolveAlert)} == {"paused/alice", "paused/bob"}
    assert guard.m("alice").hold is None
    assert not guard.state.volumes["space"].low
    guard.done("thaw", ALICE)
    assert guard.m("alice").paused_units == frozenset()
    assert unit_actions(guard(UnitChanged(ALICE, RUNNING))) == []
    assert guard.m("alice").hold is None


def test_between_the_thresholds_nothing_resumes(guard: Guard) -> None:
    pause_alice(guard)
    for step in range(50):
        actions = guard(sample(5 + (step % 5)), after=10)  # 5..9 GiB: inside the band
        assert unit_actions(actions) == []
    assert guard.m("alice").hold is not None


def test_a_dip_during_the_hold_down_restarts_the_clock(guard: Guard) -> None:
    pause_alice(guard)
    guard(sample(11), after=10)
    start = guard.now
    guard(sample(9.9), at=start + 60)  # back below resume_above
    guard(sample(11), at=start + 70)  # the clock starts again here
    assert unit_actions(guard(Tick(), at=start + 120)) == []
    assert unit_actions(guard(Tick(), at=start + 189)) == []
    assert ("thaw", ALICE, "released") in unit_actions(guard(Tick(), at=start + 190))


def test_stop_mode(guard: Guard) -> None:
    actions = guard(sample(4), after=1)
    assert ("stop", BOB, "space") in unit_actions(actions)
    assert unit_actions(guard.done("stop", BOB)) == []  # the job is done: no second stop
    bob = guard.m("bob")
    assert bob.paused_units == {BOB}
    assert bob.restart_on_release
    guard(UnitChanged(BOB, UnitView("deactivating", "stop-sigterm")))
    guard(UnitChanged(BOB, DEAD))
    assert guard.m("bob").failure is None
    assert not guard.m("bob").finished
    guard(sample(20), after=5)
    actions = guard(Tick(), after=120)
    assert ("start", BOB_RESUME, "resume") in unit_actions(actions)
    assert ResolveAlert("paused/bob") in actions
    guard.done("start", BOB_RESUME)
    assert guard.m("bob").paused_units == frozenset()
    assert not guard.m("bob").restart_on_release
    assert unit_actions(guard(UnitChanged(BOB_RESUME, RUNNING))) == []
    assert guard.m("bob").hold is None


def test_stop_mode_whose_unit_reports_stopped_before_the_job_returns(guard: Guard) -> None:
    guard(sample(4), after=1)
    guard(UnitChanged(BOB, DEAD))  # PropertiesChanged arrives first
    assert guard.m("bob").failure is None and not guard.m("bob").finished
    guard.done("stop", BOB)
    guard(sample(20), after=5)
    assert ("start", BOB_RESUME, "resume") in unit_actions(guard(Tick(), after=120))


def test_predicted_pause_inside_the_band(guard: Guard) -> None:
    # 8 GiB free, 3 GiB above pause_below, filling at 10 MiB/s: ~307 s < predict (600 s)
    actions = guard(sample(8, rate=10 * MiB), after=1)
    assert ("freeze", ALICE, "predicted") in unit_actions(actions)
    assert guard.state.volumes["space"].low_reason == "predicted"
    assert guard.m("alice").hold is not None and guard.m("alice").hold.reason == "predicted"


def test_slow_filling_inside_the_band_does_not_pause(guard: Guard) -> None:
    # ~3 GiB at 1 MiB/s: 3072 s > predict
    assert unit_actions(guard(sample(8, rate=1 * MiB), after=1)) == []
    assert not guard.state.volumes["space"].low


def test_no_predicted_pause_above_resume_above(guard: Guard) -> None:
    # 12 GiB free at 1 GiB/s crosses pause_below in 7 s, but a pause there could not hold
    assert unit_actions(guard(sample(12, rate=GiB), after=1)) == []
    assert not guard.state.volumes["space"].low
    assert seconds_to_pause(guard.config.volumes["space"], guard.state.volumes["space"]) < 600


def test_predict_disabled() -> None:
    guard = started_guard(make_config())
    config = guard.config
    volumes = {**config.volumes, "space": replace(config.volumes["space"], predict=0.0)}
    guard.config = replace(config, volumes=volumes)
    assert unit_actions(guard(sample(8, rate=GiB), after=1)) == []


def test_inode_thresholds(guard: Guard) -> None:
    actions = guard(sample(50, files_free=9_999), after=1)
    assert ("freeze", ALICE, "inodes") in unit_actions(actions)
    assert guard.state.volumes["space"].low_reason == "inodes"
    guard.done("freeze", ALICE)
    # bytes are fine, inodes inside the band: not recovered
    guard(sample(50, files_free=15_000), after=1)
    assert unit_actions(guard(Tick(), after=300)) == []
    guard(sample(50, files_free=20_000), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(guard(Tick(), after=120))


def test_a_file_system_without_inode_counts_never_pauses_for_inodes(guard: Guard) -> None:
    event = VolumeSampled("space", 50 * GiB, SIZE, 0, 0, 0.0)  # e.g. btrfs: f_files = 0
    assert unit_actions(guard(event, after=1)) == []
    assert not guard.state.volumes["space"].low


def test_a_vanished_volume_pauses(guard: Guard) -> None:
    actions = guard(VolumeUnavailable("space", "/space is not a mount point"), after=1)
    assert ("freeze", ALICE, "unavailable") in unit_actions(actions)
    assert of_type(actions, RaiseAlert)
    assert any(a.level == "error" for a in of_type(actions, Log))
    guard.done("freeze", ALICE)
    assert (
        of_type(guard(VolumeUnavailable("space", "/space is not a mount point"), after=1), Log)
        == []
    )  # the same problem is not logged again
    guard(sample(50), after=1)  # back
    assert unit_actions(guard(Tick(), after=60)) == []
    guard(VolumeUnavailable("space", "gone again"), after=1)  # resets the hold-down
    guard(sample(50), after=1)
    assert unit_actions(guard(Tick(), after=119)) == []
    assert ("thaw", ALICE, "released") in unit_actions(guard(Tick(), after=1))


def test_bus_down_decides_but_does_not_act(guard: Guard) -> None:
    guard(BusChanged(False), after=1)
    actions = guard(sample(4), after=1)
    assert unit_actions(actions) == []
    assert guard.m("alice").hold is not None  # the decision is kept...
    # ...but nothing is paused yet, so no "paused" alert claims otherwise (the D-Bus
    # disconnected alert is what tells people here)
    assert of_type(actions, RaiseAlert) == []
    assert unit_actions(guard(Tick(), after=5)) == []
    actions = guard(BusChanged(True), after=1)  # ...and acted on when the bus is back
    assert sorted(unit_actions(actions)) == [("freeze", ALICE, "space"), ("stop", BOB, "space")]
    assert {a.key for a in of_type(actions, RaiseAlert)} == {"paused/alice", "paused/bob"}
    assert of_type(guard(Tick(), after=5), RaiseAlert) == []  # said once per hold


def test_operator_pause_is_never_resumed_by_the_guard(guard: Guard) -> None:
    actions = guard(OperatorRequest("r1", "pause", "alice", reason="maintenance"), after=1)
    assert replies(actions)[0][0] is True
    assert unit_actions(actions) == [("freeze", ALICE, "operator")]
    guard.done("freeze", ALICE)
    assert guard.m("alice").hold.by == "operator"
    guard(sample(4), after=1)  # low, then recovered: the operator's hold stays
    guard(sample(50), after=1)
    actions = guard(Tick(), after=600)
    assert not guard.state.volumes["space"].low
    assert ("thaw", ALICE, "released") not in unit_actions(actions)
    assert guard.m("alice").hold.by == "operator"
    actions = guard(OperatorRequest("r2", "resume", "alice"), after=1)
    assert replies(actions)[0][0] is True
    assert unit_actions(actions) == [("thaw", ALICE, "released")]


def test_operator_resume_of_a_guard_hold_while_low(guard: Guard) -> None:
    pause_alice(guard)
    actions = guard(OperatorRequest("r1", "resume", "alice"), after=1)
    ((ok, message),) = replies(actions)
    assert not ok and "--force" in message and "still low" in message
    assert unit_actions(actions) == []
    assert guard.m("alice").hold is not None
    actions = guard(OperatorRequest("r2", "resume", "alice", force=True), after=1)
    assert replies(actions)[0][0] is True
    assert unit_actions(actions) == [("thaw", ALICE, "released")]
    # the guard's "paused" alert must not keep firing for a running migration
    assert ResolveAlert("paused/alice") in actions
    assert guard.m("alice").override
    guard.done("thaw", ALICE)
    guard(UnitChanged(ALICE, RUNNING))
    # still low: the override holds, no re-freeze, no new alert
    for _ in range(5):
        actions = guard(sample(3), after=1)
        assert unit_actions(actions) == []
        assert of_type(actions, RaiseAlert) == []
    # the volume recovers: the override ends; the next low episode pauses again
    guard(sample(50), after=1)
    guard(Tick(), after=120)
    assert not guard.m("alice").override
    assert ("freeze", ALICE, "space") in unit_actions(guard(sample(4), after=1))


def test_operator_requests_for_unknown_accounts_and_bad_verbs(guard: Guard) -> None:
    before = guard.state
    ((ok, message),) = replies(guard(OperatorRequest("r1", "pause", "mallory"), after=1))
    assert not ok and "mallory" in message
    assert guard.state == before
    ((ok, message),) = replies(guard(OperatorRequest("r2", "resume", "alice"), after=1))
    assert not ok and "not paused" in message
    ((ok, message),) = replies(guard(OperatorRequest("r3", "retry", "alice"), after=1))
    assert not ok and "already running" in message


def test_a_unit_thawed_by_someone_else_is_an_operator_decision(guard: Guard) -> None:
    pause_alice(guard)
    actions = guard(UnitChanged(ALICE, RUNNING), after=1)  # systemctl thaw, by a person
    assert unit_actions(actions) == []
    assert ResolveAlert("paused/alice") in actions
    alice = guard.m("alice")
    assert alice.hold is None and alice.override and alice.paused_units == frozenset()
    for _ in range(3):  # not re-frozen while the volume stays low
        assert unit_actions(guard(sample(3), after=1)) == []
    guard(sample(50), after=1)
    guard(Tick(), after=120)
    assert ("freeze", ALICE, "space") in unit_actions(guard(sample(4), after=1))


def test_units_the_config_does_not_name_are_ignored(guard: Guard) -> None:
    before = guard.state
    for view in (RUNNING, FROZEN, DEAD, failed(1)):
        assert guard(UnitChanged(STRANGER, view), after=1) == []
    assert guard.state.migrations == before.migrations
    guard(sample(4), after=1)
    assert all(unit != STRANGER for _, unit, _ in unit_actions(guard.issued))


def test_no_action_storm_after_errors(guard: Guard) -> None:
    guard(sample(4), after=1)
    actions = guard.done("freeze", ALICE, ok=False, error="org.freedesktop.DBus.Error.Timeout")
    assert any(a.level == "error" for a in of_type(actions, Log))
    failed_at = guard.now
    for _ in range(40):  # the sampler runs every few ms when low
        assert unit_actions(guard(sample(4), after=0.01)) == []
    actions = guard(sample(4), at=failed_at + 0.5)  # first backoff: 0.5 s
    assert ("freeze", ALICE, "space") in unit_actions(actions)
    guard.done("freeze", ALICE, ok=False, error="again")
    second = guard.now
    assert unit_actions(guard(sample(4), at=second + 0.9)) == []
    assert ("freeze", ALICE, "space") in unit_actions(guard(sample(4), at=second + 1.0))
    for _ in range(20):  # the backoff is capped
        guard.done("freeze", ALICE, ok=False, error="again")
        guard(sample(4), after=30)
    assert guard.m("alice").action_retry_at - guard.now <= 30
    guard.done("freeze", ALICE)
    assert guard.m("alice").action_errors == {}


def test_a_unit_that_starts_while_held_is_paused(guard: Guard) -> None:
    pause_alice(guard)
    actions = guard(UnitChanged(ALICE_RESUME, RUNNING), after=1)  # e.g. a timer started it
    assert ("freeze", ALICE_RESUME, "space") in unit_actions(actions)


# --- scenario 1: failures ----------------------------------------------------------------


def fail_alice(guard: Guard, status: int) -> list[Action]:
    return guard(UnitChanged(ALICE, failed(status)), after=1)


def test_unrecoverable_exit_status(guard: Guard) -> None:
    actions = fail_alice(guard, 1)
    (incident,) = of_type(actions, WriteIncident)
    record = incident.record
    assert record["class"] == "unrecoverable"
    assert record["trigger"] == "unit-failed"
    assert record["exit_status"] == "result=exit-code exited=1"
    assert record["next_retry_at"] is None
    assert record["account"] == "alice" and record["units"] == [ALICE, ALICE_RESUME]
    (alert,) = of_type(actions, RaiseAlert)
    assert alert.key == "failed/alice" and alert.severity == "critical"
    assert guard.m("alice").failure.phase == "needs-operator"
    assert unit_actions(guard(Tick(), after=86400)) == []  # never retried by itself


def test_transient_exit_status_is_retried_with_backoff(guard: Guard) -> None:
    config = guard.config.migration("alice")
    actions = fail_alice(guard, 5)
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["class"] == "transient"
    failure = guard.m("alice").failure
    assert failure.phase == "waiting-retry"
    assert failure.next_retry_at == pytest.approx(guard.now + retry_delay(config, 0))
    assert of_type(actions, RaiseAlert)[0].severity == "warning"
    assert unit_actions(guard(Tick(), at=failure.next_retry_at - 0.1)) == []
    actions = guard(Tick(), at=failure.next_retry_at)
    assert unit_actions(actions) == [("start", ALICE_RESUME, "retry")]
    assert ResolveAlert("failed/alice") in actions
    assert guard.m("alice").retries == 1
    guard.done("start", ALICE_RESUME)
    guard(UnitChanged(ALICE_RESUME, RUNNING))
    assert guard.m("alice").failure is None


def test_retries_are_counted_and_given_up(guard: Guard) -> None:
    unit = ALICE
    for attempt in range(4):
        actions = guard(UnitChanged(unit, failed(5)), after=10)
        (incident,) = of_type(actions, WriteIncident)
        assert incident.record["retries"] == attempt
        failure = guard.m("alice").failure
        if attempt < 3:
            assert failure.phase == "waiting-retry"
            assert unit_actions(guard(Tick(), at=failure.next_retry_at)) == [
                ("start", ALICE_RESUME, "retry")
            ]
            guard.done("start", ALICE_RESUME)
            guard(UnitChanged(ALICE_RESUME, RUNNING), after=1)
            unit = ALICE_RESUME
    assert failure.phase == "needs-operator"
    assert "gave up after 3 retries" in incident.record["outcome"]
    assert unit_actions(guard(Tick(), after=86400)) == []
    # an operator retry clears the failure and starts over
    actions = guard(OperatorRequest("r", "retry", "alice"), after=1)
    assert replies(actions) == [(True, "alice: retrying")]
    assert unit_actions(actions) == [("start", ALICE_RESUME, "retry")] or unit_actions(actions) == [
        ("start", ALICE_RESUME, "resume")
    ]
    assert guard.m("alice").failure is None and guard.m("alice").retries == 0


def test_retry_delays_grow_and_are_capped() -> None:
    migration = make_config(retry_backoff="1m", retry_backoff_max="10m").migration("alice")
    delays = [retry_delay(migration, n) for n in range(12)]
    assert 45 <= delays[0] <= 75
    assert 90 <= delays[1] <= 150
    assert all(d <= 600 * 1.25 for d in delays)
    assert delays == [retry_delay(migration, n) for n in range(12)]  # deterministic


def test_verification_runs_before_the_incident() -> None:
    guard = started_guard(
        make_config(verify_command=["rclone", "check", "a:", "/b"], verify_timeout="10m")
    )
    actions = fail_alice(guard, 5)
    (verify,) = of_type(actions, RunVerify)
    assert verify == RunVerify("alice", ("rclone", "check", "a:", "/b"), 600.0)
    assert of_type(actions, WriteIncident) == []
    assert guard.m("alice").failure.phase == "verifying"
    actions = guard.verified("alice", ok=False, error="exit status 1")
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["verify"] == "failed: exit status 1"
    assert any("verify" in step for step in incident.record["steps"])


def test_unrecoverable_log_line_stops_the_migration(guard: Guard) -> None:
    line = "2025/01/01 10:00:00 CRITICAL: Failed to create file system: invalid_grant"
    actions = guard(
        LogParsed("alice", (LogEvidence(FailureClass.UNRECOVERABLE, "auth", line),)), after=1
    )
    assert unit_actions(actions) == [("stop", ALICE, "failure")]
    assert of_type(actions, WriteIncident) == []  # documented once stopped
    actions = guard.done("stop", ALICE)  # the job is done: the unit is down
    actions += guard(UnitChanged(ALICE, DEAD), after=1)
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["class"] == "unrecoverable"
    assert incident.record["trigger"] == "log"
    assert incident.record["matched_lines"] == [line]
    assert guard.m("alice").failure.phase == "needs-operator"
    assert unit_actions(guard(Tick(), after=86400)) == []


def test_unrecoverable_log_line_then_exit(guard: Guard) -> None:
    """The unit dies by itself right after the line: one failure, still unrecoverable."""
    line = "ERROR : Attempt 3/3 failed with 1 errors and: directory not found"
    guard(LogParsed("alice", (LogEvidence(FailureClass.UNRECOVERABLE, "dir", line),)), after=1)
    actions = guard(UnitChanged(ALICE, failed(5)), after=0.1)
    incidents = of_type(actions, WriteIncident)
    assert len(incidents) == 1 and incidents[0].record["class"] == "unrecoverable"


def test_a_stall_is_a_transient_failure(guard: Guard) -> None:
    guard(LogParsed("alice", progressed=True, transferred_bytes=10 * GiB), after=1)
    assert unit_actions(guard(Tick(), after=30 * 60 - 1)) == []
    actions = guard(Tick(), after=1)
    assert ("stop", ALICE, "failure") in unit_actions(actions)
    failure = guard.m("alice").failure
    assert failure.trigger == "stall" and failure.failure_class == "transient"
    actions = guard.done("stop", ALICE)
    actions += guard(UnitChanged(ALICE, DEAD), after=1)
    (incident,) = of_type(actions, WriteIncident)
    assert incident.record["progress"]["transferred_bytes"] == 10 * GiB


def test_progress_and_pauses_do_not_count_as_a_stall() -> None:
    # (max_freeze above the hour: a longer freeze would become a stop, no stall either)
    guard = started_guard(make_config(max_freeze="2h"))
    for _ in range(10):
        guard(LogParsed("alice", progressed=True), after=20 * 60)
        assert guard.m("alice").failure is None
    pause_alice(guard)
    assert unit_actions(guard(Tick(), after=3600)) == []  # frozen for an hour
    guard(sample(50), after=1)
    guard(Tick(), after=120)
    guard.done("thaw", ALICE)
    assert unit_actions(guard(Tick(), after=29 * 60)) == []
    assert guard.m("alice").failure is None


def test_disk_full_in_the_log_pauses_for_space(guard: Guard) -> None:
    line = "ERROR : file.bin: Failed to copy: write /space/alice/file.bin: no space left on device"
    actions = guard(
        LogParsed("alice", (LogEvidence(FailureClass.DISK_FULL, "enospc", line),)), after=1
    )
    assert ("freeze", ALICE, "disk_full") in unit_actions(actions)
    assert guard.state.volumes["space"].low_reason == "disk_full"
    assert guard.m("alice").failure is None
    assert of_type(actions, WriteIncident) == []


def test_disk_full_exit_pauses_and_restarts_once_space_is_back(guard: Guard) -> None:
    line = "ERROR : no space left on device"
    guard(LogParsed("alice", (LogEvidence(FailureClass.DISK_FULL, "enospc", line),)), after=1)
    guard(UnitChanged(ALICE, failed(5)), after=0.01)  # died before the freeze landed
    guard.done("freeze", ALICE, ok=False, error="unit not active")
    alice = guard.m("alice")
    assert alice.failure is None and alice.restart_on_release and alice.hold is not None
    guard(sample(50), after=1)
    actions = guard(Tick(), after=120)
    assert ("start", ALICE_RESUME, "resume") in unit_actions(actions)


def test_operator_retry_of_a_paused_migration_is_refused(guard: Guard) -> None:
    fail_alice(guard, 1)
    guard(sample(4), after=1)
    ((ok, message),) = replies(guard(OperatorRequest("r", "retry", "alice"), after=1))
    assert not ok and "resume it first" in message


# --- restart reconciliation ----------------------------------------------------------------


def saved_pause() -> GuardState:
    """What the store restores after a restart during a guard pause."""
    return GuardState(
        volumes={"space": VolumeState(low=True, low_reason="space", low_since=T0 - 600)},
        migrations={
            "alice": MigrationState(
                account="alice",
                hold=Hold("guard", "space", T0 - 600),
                paused_units=frozenset({ALICE}),
            )
        },
        incident_seq=7,
    )


def test_initial_state_keeps_what_is_configured() -> None:
    saved = saved_pause()
    saved = replace(
        saved,
        migrations={
            **saved.migrations,
            "gone": MigrationState(account="gone", hold=Hold("operator", "operator", 1.0)),
        },
    )
    state = initial_state(make_config(), saved)
    assert set(state.migrations) == {"alice", "bob", "carol"}
    assert state.migrations["alice"].hold == Hold("guard", "space", T0 - 600)
    assert set(state.migrations["alice"].units) == {ALICE, ALICE_RESUME}
    assert not any(view.known for view in state.migrations["alice"].units.values())
    assert state.incident_seq == 7
    assert set(state.volumes) == {"space", "data"}


def test_restart_with_a_unit_still_frozen() -> None:
    guard = Guard(make_config(), saved_pause())
    guard(BusChanged(True))
    actions = guard(UnitChanged(ALICE, FROZEN))
    assert unit_actions(actions) == []
    assert guard.m("alice").hold is not None and guard.m("alice").paused_units == {ALICE}
    guard(UnitChanged(ALICE_RESUME, DEAD))
    assert unit_actions(guard(sample(4), after=1)) == []
    guard(sample(50), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(guard(Tick(), after=120))


def test_restart_with_a_unit_thawed_meanwhile() -> None:
    guard = Guard(make_config(), saved_pause())
    guard(BusChanged(True))
    actions = guard(UnitChanged(ALICE, RUNNING))
    assert unit_actions(actions) == []
    assert ResolveAlert("paused/alice") in actions
    alice = guard.m("alice")
    assert alice.hold is None and alice.override and alice.paused_units == frozenset()
    assert unit_actions(guard(sample(4), after=1)) == []  # not re-frozen in this episode


def test_restart_with_a_unit_stopped_meanwhile() -> None:
    guard = Guard(make_config(), saved_pause())
    guard(BusChanged(True))
    guard(UnitChanged(ALICE, DEAD))
    alice = guard.m("alice")
    assert alice.paused_units == frozenset() and alice.hold is not None
    assert alice.failure is None


def restarted(guard: Guard) -> Guard:
    """The guard process restarts: only the durable state survives (through JSON)."""
    import json

    from spaceguard.state import _restore, durable

    saved = _restore(json.loads(json.dumps(durable(guard.state))))
    again = Guard(guard.config, saved, now=guard.now)
    again(BusChanged(True))
    return again


def test_restart_while_a_freeze_is_in_flight() -> None:
    """FreezeUnit was sent, the guard restarted before the reply: the unit is found frozen,
    and must still be thawed when the volume recovers (not left frozen forever)."""
    guard = started_guard()
    guard(sample(4), after=1)
    assert guard.m("alice").pending == {ALICE: "freeze"}
    guard = restarted(guard)
    guard(UnitChanged(ALICE, FROZEN))  # the freeze landed while the guard was down
    guard(UnitChanged(ALICE_RESUME, DEAD))
    assert guard.m("alice").paused_units == {ALICE}
    assert guard.m("alice").pending == {}
    guard(sample(50), after=1)
    assert ("thaw", ALICE, "released") in unit_actions(guard(Tick(), after=120))


def test_restart_while_a_freeze_is_in_flight_that_did_not_land() -> None:
    guard = started_guard()
    guard(sample(4), after=1)
    guard = restarted(guard)
    actions = guard(UnitChanged(ALICE, RUNNING))  # still running: freeze it (again)
    assert ("freeze", ALICE, "space") in unit_actions(actions)
    assert guard.m("alice").hold is not None and not guard.m("alice").override


def test_restart_while_a_stop_is_in_flight() -> None:
    """Stop mode: StopUnit was queued, the guard restarted before the job finished: the
    migration must be started again when the volume recovers."""
    guard = started_guard()
    guard(sample(4), after=1)
    assert guard.m("bob").pending == {BOB: "stop"}
    guard = restarted(guard)
    guard(UnitChanged(BOB, DEAD))
    guard(UnitChanged(BOB_RESUME, DEAD))
    assert guard.m("bob").failure is None and not guard.m("bob").finished
    guard(sample(50), after=1)
    assert ("start", BOB_RESUME, "resume") in unit_actions(guard(Tick(), after=120))


def test_restart_while_a_start_is_in_flight() -> None:
    """The resume unit's start landed while the guard was down: the migration is running
    and nothing is left to restart (not even once it finishes)."""
    guard = started_guard()
    pause_alice(guard)
    guard(sample(50), after=1)
    assert ("start", BOB_RESUME, "resume") in unit_actions(guard(Tick(), after=120))
    guard = restarted(guard)
    guard(UnitChanged(BOB, DEAD))
    guard(UnitChanged(BOB_RESUME, RUNNING))
    bob = guard.m("bob")
    assert bob.pending == {} and not bob.restart_on_release and bob.paused_units == frozenset()
    assert unit_actions(guard(UnitChanged(BOB_RESUME, DEAD), after=600)) == []  # finished
    assert guard.m("bob").finished


def test_restart_during_verification() -> None:
    """The verification's result is lost with the guard: run it again, don't hang in
    'verifying' forever (no incident, no retry)."""
    guard = started_guard(make_config(verify_command=["rclone", "check", "a:", "/b"]))
    fail_alice(guard, 5)
    assert guard.m("alice").failure.phase == "verifying"
    guard = restarted(guard)
    guard(UnitChanged(ALICE, failed(5)))
    actions = guard(UnitChanged(ALICE_RESUME, DEAD))
    assert of_type(actions, RunVerify)
    (incident,) = of_type(guard.verified("alice"), WriteIncident)
    assert incident.record["verify"] == "passed"


def test_a_failure_stop_during_a_pause_is_not_a_pause(guard: Guard) -> None:
    pause_alice(guard)
    guard(
        LogParsed("alice", (LogEvidence(FailureClass.UNRECOVERABLE, "auth", "invalid_grant"),)),
        after=1,
    )
    guard.done("stop", ALICE)
    guard(UnitChanged(ALICE, DEAD))
    alice = guard.m("alice")
    assert alice.failure.phase == "needs-operator"
    assert alice.paused_units == frozenset() and not alice.restart_on_release
    ((ok, _),) = replies(guard(OperatorRequest("r", "resume", "alice", force=True)))
    assert ok
    guard(sample(50), after=1)
    actions = guard(Tick(), after=120)
    assert [a for a in unit_actions(actions) if "alice" in a[1]] == []  # left for the operator


def test_stop_mode_hold_released_before_the_stop_job_returns(guard: Guard) -> None:
    """A slow stop (TimeoutStopSec) outlasts the hold: the migration was still paused by
    the guard, so it is started again, not taken as finished."""
    guard(sample(4), after=1)
    guard(sample(50), after=1)
    guard(Tick(), after=120)
    assert guard.m("bob").hold is None
    guard.done("stop", BOB, after=10)
    guard(UnitChanged(BOB, DEAD))
    assert not guard.m("bob").finished
    assert ("start", BOB_RESUME, "resume") in unit_actions(guard.issued[-1:])


def test_a_finished_migration_is_not_restarted(guard: Guard) -> None:
    """restart_on_release is left over from a disk_full death; the unit is started again
    by hand, frozen, thawed, and then finishes: nothing is started after that."""
    guard(
        LogParsed(
            "alice", (LogEvidence(FailureClass.DISK_FULL, "enospc", "no space left on device"),)
        ),
        after=1,
    )
    guard(UnitChanged(ALICE, failed(5)), after=0.01)
    guard.done("freeze", ALICE, ok=False, error="unit not active")
    assert guard.m("alice").restart_on_release
    guard(UnitChanged(ALICE, RUNNING), after=1)  # started by hand while held
    guard(Tick(), after=1)  # after the action backoff
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)
    guard(Tick(), after=120)
    guard.done("thaw", ALICE)
    assert unit_actions(guard(UnitChanged(ALICE, DEAD), after=3600)) == []
    assert guard.m("alice").finished
    assert unit_actions(guard(Tick(), after=60)) == []


def test_a_unit_started_by_hand_during_a_failure_is_thawed_after_a_pause(guard: Guard) -> None:
    """A failed migration waits for an operator; someone starts its unit by hand; the volume
    gets low (freeze) and recovers: the unit must be thawed, not left frozen with the
    "paused" alert resolved."""
    fail_alice(guard, 1)
    assert guard.m("alice").failure.phase == "needs-operator"
    guard(UnitChanged(ALICE, RUNNING), after=60)
    assert ("freeze", ALICE, "space") in unit_actions(guard(sample(4), after=1))
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)
    actions = guard(Tick(), after=120)
    assert ResolveAlert("paused/alice") in actions
    assert ("thaw", ALICE, "released") in unit_actions(actions)


def test_not_finished_while_the_other_unit_runs(guard: Guard) -> None:
    guard(UnitChanged(BOB_RESUME, RUNNING), after=1)
    guard(UnitChanged(BOB, DEAD), after=1)  # the main unit ends; the resume unit still runs
    assert not guard.m("bob").finished
    guard(UnitChanged(BOB_RESUME, DEAD), after=1)
    assert guard.m("bob").finished


def test_operator_resume_while_the_stop_job_runs(guard: Guard) -> None:
    guard(sample(4), after=1)
    ((ok, _),) = replies(guard(OperatorRequest("r", "resume", "bob", force=True), after=1))
    assert ok
    guard.done("stop", BOB, after=5)  # the stop job was already running: it completes
    guard(UnitChanged(BOB, DEAD))
    assert not guard.m("bob").finished
    assert ("start", BOB_RESUME, "resume") in unit_actions(guard.issued[-1:])


def test_a_pause_stop_that_lands_after_a_takeover(guard: Guard) -> None:
    """Stop mode: the guard stops the resume unit someone started during a pause; before
    the stop job ends, someone starts the main unit (a takeover): the migration runs, so
    nothing is left to restart."""
    pause_alice(guard)
    assert ("stop", BOB_RESUME, "space") in unit_actions(
        guard(UnitChanged(BOB_RESUME, RUNNING), after=1)
    )
    guard(UnitChanged(BOB, RUNNING), after=1)  # started by hand: an operator's decision
    assert guard.m("bob").hold is None
    guard(UnitChanged(BOB_RESUME, DEAD))
    guard.done("stop", BOB_RESUME)
    bob = guard.m("bob")
    assert bob.paused_units == frozenset() and not bob.restart_on_release


def test_a_takeover_in_stop_mode_forgets_every_stopped_unit(guard: Guard) -> None:
    """Both units were stopped by the guard; someone starts one: the migration is running,
    and must not be reported "paused" (status and metrics read paused_units)."""
    guard(UnitChanged(BOB_RESUME, RUNNING), after=1)
    guard(sample(4), after=1)
    for unit in (BOB, BOB_RESUME):
        guard.done("stop", unit)
        guard(UnitChanged(unit, DEAD))
    assert guard.m("bob").paused_units == {BOB, BOB_RESUME}
    guard(UnitChanged(BOB, RUNNING), after=1)
    bob = guard.m("bob")
    assert bob.hold is None and bob.paused_units == frozenset() and not bob.restart_on_release


def test_a_start_whose_reply_is_lost(guard: Guard) -> None:
    """StartUnit times out on the bus but the job runs: the migration is running, and is
    not reported "paused" nor started a second time."""
    guard(sample(4), after=1)
    guard(UnitChanged(BOB, DEAD))
    guard.done("stop", BOB)
    guard(sample(50), after=1)
    assert ("start", BOB_RESUME, "resume") in unit_actions(guard(Tick(), after=120))
    guard(UnitChanged(BOB_RESUME, RUNNING))
    guard.done("start", BOB_RESUME, ok=False, error="org.freedesktop.DBus.Error.NoReply")
    assert unit_actions(guard(Tick(), after=60)) == []
    bob = guard.m("bob")
    assert bob.paused_units == frozenset() and not bob.restart_on_release


def test_a_saved_action_on_a_unit_no_longer_configured_is_dropped() -> None:
    saved = GuardState(
        migrations={
            "bob": MigrationState(
                account="bob",
                pending={"m365-migrate-old@bob.service": "stop", BOB: "stop"},
                paused_units=frozenset({BOB}),
                restart_on_release=True,
            )
        }
    )
    state = initial_state(make_config(), saved)
    assert state.migrations["bob"].pending == {BOB: "stop"}
    guard = Guard(make_config(), saved)
    guard(BusChanged(True))
    guard(UnitChanged(BOB, DEAD))
    guard(UnitChanged(BOB_RESUME, DEAD))  # every unit seen, nothing else in flight: start
    assert unit_actions(guard.issued) == [("start", BOB_RESUME, "resume")]


def test_a_disk_full_line_does_not_classify_a_later_exit(guard: Guard) -> None:
    """ENOSPC in the log, pause, space back, thaw; an hour later the run exits with a fatal
    error: that is an unrecoverable failure (incident, no retry), not a full disk (which
    would pause every migration on a volume with plenty of free space)."""
    guard(
        LogParsed(
            "alice", (LogEvidence(FailureClass.DISK_FULL, "enospc", "no space left on device"),)
        ),
        after=1,
    )
    guard.done("freeze", ALICE)
    guard(sample(50), after=1)
    guard(Tick(), after=120)
    guard.done("thaw", ALICE)
    actions = guard(UnitChanged(ALICE, failed(7)), after=3600)
    assert of_type(actions, WriteIncident)[0].record["class"] == "unrecoverable"
    assert not guard.state.volumes["space"].low
    assert [a.key for a in of_type(actions, RaiseAlert)] == ["failed/alice"]


def test_a_disk_full_death_is_still_a_pause(guard: Guard) -> None:
    guard(
        LogParsed(
            "alice", (LogEvidence(FailureClass.DISK_FULL, "enospc", "no space left on device"),)
        ),
        after=1,
    )
    actions = guard(UnitChanged(ALICE, failed(7)), after=0.5)  # rclone gave up on ENOSPC
    assert of_type(actions, WriteIncident) == []
    assert guard.m("alice").failure is None and guard.m("alice").restart_on_release


def test_a_hold_on_an_idle_migration_is_announced_when_a_unit_of_it_starts() -> None:
    guard = Guard(make_config())
    guard(BusChanged(True))
    for unit, view in (
        (ALICE, DEAD),
        (ALICE_RESUME, DEAD),
        (BOB, RUNNING),
        (BOB_RESUME, DEAD),
        (CAROL, RUNNING),
    ):
        guard(UnitChanged(unit, view))
    actions = guard(sample(4), after=1)
    assert guard.m("alice").hold is not None
    assert "paused/alice" not in {a.key for a in of_type(actions, RaiseAlert)}
    actions = guard(UnitChanged(ALICE, RUNNING), after=1)  # a timer or a person starts it
    assert unit_actions(actions) == [("freeze", ALICE, "space")]
    assert "paused/alice" in {a.key for a in of_type(actions, RaiseAlert)}


def test_a_unit_found_frozen_without_record_is_adopted_by_a_new_guard_hold() -> None:
    # The guard crashed after FreezeUnit and before anything of it was saved.
    guard = Guard(make_config())
    guard(BusChanged(True))
    for unit, view in (
        (ALICE, FROZEN),
        (ALICE_RESUME, DEAD),
        (BOB, DEAD),
        (BOB_RESUME, DEAD),
        (CAROL, DEAD),
    ):
        guard(UnitChanged(unit, view))
    actions = guard(sample(4), after=1)
    assert guard.m("alice").paused_units == {ALICE}
    assert "paused/alice" in {a.key for a in of_type(actions, RaiseAlert)}
    guard(sample(50), after=1)
    actions = guard(Tick(), after=600)
    assert ("thaw", ALICE, "released") in unit_actions(actions)


def test_a_verify_unit_is_started_instead_of_a_command() -> None:
    guard = started_guard(make_config(verify_unit="m365-verify@alice.service"))
    actions = guard(UnitChanged(ALICE, failed(1)), after=1)  # failed: nothing to stop
    verifies = of_type(actions, RunVerify)
    assert verifies == [RunVerify("alice", (), 3600.0, "m365-verify@alice.service")]
    assert guard.m("alice").failure is not None
    assert guard.m("alice").failure.phase == "verifying"
