"""systemd 252's stale freezer record (systemd#37569), worked around in one place.

When the processes of a frozen unit die (SIGKILLed by someone, the OOM killer, or after
its own watchdog fired while it was frozen: systemd#38517), systemd 252 ends the unit
`failed` (or `inactive`) but keeps FreezerState=frozen. Measured in the sandbox
(tests/integration/test_fault_freezer_bugs.py): ThawUnit is then refused ("Unit is
inactive") and StopUnit changes nothing; a StartUnit runs the new processes unfrozen
while the record still says frozen, so the guard would take for frozen a writer that
keeps writing, and never freeze it. A ThawUnit once it runs again clears the record (so
does ResetFailedUnit, which the guard's polkit rule does not grant).

`StaleFreezer` stands between the systemd adapter and the rest of the guard. A unit seen
frozen while inactive or failed is reported as not frozen (nothing of it is: it has no
processes), and stays so reported until systemd's record changes. When the guard starts
such a unit, a ThawUnit follows the start; before it freezes one that runs again
(started by someone else), a ThawUnit goes first. A guard restarted meanwhile sees a
dead unit's record again and knows; a unit started by someone else before the guard saw
it dead shows as frozen, and is told as a pause nobody explains (policy: "found frozen
with no record of who froze it").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from .model import UnitView

log = logging.getLogger(__name__)

DEAD_STATES = frozenset({"inactive", "failed"})
FROZEN_RECORDS = frozenset({"frozen", "freezing"})

UnitCall = Callable[[str], Awaitable[None]]


class StaleFreezer:
    def __init__(self) -> None:
        self.stale: set[str] = set()  # units whose FreezerState systemd keeps wrongly

    def seen(self, unit: str, view: UnitView) -> UnitView:
        """systemd's report of `unit` → what is true of it."""
        if view.freezer_state not in FROZEN_RECORDS:
            if unit in self.stale:
                log.info("%s: systemd's freezer record is %s again", unit, view.freezer_state)
            self.stale.discard(unit)
            return view
        if view.active_state in DEAD_STATES and unit not in self.stale:
            self.stale.add(unit)
            log.warning(
                "%s: systemd says %s with FreezerState=%s: its processes died while frozen "
                "and systemd 252 kept the record (systemd#37569). Taken as not frozen; "
                "the record is reset when the guard starts or freezes it",
                unit,
                view.active_state,
                view.freezer_state,
            )
        if unit in self.stale:
            return replace(view, freezer_state="running")
        return view

    async def run(self, kind: str, unit: str, call: UnitCall, thaw: UnitCall) -> bool:
        """Carry out the unit action `kind` by `call`, so that it does what it says on a
        unit whose freezer record is stale. True when the record was reset after the
        call: the caller then reads the unit again (systemd 252 signals no change of
        FreezerState alone), and that reading ends the workaround."""
        if unit in self.stale and kind == "freeze":
            await thaw(unit)  # running again, not frozen: the record fixed first
            self.stale.discard(unit)  # from this freeze on, the record is true
            log.warning("%s: stale freezer record reset (thawed) before the freeze", unit)
        await call(unit)
        if unit not in self.stale or kind != "start":
            return False
        try:
            await thaw(unit)
        except Exception as error:  # the start happened; the next freeze thaws first
            log.warning("%s: started, but the stale freezer record stays: %s", unit, error)
            return False
        log.warning("%s: stale freezer record reset (thawed) after the start", unit)
        return True
