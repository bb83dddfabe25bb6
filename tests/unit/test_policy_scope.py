"""What one decision reconciles: the migration an event concerns, every migration on a
volume whose low/up state changed, everything on a Tick; and what a timer made due."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spaceguard.config import Config, parse
from spaceguard.model import (
    ActionDone,
    BusChanged,
    GuardState,
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


def config(n: int = 20) -> Config:
    document: dict[str, Any] = {
        "volumes": {
            "space": {"path": "/space", "pause_below": "5%", "resume_above": "10%"},
            "data": {"path": "/data", "pause_below": "5%", "resume_above": "10%"},
        },
        "migrations": [
            {"account": f"a{i}", "unit": f"m@a{i}.service", "volume": "space"} for i in range(n)
        ]
        + [{"account": "other", "unit": "m@other.service", "volume": "data"}],
    }
    return parse(Path("/etc/spaceguard/test.toml"), document)


def sample(avail_gib: float, volume: str = "space") -> VolumeSampled:
    return VolumeSampled(volume, int(avail_gib * GiB), SIZE, 500_000, 1_000_000, 0.0)


def started(cfg: Config) -> GuardState:
    state = initial_state(cfg)
    state, _ = decide(cfg, state, BusChanged(True), T0)
    for migration in cfg.migrations:
        state, _ = decide(cfg, state, UnitChanged(migration.unit, RUNNING), T0)
    for volume in cfg.volumes:
        state, _ = decide(cfg, state, sample(50, volume), T0)
    return state


def freezes(actions: list[Any]) -> list[UnitAction]:
    return [a for a in actions if isinstance(a, UnitAction) and a.kind == "freeze"]


def test_a_crossing_pauses_every_migration_of_that_volume_and_no_other() -> None:
    cfg = config()
    state = started(cfg)
    state, actions = decide(cfg, state, sample(4), T0 + 1)
    assert sorted(a.account for a in freezes(actions)) == sorted(f"a{i}" for i in range(20))
    assert state.migrations["other"].hold is None


def test_a_reply_touches_its_migration_only() -> None:
    cfg = config()
    state = started(cfg)
    state, actions = decide(cfg, state, sample(4), T0 + 1)
    before = state
    first = freezes(actions)[0]
    state, actions = decide(cfg, state, ActionDone(first, True), T0 + 1.01)
    assert state.migrations[first.account].paused_units == {first.unit}
    for account, migration in state.migrations.items():
        if account != first.account:
            assert migration is before.migrations[account]  # not even copied


def test_a_sample_that_changes_nothing_reconciles_nothing() -> None:
    cfg = config()
    state = started(cfg)
    new, actions = decide(cfg, state, sample(49), T0 + 1)
    assert all(new.migrations[a] is state.migrations[a] for a in state.migrations)
    assert [a for a in actions if isinstance(a, UnitAction)] == []


def test_every_reply_of_a_burst_lands_and_the_view_is_complete() -> None:
    cfg = config(200)
    state = started(cfg)
    state, actions = decide(cfg, state, sample(4), T0 + 1)
    issued = freezes(actions)
    assert len(issued) == 200
    for i, action in enumerate(issued):
        state, more = decide(cfg, state, ActionDone(action, True), T0 + 1 + i / 1000)
        assert freezes(more) == []  # nothing asked twice
    assert all(state.migrations[f"a{i}"].paused_units for i in range(200))
    assert all(state.migrations[f"a{i}"].units[f"m@a{i}.service"].frozen for i in range(200))


def test_a_failed_freeze_is_asked_again_when_its_backoff_is_due_on_any_event() -> None:
    cfg = config()
    state = started(cfg)
    state, actions = decide(cfg, state, sample(4), T0 + 1)
    failed = freezes(actions)[0]
    state, _ = decide(cfg, state, ActionDone(failed, False, "Refused: busy"), T0 + 1)
    retry_at = state.migrations[failed.account].action_retry_at
    assert retry_at > T0 + 1
    # an event about another migration, after the backoff: the retry goes out with it
    other = freezes(actions)[1]
    _, actions = decide(cfg, state, ActionDone(other, True), retry_at + 0.01)
    assert [(a.account, a.unit) for a in freezes(actions)] == [(failed.account, failed.unit)]


def test_recovery_after_the_hold_down_releases_every_migration_on_a_tick() -> None:
    cfg = config()
    state = started(cfg)
    state, actions = decide(cfg, state, sample(4), T0 + 1)
    for action in freezes(actions):
        state, _ = decide(cfg, state, ActionDone(action, True), T0 + 1)
    state, _ = decide(cfg, state, sample(50), T0 + 2)  # back above resume_above
    hold_down = cfg.volumes["space"].resume_after
    state, actions = decide(cfg, state, Tick(), T0 + 2 + hold_down)
    thaws = [a for a in actions if isinstance(a, UnitAction) and a.kind == "thaw"]
    assert sorted(a.account for a in thaws) == sorted(f"a{i}" for i in range(20))


def test_a_light_tick_reconciles_only_what_came_due() -> None:
    cfg = config()
    state = started(cfg)
    new, actions = decide(cfg, state, Tick(full=False), T0 + 1)
    assert new is state and [a for a in actions if isinstance(a, UnitAction)] == []


def test_a_light_tick_sees_a_stall() -> None:
    document: dict[str, Any] = {
        "volumes": {"space": {"path": "/space"}},
        "migrations": [
            {"account": "a", "unit": "m@a.service", "volume": "space", "stall_after": "1m"},
            {"account": "b", "unit": "m@b.service", "volume": "space"},
        ],
    }
    cfg = parse(Path("/etc/spaceguard/test.toml"), document)
    state = started(cfg)
    state, actions = decide(cfg, state, Tick(full=False), T0 + 61)
    assert [(a.kind, a.unit) for a in actions if isinstance(a, UnitAction)] == [
        ("stop", "m@a.service")
    ]
    assert state.migrations["a"].failure is not None
    assert state.migrations["a"].failure.trigger == "stall"
