"""pause_mode for a migration unit with its own WatchdogSec=: systemd 252 keeps that
watchdog's clock running while the unit is frozen and kills it (systemd#38517), so the
guard pauses such a unit by stopping it, resumes it through resume_unit, and says so."""

from __future__ import annotations

from spaceguard.model import UnitChanged, UnitView
from spaceguard.policy import diagnostics, pause_mode
from test_policy import ALICE, sample, started_guard, unit_actions


def alices(actions: list) -> list:  # type: ignore[type-arg]
    return [action for action in unit_actions(actions) if action[1] == ALICE]


WATCHED = UnitView("active", "running", service_type="notify", watchdog_usec=30_000_000)


def test_a_unit_with_its_own_watchdog_is_paused_by_stop_not_frozen() -> None:
    guard = started_guard()
    guard(UnitChanged(ALICE, WATCHED), after=1)
    assert guard.config.migration("alice").pause == "freeze"  # as configured
    assert pause_mode(guard.config.migration("alice"), guard.m("alice")) == "stop"
    notes = diagnostics(guard.config, guard.state)
    assert any("WatchdogSec=30s" in note and "systemd#38517" in note for note in notes), notes
    actions = guard(sample(4), after=1)
    assert alices(actions) == [("stop", ALICE, "space")]
    guard.done("stop", ALICE)
    guard(UnitChanged(ALICE, UnitView("inactive", "dead", watchdog_usec=30_000_000)), after=1)
    guard(sample(50), after=1)
    actions = guard(sample(50), after=121)
    assert ("start", "m365-migrate-resume@alice.service", "resume") in unit_actions(actions)
    assert not [a for a in unit_actions(actions) if a[0] in ("freeze", "thaw")]


def test_without_a_watchdog_the_unit_is_frozen() -> None:
    guard = started_guard()
    guard(UnitChanged(ALICE, UnitView("active", "running", service_type="exec")), after=1)
    assert pause_mode(guard.config.migration("alice"), guard.m("alice")) == "freeze"
    assert not any("WatchdogSec" in note for note in diagnostics(guard.config, guard.state))
    assert alices(guard(sample(4), after=1)) == [("freeze", ALICE, "space")]
