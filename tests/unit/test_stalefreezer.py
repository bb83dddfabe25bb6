"""StaleFreezer (pure parts): systemd 252's frozen record of a dead unit (systemd#37569) is
reported as not frozen, and reset around a start or a freeze, by a thaw systemd takes."""

from __future__ import annotations

import asyncio

from spaceguard.model import UnitView
from spaceguard.stalefreezer import StaleFreezer

U = "m365-migrate@alice.service"
FROZEN = UnitView("active", "running", freezer_state="frozen")
KILLED = UnitView("failed", "failed", freezer_state="frozen", result="signal")
RESTARTED = UnitView("active", "running", freezer_state="frozen")  # the record lies


def calls(fix: StaleFreezer, kind: str, thaw_fails: bool = False) -> list[str]:
    """The calls made for `kind`, then "reread" if the caller is asked to read again."""
    made: list[str] = []

    async def call(unit: str) -> None:
        made.append(f"{kind} {unit}")

    async def thaw(unit: str) -> None:
        made.append(f"thaw {unit}")
        if thaw_fails:
            raise RuntimeError("Unit is inactive")

    if asyncio.run(fix.run(kind, U, call, thaw)):
        made.append("reread")
    return made


def test_a_real_freeze_is_reported_as_it_is() -> None:
    fix = StaleFreezer()
    assert fix.seen(U, FROZEN) == FROZEN
    assert calls(fix, "start") == [f"start {U}"]
    assert calls(fix, "freeze") == [f"freeze {U}"]


def test_a_unit_that_died_frozen_is_not_frozen_and_is_thawed_after_its_start() -> None:
    fix = StaleFreezer()
    fix.seen(U, FROZEN)
    view = fix.seen(U, KILLED)
    assert not view.frozen and view.active_state == "failed" and view.result == "signal"
    assert calls(fix, "stop") == [f"stop {U}"]
    assert calls(fix, "start") == [f"start {U}", f"thaw {U}", "reread"]
    # the reading shows the record reset: that ends it
    assert fix.seen(U, UnitView("active", "running")) == UnitView("active", "running")
    assert calls(fix, "start") == [f"start {U}"]


def test_a_thaw_that_fails_after_the_start_leaves_the_record_marked_stale() -> None:
    fix = StaleFreezer()
    fix.seen(U, KILLED)
    assert calls(fix, "start", thaw_fails=True) == [f"start {U}", f"thaw {U}"]  # no raise
    assert U in fix.stale


def test_restarted_by_someone_the_record_still_lies_until_a_thaw() -> None:
    fix = StaleFreezer()
    fix.seen(U, KILLED)
    assert not fix.seen(U, RESTARTED).frozen
    assert calls(fix, "freeze") == [f"thaw {U}", f"freeze {U}"]  # the record fixed first
    assert fix.seen(U, FROZEN) == FROZEN  # the guard's own freeze, real


def test_the_record_changing_ends_the_workaround() -> None:
    fix = StaleFreezer()
    fix.seen(U, KILLED)
    fix.seen(U, UnitView("inactive", "dead", freezer_state="running"))
    assert fix.stale == set()
    assert calls(fix, "start") == [f"start {U}"]
