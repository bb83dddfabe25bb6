"""Whether the guard's own files can be written, said the way every other problem is said:
an alert, a STATUS= word and the metrics (metrics.py reads `stats()`).

The state file, the incidents and the alert spools live in the state directory and are
written by background writers (atomicfile.BackgroundWriter). When one of them cannot write
(the directory is full, read-only, not accessible, a directory sits where a file goes) the
guard goes on guarding from memory, and this module makes that visible: a firing alert per
store while it fails, resolved by the first write that succeeds again. The alert spool is
in the same directory, so these alerts may not reach the disk either: AlertSender keeps
what it cannot spool in memory and delivers it from there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .alerts import AlertSender, GuardAlert
from .atomicfile import WriterHealth

# a write still not done after this long counts as failing: a hung disk (a dead NFS
# server, a FUSE that stopped answering) never returns an error to report
HUNG_WRITE_SECONDS = 10.0


def effective(health: WriterHealth, now: float) -> WriterHealth:
    """`health`, with a write hung for HUNG_WRITE_SECONDS reported as a failure (also
    after errors: a retry that hangs says so instead of repeating the last error)."""
    if health.busy_since is not None:
        hung = now - health.busy_since
        if hung >= HUNG_WRITE_SECONDS:
            return dataclasses.replace(
                health,
                writable=False,
                last_error=f"a write has not finished for {hung:.0f}s (the disk hangs)",
                failing_since=health.failing_since or health.busy_since,
            )
    return health


@dataclass(frozen=True)
class Store:
    name: str  # the `store` label of the metrics
    what: str  # for people: "the state file", "incidents", "the alert spool"
    alert_name: str
    status_word: str  # in STATUS= while failing
    health: Callable[[], WriterHealth]
    location: str = ""


class StoreWatch:
    """Turns writer health into alerts and a STATUS= fragment; call `check` periodically
    on the loop (the guard does it every tick)."""

    def __init__(self, stores: list[Store]) -> None:
        self.stores = {store.name: store for store in stores}
        self._failing: dict[str, WriterHealth] = {}

    @staticmethod
    def alert_key(store: Store) -> str:
        return f"{store.name}-unwritable"

    def check(self, alerts: AlertSender, now: float | None = None) -> bool:
        """Fire or resolve the alerts of stores whose health changed; True if any did."""
        now = time.time() if now is None else now
        changed = False
        for store in self.stores.values():
            health = effective(store.health(), now)
            failing = self._failing.get(store.name)
            if not health.writable:
                if failing is None:  # once per streak: a changing error is no news
                    alerts.fire(self._alert(store, health, now))
                    changed = True
                elif failing.last_error != health.last_error:
                    changed = True  # STATUS= shows the current error
                self._failing[store.name] = health
            elif failing is not None:
                del self._failing[store.name]
                alerts.resolve(self.alert_key(store), now)
                changed = True
        return changed

    def _alert(self, store: Store, health: WriterHealth, now: float) -> GuardAlert:
        since = health.failing_since or now
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since))
        return GuardAlert(
            key=self.alert_key(store),
            name=store.alert_name,
            labels={"severity": "critical" if store.name == "state" else "warning"},
            annotations={
                "summary": f"spaceguard cannot write {store.what}",
                "description": (
                    f"Writing {store.what}"
                    + (f" in {store.location}" if store.location else "")
                    + f" fails since {stamp}:"
                    f" {health.last_error}. The guard goes on guarding from memory (freezes,"
                    f" thaws, stops and retries are not affected) and retries the write with"
                    f" backoff; {health.pending} write(s) wait in memory and would be lost if"
                    f" the guard stopped now. Free space or fix the directory's mount and"
                    f" permissions: the alert resolves by itself with the next write."
                ),
            },
            starts_at=min(since, now),
        )

    def status_words(self) -> str:
        """'; STATE NOT SAVED (No space left on device)' and the like, or ''."""
        words = ""
        for name, health in self._failing.items():
            store = self.stores[name]
            words += f"; {store.status_word} ({health.last_error})"
        return words

    def stats(self) -> Mapping[str, WriterHealth]:
        now = time.time()
        return {name: effective(store.health(), now) for name, store in self.stores.items()}

    def failing(self) -> Mapping[str, WriterHealth]:
        return dict(self._failing)
