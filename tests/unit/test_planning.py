"""Space planning, pure: admission (never start what cannot fit), the ladder (warn, no new
starts, freeze, stop after max_freeze), and resuming without a stampede."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spaceguard.config import Config, parse
from spaceguard.model import (
    BusChanged,
    Log,
    LogParsed,
    OperatorRequest,
    RaiseAlert,
    ResolveAlert,
    Tick,
    UnitChanged,
    UnitView,
    VolumeSampled,
)
from spaceguard.watermarks import committed_bytes, remaining_bytes
from test_policy import Guard, of_type, unit_actions

GiB = 1024**3
SIZE = 100 * GiB  # pause below 5 GiB, resume above 10 GiB
T0 = 1_750_000_000.0
RUNNING = UnitView("active", "running", started_at=T0)
DEAD = UnitView("inactive", "dead", result="success")
FROZEN = UnitView("active", "running", freezer_state="frozen", started_at=T0)


def planned(volume: dict[str, Any] | None = None, **migrations: dict[str, Any]) -> Config:
    document = {
        "volumes": {
            "space": {
                "path": "/space",
                "pause_below": "5%",
                "resume_above": "10%",
                "resume_after": "1m",
                "predict": "0s",
                **(volume or {}),
            }
        },
        "migrations": [
            {
                "account": account,
                "unit": f"m@{account}.service",
                "volume": "space",
                "resume_unit": f"r@{account}.service",
                **keys,
            }
            for account, keys in migrations.items()
        ],
    }
    return parse(Path("/etc/spaceguard/t.toml"), document)


def sample(avail_gib: float, rate: float = 0.0) -> VolumeSampled:
    return VolumeSampled("space", int(avail_gib * GiB), SIZE, 10**6, 2 * 10**6, rate)


def boot(config: Config, running: tuple[str, ...] = (), avail: float = 50) -> Guard:
    guard = Guard(config, now=T0)
    guard(BusChanged(True))
    guard(sample(avail))
    for migration in config.migrations:
        guard(UnitChanged(migration.unit, RUNNING if migration.account in running else DEAD))
        guard(UnitChanged(migration.resume_unit, DEAD))
    return guard


def start(guard: Guard, account: str) -> list:
    return guard(UnitChanged(f"m@{account}.service", RUNNING), after=1)


# --- will it fit? ----------------------------------------------------------------------------


def test_remaining_prefers_rclones_totals() -> None:
    config = planned(alice={"expected_size": "30GiB"})
    guard = boot(config, running=("alice",))
    migration = config.migrations[0]
    assert remaining_bytes(migration, guard.m("alice")) == 30 * GiB
    guard(LogParsed("alice", transferred_bytes=5 * GiB), after=1)
    assert remaining_bytes(migration, guard.m("alice")) == 25 * GiB
    guard(LogParsed("alice", transferred_bytes=6 * GiB, total_bytes=10 * GiB), after=1)
    assert remaining_bytes(migration, guard.m("alice")) == 4 * GiB
    assert committed_bytes(config, guard.state, "space") == 4 * GiB


def test_a_migration_that_cannot_fit_is_held_before_it_writes_and_starts_when_it_fits() -> None:
    guard = boot(planned(alice={"expected_size": "60GiB"}), avail=50)
    actions = start(guard, "alice")
    assert unit_actions(actions) == [("freeze", "m@alice.service", "admission")]
    (alert,) = [a for a in of_type(actions, RaiseAlert) if a.key == "paused/alice"]
    assert alert.name == "SpaceguardMigrationNotAdmitted"
    assert "alice needs 60.0 GiB more; 45.0 GiB free after the others" in alert.description
    guard.done("freeze", "m@alice.service")
    guard(UnitChanged("m@alice.service", FROZEN))
    assert unit_actions(guard(sample(60), after=1)) == []  # 55 GiB above pause: still short
    actions = guard(sample(70), after=1)
    assert ("thaw", "m@alice.service", "released") in unit_actions(actions)
    assert [a for a in of_type(actions, ResolveAlert) if a.key == "paused/alice"]


def test_two_that_fit_alone_but_not_together_are_serialised() -> None:
    guard = boot(planned(alice={"expected_size": "30GiB"}, bob={"expected_size": "30GiB"}))
    assert unit_actions(start(guard, "alice")) == []  # 45 GiB free above pause: fits
    actions = start(guard, "bob")  # 45 - 30 = 15 GiB left for bob's 30: held
    assert unit_actions(actions) == [("freeze", "m@bob.service", "admission")]
    guard.done("freeze", "m@bob.service")
    guard(UnitChanged("m@bob.service", FROZEN))
    assert unit_actions(guard(sample(20), after=60)) == []  # alice wrote her 30 GiB
    actions = guard(UnitChanged("m@alice.service", DEAD), after=1)  # and is done
    assert unit_actions(actions) == []  # 15 GiB above pause: bob's 30 do not fit yet
    actions = guard(sample(40), after=1)  # 35 GiB above pause: bob fits now
    assert ("thaw", "m@bob.service", "released") in unit_actions(actions)


def test_an_operator_can_start_what_does_not_fit() -> None:
    guard = boot(planned(alice={"expected_size": "60GiB"}))
    start(guard, "alice")
    guard.done("freeze", "m@alice.service")
    guard(UnitChanged("m@alice.service", FROZEN))
    actions = guard(OperatorRequest("r", "resume", "alice"), after=1)
    assert ("thaw", "m@alice.service", "released") in unit_actions(actions)
    guard(UnitChanged("m@alice.service", RUNNING))
    assert unit_actions(guard(Tick(), after=1)) == []  # not held again this run


def test_without_a_size_nothing_is_held_until_rclone_gives_its_totals() -> None:
    guard = boot(planned(alice={}))
    assert unit_actions(start(guard, "alice")) == []
    actions = guard(LogParsed("alice", transferred_bytes=GiB, total_bytes=80 * GiB), after=1)
    assert unit_actions(actions) == [("freeze", "m@alice.service", "admission")]


def test_an_admission_hold_past_max_freeze_is_a_stop_and_a_resume_once_it_fits() -> None:
    guard = boot(planned({"max_freeze": "10m"}, alice={}), running=("alice",))
    actions = guard(LogParsed("alice", transferred_bytes=GiB, total_bytes=80 * GiB), after=1)
    assert unit_actions(actions) == [("freeze", "m@alice.service", "admission")]
    log = " ".join(a.message for a in of_type(actions, Log))
    assert "alice: held after writing 1.0 GiB (its totals came now)" in log
    guard.done("freeze", "m@alice.service")
    guard(UnitChanged("m@alice.service", FROZEN))
    assert unit_actions(guard(Tick(), after=9 * 60)) == []
    # frozen mid-copy as long as space is short: rclone's sessions would time out
    actions = guard(Tick(), after=61)
    assert unit_actions(actions) == [("stop", "m@alice.service", "admission")]
    guard.done("stop", "m@alice.service")
    guard(UnitChanged("m@alice.service", DEAD))
    assert unit_actions(guard(sample(70), after=1)) == []  # 79 GiB still do not fit
    actions = guard(sample(95), after=1)  # 90 GiB above pause_below: it fits
    assert unit_actions(actions) == [("start", "r@alice.service", "resume")]
    assert [a for a in of_type(actions, ResolveAlert) if a.key == "paused/alice"]
    guard.done("start", "r@alice.service")
    guard(UnitChanged("r@alice.service", RUNNING))
    assert guard.m("alice").freeze_expired is False  # the next pause freezes again


def test_admission_can_be_switched_off() -> None:
    guard = boot(planned(alice={"expected_size": "60GiB", "admission": False}))
    assert unit_actions(start(guard, "alice")) == []


# --- the ladder ------------------------------------------------------------------------------


def test_each_step_fires_in_order() -> None:
    config = planned(
        {"warn_below": "30%", "warn_after": "1m", "admit_below": "20%", "max_freeze": "10m"},
        alice={},
        bob={},
    )
    guard = boot(config, running=("alice",), avail=50)
    # 1. warn: an alert only, after warn_after
    assert of_type(guard(sample(25), after=1), RaiseAlert) == []
    (warn,) = of_type(guard(sample(25), after=61), RaiseAlert)
    assert (warn.name, warn.key) == ("SpaceguardVolumeLow", "low/space")
    assert unit_actions(guard(Tick(), after=1)) == []
    # 2. no new starts: bob starts below admit_below and is held; alice runs on
    guard(sample(15), after=1)
    actions = start(guard, "bob")
    assert unit_actions(actions) == [("freeze", "m@bob.service", "no-new-starts")]
    guard.done("freeze", "m@bob.service")
    guard(UnitChanged("m@bob.service", FROZEN))
    # 3. freeze: below pause_below, alice is frozen too
    actions = guard(sample(4), after=1)
    assert unit_actions(actions) == [("freeze", "m@alice.service", "space")]
    guard.done("freeze", "m@alice.service")
    guard(UnitChanged("m@alice.service", FROZEN))
    # 4. stop after max_freeze: the freeze becomes a stop
    assert unit_actions(guard(Tick(), after=9 * 60)) == []
    actions = guard(Tick(), after=61)
    assert ("stop", "m@alice.service", "space") in unit_actions(actions)
    guard.done("stop", "m@alice.service")
    guard(UnitChanged("m@alice.service", DEAD))
    # space back: alice resumes through her resume unit; the warning resolves
    actions = guard(sample(60), after=1)
    actions += guard(sample(60), after=61)
    assert ("start", "r@alice.service", "resume") in unit_actions(actions)
    assert ResolveAlert("low/space") in actions


# --- resume without a stampede ---------------------------------------------------------------


def paused_writers(n: int, rate: float, volume: dict[str, Any] | None = None) -> Guard:
    config = planned(volume, **{f"w{i}": {"priority": i % 3} for i in range(n)})
    guard = boot(config, running=tuple(f"w{i}" for i in range(n)))
    guard(sample(4, rate=rate), after=1)
    for i in range(n):
        guard.done("freeze", f"m@w{i}.service")
        guard(UnitChanged(f"m@w{i}.service", FROZEN))
    guard(sample(20), after=1)
    return guard


def test_fast_writers_are_resumed_a_few_at_a_time_highest_priority_first() -> None:
    # 10 writers filled it at 1 GiB/s together (0.1 GiB/s each); after recovery 15 GiB are
    # free: for 10 s above resume_above (10 GiB) the volume takes 0.5 GiB/s, 5 writers
    guard = paused_writers(10, rate=1 * GiB, volume={"predict": "0s"})
    actions = guard(sample(15), after=61)
    thawed = {unit for kind, unit, _ in unit_actions(actions) if kind == "thaw"}
    first = {f"m@w{i}.service" for i in (2, 5, 8, 1, 4)}  # priority 2, then 1 by name
    assert thawed == first
    # the next batch waits for its step, and for the fill rate the first batch makes
    assert [a for a in unit_actions(guard(sample(14, 0.5 * GiB), after=5)) if a[0] == "thaw"] == []


def test_idle_writers_are_resumed_at_once() -> None:
    guard = paused_writers(20, rate=0.0)
    actions = guard(sample(20), after=61)
    assert len([a for a in unit_actions(actions) if a[0] == "thaw"]) == 20


def test_a_configured_batch_size_holds() -> None:
    guard = paused_writers(6, rate=0.0, volume={"resume_batch": 2, "resume_step": "10s"})
    first = guard(sample(20), after=61)
    assert len([a for a in unit_actions(first) if a[0] == "thaw"]) == 2
    assert [a for a in unit_actions(guard(Tick(), after=1)) if a[0] == "thaw"] == []
    later = guard(Tick(), after=10)
    assert len([a for a in unit_actions(later) if a[0] == "thaw"]) == 2


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 10),
    per_writer=st.floats(0.01, 0.3),  # GiB/s each
    work=st.floats(1, 6),  # GiB each still to write once space is back
    spare=st.floats(1, 20),  # GiB above pause_below left when all are done
)
def test_n_writers_resuming_do_not_flap(
    n: int, per_writer: float, work: float, spare: float
) -> None:
    """A simulated volume: each running writer eats its rate and reports its totals, as
    rclone does. They fill it to the pause; a person frees enough for all their work.
    Every writer is paused once, resumed once, and finishes: no pause/resume cycles, even
    with the predictive pause on (10m)."""
    config = planned(
        {"resume_after": "10s", "predict": "10m"},
        # (admission off: this is about pausing and resuming what was already writing)
        **{f"w{i}": {"priority": i % 3, "admission": False} for i in range(n)},
    )
    names = [f"w{i}" for i in range(n)]
    guard = boot(config, running=tuple(names), avail=6)
    left = dict.fromkeys(names, work + 1.0)  # GiB; 1 GiB of it before the pause
    running = set(names)
    pauses = dict.fromkeys(names, 0)
    thaws = dict.fromkeys(names, 0)
    avail = 6.0
    freed = False
    for _ in range(3000):  # 0.5 s steps
        rate = per_writer * len(running)
        actions = []
        for account in names:
            done = (work + 1.0) - left[account]
            actions += guard(
                LogParsed(
                    account,
                    transferred_bytes=int(done * GiB),
                    total_bytes=int((work + 1.0) * GiB),
                ),
                after=0,
            )
        actions += guard(sample(avail, rate * GiB), after=0.5)
        for kind, unit, _reason in unit_actions(actions):
            account = unit.split("@")[1].split(".")[0]
            guard.done(kind, unit)
            if kind == "freeze":
                running.discard(account)
                pauses[account] += 1
                guard(UnitChanged(unit, FROZEN))
            elif kind == "thaw":
                running.add(account)
                thaws[account] += 1
                guard(UnitChanged(unit, RUNNING))
        for account in list(running):
            step = min(left[account], per_writer * 0.5)
            left[account] -= step
            avail -= step
            if left[account] <= 0:
                running.discard(account)
                guard(UnitChanged(f"m@{account}.service", DEAD))
        if not freed and not running:  # all paused: an operator frees space
            avail = 5 + spare + sum(left.values())
            freed = True
        if freed and all(value <= 0 for value in left.values()):
            break
        assert avail > 0, "the volume filled up"
    assert freed and all(value <= 0 for value in left.values()), left
    assert all(count == 1 for count in pauses.values()), pauses
    assert all(count == 1 for count in thaws.values()), thaws


@pytest.mark.parametrize("key", ["resume_batch", "max_freeze"])
def test_bad_ladder_values_are_refused(key: str) -> None:
    from spaceguard.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        planned({key: -1})
