"""A volume's migrations frozen with one FreezeUnit of their slice (volumes.X.slice), and
what still goes unit by unit: thaws, operator holds, anything that must keep running."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spaceguard.config import Config, parse
from spaceguard.model import (
    ActionDone,
    BusChanged,
    GuardState,
    OperatorRequest,
    ReadUnit,
    SliceFreeze,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    VolumeSampled,
)
from spaceguard.policy import decide, initial_state

GiB = 1 << 30
SIZE = 100 * GiB
T0 = 1_750_000_000.0
RUNNING = UnitView("active", "running", service_type="exec")
FROZEN = UnitView("active", "running", freezer_state="frozen", service_type="exec")
N = 10
UNITS = [f"m@a{i}.service" for i in range(N)]


def config(slice_name: str = "m365-space.slice", **extra: Any) -> Config:
    volume: dict[str, Any] = {
        "path": "/space",
        "pause_below": "5%",
        "resume_above": "10%",
        "resume_after": "10s",
        "resume_batch": N,
    }
    if slice_name:
        volume["slice"] = slice_name
    migrations: list[dict[str, Any]] = [
        {"account": f"a{i}", "unit": UNITS[i], "volume": "space"} for i in range(N)
    ]
    migrations[0].update(extra)
    return parse(
        Path("/etc/spaceguard/test.toml"), {"volumes": {"space": volume}, "migrations": migrations}
    )


class Guard:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.now = T0
        self.state: GuardState = initial_state(cfg)
        self(BusChanged(True))
        for unit in UNITS:
            self(UnitChanged(unit, RUNNING))
        self(sample(50))

    def __call__(self, event: Any, after: float = 0.01) -> list[Any]:
        self.now += after
        self.state, actions = decide(self.cfg, self.state, event, self.now)
        return actions


def sample(avail_gib: float) -> VolumeSampled:
    return VolumeSampled("space", int(avail_gib * GiB), SIZE, 500_000, 1_000_000, 0.0)


def units_of(actions: list[Any], kind: str) -> list[str]:
    return sorted(a.unit for a in actions if isinstance(a, UnitAction) and a.kind == kind)


def slices(actions: list[Any]) -> list[SliceFreeze]:
    return [a for a in actions if isinstance(a, SliceFreeze)]


def test_a_crossing_freezes_the_slice_in_one_action() -> None:
    guard = Guard(config())
    actions = guard(sample(4))
    assert units_of(actions, "freeze") == []
    [group] = slices(actions)
    assert group.slice == "m365-space.slice" and group.volume == "space"
    assert sorted(a.unit for a in group.actions) == sorted(UNITS)
    assert all(guard.state.migrations[f"a{i}"].pending == {UNITS[i]: "freeze"} for i in range(N))
    guard(ActionDone(group, True))
    for i in range(N):
        migration = guard.state.migrations[f"a{i}"]
        assert migration.paused_units == {UNITS[i]} and migration.pending == {}
        assert migration.units[UNITS[i]].frozen


def test_thaws_stay_per_unit_and_an_operator_hold_stays_frozen() -> None:
    guard = Guard(config())
    actions = guard(OperatorRequest("r1", "pause", "a0"))
    assert units_of(actions, "freeze") == [UNITS[0]]
    freeze = next(a for a in actions if isinstance(a, UnitAction))
    guard(ActionDone(freeze, True))
    actions = guard(sample(4))
    [group] = slices(actions)  # a0 is frozen already: the others in one call
    assert sorted(a.unit for a in group.actions) == sorted(UNITS[1:])
    guard(ActionDone(group, True))
    guard(sample(50))
    actions = guard(Tick(), after=11)
    assert units_of(actions, "thaw") == sorted(UNITS[1:])
    assert guard.state.migrations["a0"].hold is not None
    assert guard.state.migrations["a0"].hold.by == "operator"


def test_a_unit_that_must_keep_running_makes_the_freezes_per_unit() -> None:
    guard = Guard(config(pause="stop", resume_unit="m@a0-resume.service"))
    actions = guard(sample(4))
    assert slices(actions) == []  # the slice would freeze a0, which is to be stopped
    assert units_of(actions, "freeze") == sorted(UNITS[1:])
    assert units_of(actions, "stop") == [UNITS[0]]


def test_without_a_slice_every_unit_is_frozen_by_itself() -> None:
    guard = Guard(config(slice_name=""))
    actions = guard(sample(4))
    assert slices(actions) == []
    assert units_of(actions, "freeze") == sorted(UNITS)


def test_a_refused_slice_freeze_falls_back_to_per_unit_until_recovery() -> None:
    guard = Guard(config())
    [group] = slices(guard(sample(4)))
    actions = guard(ActionDone(group, False, "m365-space.slice holds other units (x.service)"))
    assert units_of(actions, "freeze") == sorted(UNITS)  # at once, one by one
    assert guard.state.volumes["space"].slice_refused
    for action in actions:
        if isinstance(action, UnitAction):
            guard(ActionDone(action, True))
    guard(sample(50))
    actions = guard(Tick(), after=11)  # recovered: thawed one by one
    for action in actions:
        if isinstance(action, UnitAction):
            guard(ActionDone(action, True))
    assert not guard.state.volumes["space"].slice_refused
    assert len(slices(guard(sample(4)))) == 1  # the next low episode tries the slice again


def test_an_unknown_outcome_reads_every_member_and_settles_each() -> None:
    guard = Guard(config())
    [group] = slices(guard(sample(4)))
    actions = guard(ActionDone(group, False, "NoReply", unknown=True))
    assert sorted(a.unit for a in actions if isinstance(a, ReadUnit)) == sorted(UNITS)
    assert units_of(actions, "freeze") == []  # not asked again before the reading
    # systemd shows a0 frozen (it landed) and a1 running (it did not)
    guard(UnitChanged(UNITS[0], FROZEN))
    assert guard.state.migrations["a0"].paused_units == {UNITS[0]}
    actions = guard(UnitChanged(UNITS[1], RUNNING))
    assert units_of(actions, "freeze") == [UNITS[1]]
