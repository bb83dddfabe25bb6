"""Every decision the guard makes, as one pure function: `decide(config, state, event, now)`.

No I/O, no clock reads, no asyncio: adapters turn the world into events, and the actions
returned here into effects. The function is level-triggered, like a controller: each event
updates the guard's view, then every migration is *reconciled* (what should its units be
doing, given the holds and failures, and what are they doing?) and the difference becomes
actions. So a lost action, a bus that comes back or a restart with saved state all end in
the same place.

Scenario 3 (space): a volume below `pause_below` (or inside the hysteresis band and filling
fast enough to cross `pause_below` within `predict`) is *low*; every migration on it gets a
guard hold and is paused (freeze, or stop). It stays low until free space is back above
`resume_above` (bytes and inodes) continuously for `resume_after`; then guard holds are
released and what the guard paused is resumed. Operator holds are never released here.

Scenario 1 (failure): a unit that fails, an unrecoverable log line, or a stall starts a
failure: stop → verify (optional) → write incident → retry with backoff (transient) or
wait for an operator (unrecoverable, or retries used up).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any, Literal, cast

from .config import Config, MigrationConfig, VolumeConfig
from .model import (
    ACTIVE_STATES,
    Action,
    ActionDone,
    BusChanged,
    ClockStepped,
    Event,
    Failure,
    FailureClass,
    GuardState,
    Hold,
    ItemErrors,
    Log,
    LogEvidence,
    LogParsed,
    MigrationState,
    OperatorRequest,
    RaiseAlert,
    ReadUnit,
    Reply,
    ResolveAlert,
    RunSize,
    RunVerify,
    SizeMeasured,
    SliceFreeze,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    VolumeSampled,
    VolumeState,
    VolumeUnavailable,
    WriteIncident,
)
from .model import fast_replace as replace  # dataclasses.replace, 7x faster
from .quantities import format_size
from .rclone import SUMMARY, classify_exit_code
from .watermarks import committed_bytes, remaining_bytes, seconds_to_pause, thresholds

UNIT_ACTION_BACKOFF_MAX = 30.0

# --- the decision ------------------------------------------------------------------------


def initial_state(config: Config, saved: GuardState | None = None) -> GuardState:
    """The state for `config`: saved durable state is kept for migrations still configured."""
    saved = saved or GuardState()
    migrations = {
        m.account: _fit_units(saved.migrations.get(m.account), m) for m in config.migrations
    }
    # a reload may raise resume_above: time above the old one does not count for the new
    volumes = {
        name: replace(saved.volumes.get(name, VolumeState()), recovered_since=None)
        for name in config.volumes
    }
    return replace(saved, migrations=migrations, volumes=volumes)


def _fit_units(saved: MigrationState | None, migration: MigrationConfig) -> MigrationState:
    state = saved or MigrationState(account=migration.account)
    units = {unit: state.units.get(unit, UnitView()) for unit in migration.units}
    pending = {key: kind for key, kind in state.pending.items() if key in units or key == "verify"}
    return replace(
        state, units=units, paused_units=state.paused_units & set(units), pending=pending
    )


def decide(
    config: Config, state: GuardState, event: Event, now: float
) -> tuple[GuardState, list[Action]]:
    """The event, then the reconciliation of what it concerns: one migration for what
    happens to one (a unit change, an action's result, a log batch, an operator's request),
    every migration on a volume whose low/up state changed, every migration on a full
    Tick, a bus change or a clock step; and, with any event, the migrations whose own
    timer came due (a backoff, a retry, a hold's timer; a stall on a light Tick). So a
    burst of replies for 200 migrations costs 200 small steps, not 200 x 200. The daemon
    ticks every second, fully every 10th time."""
    decision = _Decision(config, state, now)
    decision.apply(event)
    decision.reconcile()
    return decision.result()


class _Index:
    """Lookups over one Config (built once per Config object, kept for the last one)."""

    def __init__(self, config: Config) -> None:
        self.by_account = {m.account: m for m in config.migrations}
        self.order = {m.account: i for i, m in enumerate(config.migrations)}
        self.by_unit: dict[str, MigrationConfig] = {}
        self.by_volume: dict[str, set[str]] = {}
        for migration in config.migrations:
            for unit in migration.units:
                self.by_unit.setdefault(unit, migration)
            self.by_volume.setdefault(migration.volume, set()).add(migration.account)
        self.stall_watched = [m.account for m in config.migrations if m.stall_after > 0]
        self.min_max_freeze = min(
            [v.max_freeze for v in config.volumes.values()]
            + [m.max_freeze for m in config.migrations if m.max_freeze],
            default=float("inf"),
        )


_NOT_LOW = VolumeState()
_INDEX: list[tuple[Config, _Index]] = []  # a memo of the last Config's index (pure)


def _index(config: Config) -> _Index:
    if _INDEX and _INDEX[0][0] is config:
        return _INDEX[0][1]
    index = _Index(config)
    _INDEX[:] = [(config, index)]
    return index


def reload_problem(old: Config, new: Config, state: GuardState) -> str:
    """Why `new` cannot replace `old` on a reload ("" when it can)."""
    for account, migration in state.migrations.items():
        if new.migration(account) is None and (migration.paused_units or migration.hold):
            # dropping it would leave it paused with nobody to resume it or say so
            return (
                f"migration {account!r} is removed but still paused; resume it first "
                f"(spaceguardctl resume {account} --force), then reload"
            )
    for account, migration in state.migrations.items():
        configured = new.migration(account)
        if configured is None:
            continue
        busy = migration.paused_units | (set(migration.pending) - {"verify"})
        dropped = sorted(busy - set(configured.units))
        if dropped:
            # it would stay frozen or stopped, or its action land, with nobody to see it
            return (
                f"migration {account!r}: {', '.join(dropped)} is paused or has an action in "
                "flight and the new config no longer names it; resume it first "
                f"(spaceguardctl resume {account} --force), then reload"
            )
        before = old.migration(account)
        if (
            before is not None
            and before.pause != configured.pause
            and (migration.paused_units or migration.hold is not None)
        ):
            return (
                f"migration {account!r}: pause cannot change from {before.pause} to "
                f"{configured.pause} while it is paused; resume it first, then reload"
            )
    for key in ("state_dir", "control_socket", "metrics_listen", "bus_address", "freezer_socket"):
        if getattr(old.guard, key) != getattr(new.guard, key):
            return f"guard.{key}: cannot change on reload (restart the guard to apply it)"
    return ""


_NO_MIGRATION = MigrationConfig(account="", unit="x.service", volume="")
SPACE_REASONS = frozenset({"space", "inodes", "predicted", "unavailable", "disk_full"})
# "sizing": held until its size probe (size_unit) says what the run needs
ADMISSION_REASONS = frozenset({"admission", "no-new-starts", "sizing"})


def run_started_at(state: MigrationState) -> float:
    """When the migration's latest run began, as systemd says (0: not known)."""
    return max([state.run_started_at, *(view.started_at for view in state.units.values())])


def is_current_line(state: MigrationState, logged_at: float | None, backlog: bool) -> bool:
    """Only the current run acts: a log line written before it began (rclone appends to
    its --log-file across runs) is read for position and progress, never acted on.

    A line with a time is judged by it against the run's start, to the second (rclone
    prints whole seconds, so a line of the run's first second reads as earlier than the
    start); a line without one (wrapper output, --log-systemd) by where it was read: the
    file's content at the guard's first read is its past."""
    started = run_started_at(state)
    if logged_at is None or not started:
        return not backlog
    return logged_at >= math.floor(started)


def pause_mode(migration: MigrationConfig, state: MigrationState) -> str:
    """How this migration is paused now: its configured mode, except that a unit systemd
    cannot freeze while it runs (Type=oneshot: its start job is pending until the script
    ends; or a freeze systemd refused as busy), and a unit with its own WatchdogSec=
    (systemd 252 lets that watchdog kill it while frozen: systemd#38517), is stopped and
    resumed by resume_unit."""
    if migration.pause == "stop":
        return "stop"
    if (
        state.freeze_refused
        or state.freeze_expired
        or any(
            view.service_type == "oneshot" or view.watchdog_usec > 0
            for view in state.units.values()
        )
    ):
        return "stop"
    return "freeze"


def diagnostics(config: Config, state: GuardState) -> list[str]:
    """What an operator should know about how the guard can act on each migration."""
    notes = []
    for migration in config.migrations:
        migration_state = state.migrations.get(migration.account)
        if migration_state is None or migration.pause != "freeze":
            continue
        for unit, view in sorted(migration_state.units.items()):
            if view.service_type == "oneshot":
                notes.append(
                    f"{migration.account}: {unit} is Type=oneshot: systemd cannot freeze it "
                    f"while it runs; it is paused by stopping it and resumed by starting "
                    f"{migration.resume_unit} (make it Type=exec to freeze it instead)"
                )
            elif view.watchdog_usec > 0:
                notes.append(
                    f"{migration.account}: {unit} has WatchdogSec="
                    f"{view.watchdog_usec / 1_000_000:g}s: systemd 252 lets that watchdog "
                    "kill it while it is frozen (systemd#38517), so it is paused by "
                    f"stopping it and resumed by starting {migration.resume_unit} (drop "
                    "WatchdogSec= from the unit to freeze it instead)"
                )
            elif unit in migration_state.freeze_refused:
                notes.append(
                    f"{migration.account}: systemd refused to freeze {unit} (a job was "
                    "pending); this pause stops it instead"
                )
    return notes


def unit_owner(config: Config, unit: str) -> MigrationConfig | None:
    return _index(config).by_unit.get(unit)


def retry_delay(migration: MigrationConfig, retries: int) -> float:
    """Exponential backoff with deterministic jitter (±25 %), so the policy stays pure."""
    base = min(migration.retry_backoff * (2.0 ** min(retries, 30)), migration.retry_backoff_max)
    digest = hashlib.sha256(f"{migration.account}/{retries}".encode()).digest()
    jitter = 0.75 + 0.5 * (digest[0] / 255.0)
    return base * jitter


class _Decision:
    def __init__(self, config: Config, state: GuardState, now: float) -> None:
        self.config = config
        self.state = state
        self.now = now
        self.volumes = dict(state.volumes)
        self.migrations = dict(state.migrations)
        self.bus_connected = state.bus_connected
        self.incident_seq = state.incident_seq
        self.actions: list[Action] = []
        # the accounts this decision must reconcile (None: all of them)
        self.touched: set[str] | None = set()
        self.light_tick = False
        self.due_scope: set[str] | None = None  # whose timers to look at (None: all)

    def result(self) -> tuple[GuardState, list[Action]]:
        # what did not change is the old mapping itself: callers may compare by identity
        same_migrations = self.migrations == self.state.migrations
        new = GuardState(
            volumes=self.volumes,
            migrations=self.state.migrations if same_migrations else self.migrations,
            bus_connected=self.bus_connected,
            incident_seq=self.incident_seq,
        )
        if (
            same_migrations
            and new.volumes == self.state.volumes
            and new.bus_connected == self.state.bus_connected
            and new.incident_seq == self.state.incident_seq
        ):
            new = self.state  # unchanged: callers may compare by identity
        return new, self.actions

    def log(
        self, level: Literal["debug", "info", "notice", "warning", "error"], message: str
    ) -> None:
        self.actions.append(Log(level, message))

    # -- events ---------------------------------------------------------------------------

    def touch(self, account: str) -> None:
        if self.touched is not None:
            self.touched.add(account)

    def _touch_changed_volumes(self, before: Mapping[str, VolumeState]) -> None:
        """Every migration on a volume that turned low or recovered, vanished or came back."""
        for name, volume in self.volumes.items():
            old = before.get(name, _NOT_LOW)
            if volume is old:
                continue
            if (volume.low, volume.low_reason, volume.up) != (old.low, old.low_reason, old.up):
                for account in _index(self.config).by_volume.get(name, ()):
                    self.touch(account)

    def apply(self, event: Event) -> None:
        before = dict(self.volumes)
        match event:
            case UnitChanged(unit=unit):
                owner = unit_owner(self.config, unit)
                if owner is not None:
                    self.touch(owner.account)
            case ActionDone(action=SliceFreeze(actions=members)):
                for member in members:
                    self.touch(member.account)
            case ActionDone(action=UnitAction() | RunVerify() as action):
                self.touch(action.account)
            case (
                LogParsed(account=account)
                | OperatorRequest(account=account)
                | SizeMeasured(account=account)
            ):
                self.touch(account)
            case VolumeSampled(volume=name) | VolumeUnavailable(volume=name):
                # only what changes the volume's low/up state (below), and the timers of
                # the migrations on it
                self.due_scope = _index(self.config).by_volume.get(name, set())
            case Tick(full=False):
                self.light_tick = True  # what a timer made due, stalls included
            case _:  # a full Tick, BusChanged, ClockStepped: everything
                self.touched = None
        self._apply(event)
        self._touch_changed_volumes(before)

    def _apply(self, event: Event) -> None:
        match event:
            case VolumeSampled():
                self._volume_sampled(event)
            case VolumeUnavailable():
                self._volume_unavailable(event)
            case UnitChanged():
                self._unit_changed(event)
            case BusChanged(connected=connected):
                if connected != self.bus_connected:
                    self.log(
                        "notice" if connected else "error",
                        "D-Bus connection "
                        + ("restored" if connected else "lost: actions wait until it is back"),
                    )
                self.bus_connected = connected
            case LogParsed():
                self._log_parsed(event)
            case OperatorRequest():
                self._operator(event)
            case ActionDone():
                self._action_done(event)
            case ClockStepped(delta=delta):
                self._clock_stepped(delta)
            case SizeMeasured():
                self._size_measured(event)
            case Tick():
                pass

    def _clock_stepped(self, delta: float) -> None:
        """Move every instant the guard measures intervals from by the step, so that a hold-
        down, a backoff, a retry delay or a stall keeps its length. (Times that systemd or
        rclone stamped, like a unit's start, are the wall clock's own and do not move.)"""
        self.log(
            "warning",
            f"the system clock stepped by {delta:+.1f}s: the guard's timers keep their lengths",
        )

        def shift(when: float | None) -> float | None:
            return None if when is None else when + delta

        for name, volume in self.volumes.items():
            self.volumes[name] = replace(
                volume,
                sampled_at=volume.sampled_at + delta if volume.sampled_at else 0.0,
                low_since=volume.low_since + delta if volume.low_since else 0.0,
                recovered_since=shift(volume.recovered_since),
                warn_since=shift(volume.warn_since),
                batch_at=volume.batch_at + delta if volume.batch_at else 0.0,
            )
        for account, state in self.migrations.items():
            hold = state.hold
            failure = state.failure
            self.migrations[account] = replace(
                state,
                hold=replace(hold, since=hold.since + delta) if hold else None,
                failure=replace(
                    failure, since=failure.since + delta, next_retry_at=shift(failure.next_retry_at)
                )
                if failure
                else None,
                action_retry_at=state.action_retry_at + delta if state.action_retry_at else 0.0,
                running_since=shift(state.running_since),
                last_progress_at=shift(state.last_progress_at),
                item_window=tuple((at + delta, n) for at, n in state.item_window),
                sizing_since=state.sizing_since + delta if state.sizing_since else 0.0,
                sized_at=state.sized_at + delta if state.sized_at else 0.0,
            )

    def _volume_sampled(self, event: VolumeSampled) -> None:
        volume = self.config.volumes.get(event.volume)
        if volume is None:
            return
        old = self.volumes.get(event.volume, VolumeState())
        state = replace(
            old,
            up=True,
            error="",
            avail_bytes=event.avail_bytes,
            size_bytes=event.size_bytes,
            avail_files=event.avail_files,
            files=event.files,
            fill_rate=event.fill_rate,
            sampled_at=self.now,
        )
        pause_bytes, resume_bytes, pause_files, resume_files = thresholds(volume, state)
        if not state.low:
            reason = ""
            if state.avail_bytes < pause_bytes:
                reason = "space"
            elif state.files and state.avail_files < pause_files:
                reason = "inodes"
            elif (
                volume.predict > 0
                and state.avail_bytes < resume_bytes
                and seconds_to_pause(volume, state) <= volume.predict
                and not self._fits(volume.name, state)
            ):
                # Early pause only inside the hysteresis band: outside it a pause could
                # not be held (free space would already be above resume_above), so the
                # guard would flap; there the fill rate only shortens the poll interval.
                reason = "predicted"
            if reason:
                state = replace(
                    state,
                    low=True,
                    low_reason=reason,
                    low_since=self.now,
                    recovered_since=None,
                    pause_rate=max(state.fill_rate, 0.0),  # what the writers did: resuming
                    batch_at=0.0,  # them all at once would do it again
                )
                self.log(
                    "warning",
                    f"volume {volume.name} ({volume.path}) is low on "
                    f"{'inodes' if reason == 'inodes' else 'space'}: "
                    f"{format_size(state.avail_bytes)} free, {state.avail_files} inodes free, "
                    f"filling at {format_size(state.fill_rate)}/s "
                    f"(pause below {volume.pause_below}, reason {reason})",
                )
            elif (
                state.avail_bytes < resume_bytes
                or (state.files and state.avail_files < resume_files)
            ) and any(
                self._waits_for_release(account)
                for account in _index(self.config).by_volume.get(volume.name, ())
            ):
                # back in the band while staggered releases still wait: the recovery is not
                # over; the rest resumes only after a new hold-down above resume_above
                state = replace(
                    state,
                    low=True,
                    low_reason=old.low_reason or "space",
                    low_since=self.now,
                    recovered_since=None,
                )
        else:
            recovered = state.avail_bytes >= resume_bytes and (
                not state.files or state.avail_files >= resume_files
            )
            if not recovered:
                state = replace(state, recovered_since=None)
            else:
                since = state.recovered_since if state.recovered_since is not None else self.now
                state = replace(state, recovered_since=since)
        self.volumes[event.volume] = state

    def _volume_unavailable(self, event: VolumeUnavailable) -> None:
        old = self.volumes.get(event.volume, VolumeState())
        if old.up or old.error != event.error:
            self.log(
                "error",
                f"volume {event.volume}: {event.error}; migrations on it are "
                "paused until it is back (they would write to the wrong file system)",
            )
        # A vanished mount is treated as low: migrations would otherwise write into the
        # mount point on the parent file system.
        self.volumes[event.volume] = replace(
            old,
            up=False,
            error=event.error,
            recovered_since=None,
            low=True,
            low_reason=old.low_reason if old.low else "unavailable",
            low_since=old.low_since if old.low else self.now,
            batch_at=old.batch_at if old.low else 0.0,
        )

    def _unit_changed(self, event: UnitChanged) -> None:
        migration = unit_owner(self.config, event.unit)
        if migration is None:
            return  # never act on (or even track) a unit the config does not name
        state = self.migrations[migration.account]
        if event.unit in state.pending and (
            event.unit in state.unsettled or not state.units.get(event.unit, UnitView()).known
        ):
            self._settle(migration, event.unit, event.view)
            state = self.migrations[migration.account]
        old = state.units.get(event.unit, UnitView())
        new = event.view
        state = replace(state, units={**state.units, event.unit: new})
        if new.started_at > state.run_started_at:
            state = replace(state, run_started_at=new.started_at)
        if (
            new.service_type == "oneshot"
            and old.service_type != "oneshot"
            and migration.pause == "freeze"
        ):
            self.log(
                "warning",
                f"{migration.account}: {event.unit} is Type=oneshot: systemd refuses to freeze "
                "it while it runs, so the guard pauses it by stopping it and resumes it by "
                f"starting {migration.resume_unit} (Type=exec lets it be frozen: see "
                "systemd/examples/)",
            )
        pending = state.pending.get(event.unit)
        if event.unit in state.paused_units and old.known:
            state = self._external_change(migration, state, event.unit, old, new, pending)
        elif event.unit in state.paused_units and not old.known:
            state = self._reconcile_saved(migration, state, event.unit, new)
        elif (
            not old.known
            and new.frozen
            and state.hold is not None
            and state.hold.by == "guard"
            and pause_mode(migration, state) == "freeze"
        ):
            # The saved hold proves the guard meant to freeze it: it crashed between the
            # FreezeUnit call and recording that the call succeeded. Adopt it, so it is
            # thawed when the hold is released instead of staying frozen unnoticed.
            self.log(
                "notice",
                f"{migration.account}: {event.unit} is frozen and the saved "
                "state has a guard hold: adopting it as frozen by the guard",
            )
            state = replace(state, paused_units=state.paused_units | {event.unit})
        if new.running and not old.running:
            # a fresh run: log failures of an earlier run no longer classify this one
            state = replace(
                state,
                running_since=self.now,
                finished=False,
                last_log_failure=None if old.known else state.last_log_failure,
            )
            if old.known:  # a new run (after a restart, the saved run goes on)
                state = replace(
                    state,
                    run_items=ItemErrors(),
                    item_window=(),
                    total_bytes=0,
                    transferred_bytes=0,
                    admitted="",
                )
                if state.sized_at and self.now - state.sized_at >= migration.size_timeout:
                    # the probe's answer is for the run it measured (and a start soon
                    # after it: the one that resumes a run held in stop mode); a later
                    # run is measured again
                    state = replace(state, size_bytes=None, sized_at=0.0, size_error="")
            if state.hold is None and old.known:
                # running again without a hold (a start whose reply was lost, a person):
                # nothing is left to restart, and in stop mode nothing is paused any more
                state = replace(
                    state,
                    restart_on_release=False,
                    paused_units=(
                        state.paused_units
                        if pause_mode(migration, state) == "freeze"
                        else frozenset()
                    ),
                )
        ended = (
            old.known
            and old.active_state not in ("inactive", "failed")
            and new.active_state in ("inactive", "failed")
        )
        # a unit that ended on its own, or one found failed at first sight (after a restart)
        ended_alone = (
            ended
            and pending != "stop"
            and event.unit not in state.paused_units
            and state.failure is None
        )
        # ... unless that failure was handled already: a retry goes on in another unit
        # (its start in flight, or a later run than the failed one's)
        retrying = any(
            kind == "start" for unit, kind in state.pending.items() if unit != event.unit
        )
        found_failed = (
            not old.known
            and new.active_state == "failed"
            and state.failure is None
            and event.unit not in state.paused_units
            and not state.finished
            and not retrying
            and new.started_at >= state.run_started_at
        )
        # a run that started and ended while the guard could not see it (a bus outage):
        # systemd's start time says it happened
        missed_run = (
            old.known
            and new.started_at > old.started_at > 0
            and new.active_state in ("inactive", "failed")
            and not ended
            and state.failure is None
            and pending is None
        )
        if missed_run and event.unit in state.paused_units:
            state = self._taken_over(migration, state, event.unit, "started (while unseen)")
        if ended_alone or found_failed or missed_run:
            state = self._unit_ended(migration, state, event.unit, new)
        self.migrations[migration.account] = state

    def _settle(self, migration: MigrationConfig, unit: str, view: UnitView) -> None:
        """A unit read with an action of unknown outcome in flight: its reply was lost (a
        timeout, the bus gone mid-call) or died with an earlier guard process (first sight
        after a restart). systemd is the truth: judge from the unit whether the action
        landed, and go on as if that reply had come; never assume either way."""
        state = self.migrations[migration.account]
        state = replace(state, unsettled=state.unsettled - {unit})
        self.migrations[migration.account] = state
        kind = state.pending[unit]
        landed = {
            "freeze": view.frozen,
            "thaw": view.known and not view.frozen,
            "stop": view.known and not view.running,
            "start": view.active_state in ACTIVE_STATES,
        }.get(kind, False)
        if not landed:  # it never happened: the reconcile step asks again if still wanted
            self.migrations[migration.account] = replace(
                state, pending={k: v for k, v in state.pending.items() if k != unit}
            )
            return
        stopping = state.failure is not None and state.failure.phase == "stopping"
        reason = "failure" if kind == "stop" and stopping else "restored"
        self._action_done(
            ActionDone(UnitAction(cast(Any, kind), unit, migration.account, reason), True)
        )

    def _external_change(
        self,
        migration: MigrationConfig,
        state: MigrationState,
        unit: str,
        old: UnitView,
        new: UnitView,
        pending: str | None,
    ) -> MigrationState:
        """Someone else acted on a unit the guard paused."""
        if (
            pause_mode(migration, state) == "freeze"
            and old.frozen
            and not new.frozen
            and new.running
            and pending != "thaw"
        ):
            return self._taken_over(migration, state, unit, "thawed")
        if (
            pause_mode(migration, state) == "stop"
            and not old.running
            and new.running
            and pending != "start"
        ):
            if state.hold is not None and 0 < new.started_at < state.hold.since:
                # started before this hold was placed (seen late, after a bus outage):
                # not a decision against it; the hold stands and stops it again
                return state
            return self._taken_over(migration, state, unit, "started")
        if (
            old.active_state != new.active_state
            and not new.running
            and not new.frozen
            and pause_mode(migration, state) == "freeze"
        ):
            # stopped while frozen: nothing left to thaw; if the hold remains, a restart
            # of the unit is frozen again by the reconcile step
            return replace(state, paused_units=state.paused_units - {unit})
        return state

    def _reconcile_saved(
        self, migration: MigrationConfig, state: MigrationState, unit: str, new: UnitView
    ) -> MigrationState:
        """First sight of a unit the saved state says the guard paused (after a restart)."""
        if pause_mode(migration, state) == "freeze":
            if new.frozen:
                self.log(
                    "info",
                    f"{migration.account}: {unit} is still frozen by the guard "
                    "(restored from saved state)",
                )
                return state
            if new.running:
                return self._taken_over(migration, state, unit, "thawed while the guard was down")
            return replace(state, paused_units=state.paused_units - {unit})
        if new.running:
            return self._taken_over(migration, state, unit, "started while the guard was down")
        return state

    def _taken_over(
        self, migration: MigrationConfig, state: MigrationState, unit: str, how: str
    ) -> MigrationState:
        volume = self.volumes.get(migration.volume, VolumeState())
        self.log(
            "warning",
            f"{migration.account}: {unit} was {how} by someone else; taking "
            "it as an operator's decision: the guard releases its hold"
            + (" and will not pause it again until the volume recovers" if volume.low else ""),
        )
        self.actions.append(ResolveAlert(f"paused/{migration.account}"))
        # freeze: what else the guard froze is thawed; stop: the migration runs again
        # through this unit, so nothing the guard stopped is to be restarted
        paused = (
            state.paused_units - {unit} if pause_mode(migration, state) == "freeze" else frozenset()
        )
        return replace(
            state,
            hold=None,
            paused_units=paused,
            restart_on_release=False,
            override=volume.low,
            last_progress_at=self.now,  # frozen or stopped time is no stall
        )

    def _unit_ended(
        self, migration: MigrationConfig, state: MigrationState, unit: str, view: UnitView
    ) -> MigrationState:
        """A unit stopped running without the guard asking it to."""
        if view.active_state != "failed" and view.result in ("success", ""):
            if any(
                other != unit and other_view.active_state in ACTIVE_STATES
                for other, other_view in state.units.items()
            ):
                return state  # its other unit still runs the migration: not finished
            if state.run_items.total:
                return self._items_failed(migration, state, unit, f"result={view.result}")
            return self._finished(migration, state, unit)
        exit_status = (
            f"result={view.result} {view.exec_code or 'status'}={view.exec_status}"
            if view.exec_code
            else f"result={view.result}"
        )
        evidence = state.last_log_failure
        failure_class: FailureClass | None = FailureClass.TRANSIENT  # killed by a signal
        if view.exec_code == "exited":
            failure_class = classify_exit_code(view.exec_status)  # 0 and 9 are success
        items = state.run_items
        if (
            evidence is None
            and items.total
            and view.exec_code in ("exited", "")  # a killed run did not finish
            and failure_class != FailureClass.DISK_FULL
        ):
            return self._items_failed(migration, state, unit, exit_status)
        if failure_class is None and evidence is None:
            return self._finished(migration, state, unit)
        if failure_class is None:
            failure_class = FailureClass.TRANSIENT
        if evidence is not None:
            # what the run itself said beats the exit code (rclone exits 1 for some
            # network failures, and 5 after an expired token's retries)
            failure_class = evidence.failure_class
        if failure_class == FailureClass.DISK_FULL:
            volume = self.volumes.get(migration.volume, VolumeState())
            if evidence is not None and evidence.scope == SUMMARY and not volume.low:
                # rclone's summary said the run ended on the full disk its items reported
                # (the pause for it is over): resumed by starting it again, as a run that
                # died while paused is; the volume, which has the space, is not paused again
                self.log(
                    "notice",
                    f"{migration.account}: {unit} ended on the full disk it reported "
                    f"({exit_status}); {migration.volume} has recovered: starting it again",
                )
                return replace(state, restart_on_release=True, last_log_failure=None)
            return self._disk_full(
                migration,
                replace(state, restart_on_release=True),
                evidence.line if evidence else exit_status,
            )
        return self._fail(
            migration,
            state,
            failure_class,
            "unit-failed",
            f"{unit} failed ({exit_status})",
            evidence,
            exit_status,
        )

    def _finished(
        self, migration: MigrationConfig, state: MigrationState, unit: str
    ) -> MigrationState:
        self.log("info", f"{migration.account}: {unit} finished successfully")
        self.actions.append(ResolveAlert(f"failed/{migration.account}"))
        return replace(
            state, finished=True, retries=0, last_log_failure=None, restart_on_release=False
        )

    def _items_failed(
        self, migration: MigrationConfig, state: MigrationState, unit: str, exit_status: str
    ) -> MigrationState:
        """The run ended with item errors and nothing else: every other item was copied.
        Retried only when every item error was transient (a throttled item may copy next
        time; an unreadable one will not)."""
        items = state.run_items
        if items.only_transient:
            return self._fail(
                migration,
                state,
                FailureClass.TRANSIENT,
                "unit-failed",
                f"{unit} ended with {items.total} item errors, all transient ({exit_status})",
                exit_status=exit_status,
            )
        return self._fail(
            migration,
            state,
            FailureClass.UNRECOVERABLE,
            "item-errors",
            f"{unit} finished with {items.total} item errors ({exit_status})",
            exit_status=exit_status,
        )

    def _item_errors(
        self, migration: MigrationConfig, state: MigrationState, items: ItemErrors
    ) -> MigrationState:
        """Count a batch of item errors; trip the circuit breaker when they come too fast
        (a permission revoked on everything shows up as one item error per item)."""
        second = math.floor(self.now)
        window = [
            (at, n)
            for at, n in state.item_window
            if not migration.item_error_window or at > self.now - migration.item_error_window
        ]
        count = items.total
        if window and (window[-1][0] == second or not migration.item_error_window):
            window[-1] = (window[-1][0], window[-1][1] + count)  # whole run: one bucket
        else:
            window.append((second, count))
        state = replace(state, run_items=state.run_items.plus(items), item_window=tuple(window))
        recent = sum(n for _at, n in window)
        if (
            recent > migration.max_item_errors
            and state.failure is None
            and any(view.running for view in state.units.values())
        ):
            run = state.run_items
            failure_class = (
                FailureClass.TRANSIENT if run.only_transient else FailureClass.UNRECOVERABLE
            )
            within = (
                f"within {migration.item_error_window:g}s"
                if migration.item_error_window
                else "in this run"
            )
            example = run.shown[0].message if run.shown else ""
            state = self._fail(
                migration,
                state,
                failure_class,
                "item-error-rate",
                f"{recent} item errors {within} (max_item_errors {migration.max_item_errors}): "
                f"systemic, not a few bad items; e.g. {example[:200]}",
            )
        return state

    def _disk_full(
        self,
        migration: MigrationConfig,
        state: MigrationState,
        line: str,
        logged_at: float | None = None,
    ) -> MigrationState:
        """The migration itself hit ENOSPC: scenario 3's business (pause), not a failure."""
        volume = self.volumes.get(migration.volume, VolumeState())
        if not volume.low and logged_at is not None and logged_at < volume.recovered_at:
            # written before the volume last recovered (rclone logs an item's ENOSPC twice,
            # and the guard may read the second after the release): it was that episode
            self.log(
                "info",
                f"{migration.account}: an ENOSPC line from before {migration.volume} "
                "recovered: not pausing again",
            )
            return state
        if not volume.low:
            self.volumes[migration.volume] = replace(
                volume,
                low=True,
                low_reason="disk_full",
                low_since=self.now,
                recovered_since=None,
                pause_rate=max(volume.fill_rate, 0.0),
                batch_at=0.0,
            )
            self.log(
                "warning",
                f"volume {migration.volume}: {migration.account} reports a full "
                f"disk ({line.strip()[:200]}); treating the volume as low",
            )
        return replace(state, override=False)

    def _fail(
        self,
        migration: MigrationConfig,
        state: MigrationState,
        failure_class: FailureClass,
        trigger: str,
        detail: str,
        evidence: LogEvidence | None = None,
        exit_status: str = "",
    ) -> MigrationState:
        self.log(
            "error",
            f"{migration.account}: migration failed ({failure_class}, {trigger}): "
            f"{detail}; stopping {', '.join(migration.units)}",
        )
        failure = Failure(
            failure_class=failure_class,
            trigger=trigger,
            detail=detail,
            since=self.now,
            phase="stopping",
            lines=(evidence.line,) if evidence else (),
            evidence=evidence,
            exit_status=exit_status,
            steps=(f"{_stamp(self.now)} detected: {detail}",),
        )
        return replace(state, failure=failure, finished=False)

    def _log_parsed(self, event: LogParsed) -> None:
        migration = self.config.migration(event.account)
        if migration is None:
            return
        state = self.migrations[event.account]
        if event.progressed:
            state = replace(state, last_progress_at=self.now)
        if event.transferred_bytes is not None:
            state = replace(state, transferred_bytes=event.transferred_bytes)
        if event.total_bytes is not None:
            state = replace(state, total_bytes=event.total_bytes)
        if event.superseded is not None:  # the end of the attempt that ended
            state = self._item_errors(migration, state, event.superseded)
        if event.new_attempt and state.failure is None:
            # rclone tries again: the run's item errors are the new attempt's (the breaker's
            # window goes on; a failure keeps what it will report)
            state = replace(state, run_items=ItemErrors())
        if event.items is not None:
            state = self._item_errors(migration, state, event.items)
        for evidence in event.failures:
            state = replace(state, last_log_failure=evidence)
            if evidence.failure_class == FailureClass.DISK_FULL:
                # (rclone's summary at the end of a run is no new report: it says how the
                # run ended, which classifies its exit)
                if evidence.scope != SUMMARY:
                    state = self._disk_full(migration, state, evidence.line, evidence.logged_at)
            elif (
                evidence.failure_class == FailureClass.UNRECOVERABLE
                and state.failure is None
                and any(view.running for view in state.units.values())
            ):
                state = self._fail(
                    migration,
                    state,
                    FailureClass.UNRECOVERABLE,
                    "log",
                    f"log line matched rule {evidence.rule}",
                    evidence,
                )
        self.migrations[event.account] = state

    def _operator(self, event: OperatorRequest) -> None:
        migration = self.config.migration(event.account)
        if migration is None:
            self.actions.append(
                Reply(event.request_id, False, f"no migration for account {event.account!r}")
            )
            return
        state = self.migrations[event.account]
        volume = self.volumes.get(migration.volume, VolumeState())
        if event.verb == "pause":
            reason = event.reason or "paused by operator"
            state = replace(
                state, hold=Hold("operator", "operator", self.now, reason), override=False
            )
            self.log("notice", f"{event.account}: operator hold by {event.who}: {reason}")
            self.actions.append(
                Reply(event.request_id, True, f"{event.account}: paused (operator hold: {reason})")
            )
        elif event.verb == "resume":
            if state.hold is None and not state.paused_units:
                self.actions.append(Reply(event.request_id, False, f"{event.account}: not paused"))
                return
            if volume.low and not event.force:
                self.actions.append(
                    Reply(
                        event.request_id,
                        False,
                        f"{event.account}: volume {migration.volume} is still low "
                        f"({format_size(volume.avail_bytes)} free, reason {volume.low_reason}); "
                        "resuming now may fill it: use --force to resume anyway",
                    )
                )
                return
            restart = state.restart_on_release or (
                state.hold is not None and pause_mode(migration, state) == "stop"
            )
            state = replace(
                state,
                hold=None,
                override=volume.low,
                restart_on_release=restart,
                freeze_expired=False,
                admitted="forced",  # an operator's resume overrides admission for this run
            )
            self.log(
                "notice",
                f"{event.account}: resumed by {event.who}"
                + (" despite low space (override until the volume recovers)" if volume.low else ""),
            )
            # the guard's "paused" alert (if any) must not keep firing for a running migration
            self.actions.append(ResolveAlert(f"paused/{event.account}"))
            self.actions.append(Reply(event.request_id, True, f"{event.account}: resuming"))
        else:
            if state.hold is not None:
                self.actions.append(
                    Reply(event.request_id, False, f"{event.account}: paused; resume it first")
                )
                return
            if any(view.running for view in state.units.values()) and state.failure is None:
                self.actions.append(
                    Reply(event.request_id, False, f"{event.account}: already running")
                )
                return
            state = replace(
                state,
                failure=None,
                retries=0,
                last_log_failure=None,
                restart_on_release=True,
                finished=False,
            )
            self.log("notice", f"{event.account}: retry requested by {event.who}")
            self.actions.append(ResolveAlert(f"failed/{event.account}"))
            self.actions.append(Reply(event.request_id, True, f"{event.account}: retrying"))
        self.migrations[event.account] = state

    def _action_done(self, event: ActionDone, quiet: bool = False) -> None:
        action = event.action
        if isinstance(action, SliceFreeze):
            self._slice_done(action, event)
            return
        state = self.migrations.get(action.account)
        if state is None:
            return
        if isinstance(action, RunVerify):
            pending = {k: v for k, v in state.pending.items() if k != "verify"}
            result = "passed" if event.ok else f"failed: {event.error}"
            self.log(
                "info" if event.ok else "warning", f"{action.account}: source verification {result}"
            )
            failure = state.failure
            if failure is not None and failure.phase == "verifying":
                failure = replace(
                    failure,
                    phase="documenting",
                    verify_result=result,
                    steps=(*failure.steps, f"{_stamp(self.now)} verify: {result}"),
                )
            self.migrations[action.account] = replace(state, pending=pending, failure=failure)
            return
        configured = self.config.migration(action.account)
        if configured is None or action.unit not in configured.units:
            self.log(
                "notice",
                f"{action.account}: {action.kind} {action.unit} ended "
                f"({'ok' if event.ok else event.error}) after the unit left the config",
            )
            self.migrations[action.account] = replace(
                state, pending={k: v for k, v in state.pending.items() if k != action.unit}
            )
            return
        if not event.ok and event.unknown:
            # it may have landed: keep it pending, read the unit, and let what systemd
            # says settle it (a freeze that landed must be thawed; a thaw that lands late
            # is ours, not someone else's)
            self.log(
                "warning",
                f"{action.account}: {action.kind} {action.unit}: no answer ({event.error}); "
                "reading the unit to see whether it took effect",
            )
            self.actions.append(ReadUnit(action.unit))
            self.migrations[action.account] = replace(
                state, unsettled=state.unsettled | {action.unit}
            )
            return
        pending = {k: v for k, v in state.pending.items() if k != action.unit}
        state = replace(state, pending=pending)
        failure = state.failure
        if failure is not None:
            failure = replace(
                failure,
                steps=(
                    *failure.steps,
                    f"{_stamp(self.now)} {action.kind} "
                    f"{action.unit}: {'ok' if event.ok else 'error: ' + event.error}",
                ),
            )
            state = replace(state, failure=failure)
        if event.ok:
            if not quiet:
                self.log(
                    "notice",
                    f"{action.account}: {action.kind} {action.unit} done ({action.reason})",
                )
            errors_left = {u: n for u, n in state.action_errors.items() if u != action.unit}
            state = replace(
                state,
                action_errors=errors_left,
                action_retry_at=state.action_retry_at if errors_left else 0.0,
            )
            view = state.units.get(action.unit, UnitView())
            if action.kind == "freeze" and view.known and not view.running:
                pass  # it ended while the freeze went out: nothing is frozen, nothing to thaw
            elif action.kind == "freeze":
                state = replace(
                    state,
                    paused_units=state.paused_units | {action.unit},
                    units={**state.units, action.unit: replace(view, freezer_state="frozen")},
                )
            elif action.kind == "stop":
                if view.active_state in ACTIVE_STATES:  # the job is done: the unit is down
                    state = replace(
                        state,
                        units={
                            **state.units,
                            action.unit: replace(
                                view,
                                active_state="inactive",
                                sub_state="dead",
                                freezer_state="running",
                            ),
                        },
                    )
                taken_over = state.hold is None and any(
                    other != action.unit and other_view.active_state in ACTIVE_STATES
                    for other, other_view in state.units.items()
                )
                if action.reason != "failure" and state.failure is None and not taken_over:
                    # a pause (space, operator), even if the hold ended while the job ran:
                    # the guard stopped it, so the guard starts it again (unless someone
                    # already runs the migration through its other unit)
                    state = replace(
                        state,
                        paused_units=state.paused_units | {action.unit},
                        restart_on_release=True,
                    )
                else:  # stopped in a failure: nothing to thaw; a retry starts it again
                    state = replace(state, paused_units=state.paused_units - {action.unit})
            elif action.kind == "thaw":
                state = replace(
                    state,
                    paused_units=state.paused_units - {action.unit},
                    last_progress_at=self.now,
                    units={**state.units, action.unit: replace(view, freezer_state="running")},
                )
            elif action.kind == "start":
                state = replace(
                    state,
                    paused_units=frozenset(),
                    restart_on_release=False,
                    last_progress_at=self.now,
                    running_since=self.now,
                )
        else:
            migration = self.config.migration(action.account)
            if action.kind == "thaw" and (
                "UnitInactive" in event.error or "not active" in event.error
            ):
                # it ended while frozen: nothing is left to thaw (asking again would fail for
                # ever); if a hold wants it back, the release starts it again
                self.log(
                    "notice",
                    f"{action.account}: {action.unit} is no longer active: nothing to thaw",
                )
                self.migrations[action.account] = replace(
                    state,
                    paused_units=state.paused_units - {action.unit},
                    units={
                        **state.units,
                        action.unit: replace(
                            state.units.get(action.unit, UnitView()), freezer_state="running"
                        ),
                    },
                )
                return
            busy = "UnitBusy" in event.error or "pending job" in event.error
            if action.kind == "freeze" and busy and migration is not None:
                # systemd will not freeze a unit with a job pending (a oneshot runs inside
                # its start job): pause it the way that works instead of asking again
                self.log(
                    "warning",
                    f"{action.account}: systemd refuses to freeze {action.unit} while it has "
                    "a job pending; pausing it by stopping it instead (resumed by starting "
                    f"{migration.resume_unit})",
                )
                state = replace(state, freeze_refused=state.freeze_refused | {action.unit})
                self.migrations[action.account] = state
                return
            errors = state.action_errors.get(action.unit, 0) + 1
            delay = min(0.25 * 2 ** min(errors, 10), UNIT_ACTION_BACKOFF_MAX)
            self.log(
                "error",
                f"{action.account}: {action.kind} {action.unit} failed: "
                f"{event.error}; trying again in {delay:.1f}s",
            )
            state = replace(
                state,
                action_errors={**state.action_errors, action.unit: errors},
                action_retry_at=self.now + delay,
            )
        self.migrations[action.account] = state

    # -- reconciliation ---------------------------------------------------------------------

    def reconcile(self) -> None:
        before = dict(self.volumes)
        for name, volume_config in self.config.volumes.items():
            volume = self.volumes.get(name, VolumeState())
            if (
                volume.low
                and volume.recovered_since is not None
                and self.now - volume.recovered_since >= volume_config.resume_after
            ):
                self.volumes[name] = replace(
                    volume,
                    low=False,
                    low_reason="",
                    recovered_since=None,
                    recovered_at=self.now,
                    slice_refused=False,
                )
                self.log(
                    "notice",
                    f"volume {name} recovered: {format_size(volume.avail_bytes)} "
                    f"free for {volume_config.resume_after:g}s",
                )
        self._touch_changed_volumes(before)
        for name, volume_config in self.config.volumes.items():
            self._warn(name, volume_config)
        touched = self.touched
        if touched is not None:  # and what a timer has made due by now
            scope = self.migrations if self.due_scope is None else self.due_scope
            touched |= {account for account in scope if self._due(self.migrations[account])}
            if self.light_tick:
                touched |= self._stalled()
        index = _index(self.config)
        chosen = (
            self.config.migrations
            if touched is None
            else [
                index.by_account[account]
                for account in sorted(touched & index.order.keys(), key=index.order.__getitem__)
            ]
        )
        for migration in chosen:  # (in the config's order)
            state = self.migrations[migration.account]
            state = self._holds(migration, state)
            state = self._admission(migration, state)
            state = self._freeze_expiry(migration, state)
            state = self._running_again(migration, state)
            state = self._unexplained(migration, state)
            state = self._stall(migration, state)
            state = self._failure_steps(migration, state)
            state = self._drive_units(migration, state)
            state = self._announce_pause(migration, state)
            self.migrations[migration.account] = state
        self._slice_freezes()

    def _slice_freezes(self) -> None:
        """One FreezeUnit of a volume's slice (volumes.X.slice) instead of one per unit,
        when this decision freezes at least two units of the volume and every other unit
        of it that runs is frozen already: a slice freezes everything in it. (systemd
        answers 200 freezes of one slice in about 10 ms, 200 FreezeUnit calls in 50-90.)"""
        freezes = [a for a in self.actions if isinstance(a, UnitAction) and a.kind == "freeze"]
        if len(freezes) < 2:
            return
        index = _index(self.config)
        for name, config in self.config.volumes.items():
            if not config.slice or self.volumes.get(name, VolumeState()).slice_refused:
                continue
            batch = {a.unit: a for a in freezes if index.by_account[a.account].volume == name}
            if len(batch) < 2 or any(
                view.running and not view.frozen and unit not in batch
                for account in index.by_volume.get(name, ())
                for unit, view in self.migrations[account].units.items()
            ):
                continue
            self.actions = [
                a for a in self.actions if not (isinstance(a, UnitAction) and a in batch.values())
            ]
            self.actions.append(SliceFreeze(config.slice, name, tuple(batch.values())))

    def _slice_done(self, action: SliceFreeze, event: ActionDone) -> None:
        """The reply to a slice's freeze: done means each member is frozen; a refusal
        before it was sent means none is; anything else may have frozen some."""
        if event.ok:
            self.log(
                "notice",
                f"volume {action.volume}: {len(action.actions)} migrations frozen with one "
                f"FreezeUnit of {action.slice}",
            )
            for member in action.actions:
                self._action_done(ActionDone(member, True), quiet=True)
            return
        volume = self.volumes.get(action.volume, VolumeState())
        self.volumes[action.volume] = replace(volume, slice_refused=True)
        self.log(
            "warning",
            f"volume {action.volume}: freezing {action.slice} failed ({event.error}); "
            "its migrations are frozen one by one until it recovers"
            + ("; reading each to see what was frozen" if event.unknown else ""),
        )
        for member in action.actions:
            state = self.migrations[member.account]
            if event.unknown:  # settled by the next reading of each (_settle)
                self.actions.append(ReadUnit(member.unit))
                state = replace(state, unsettled=state.unsettled | {member.unit})
            else:
                state = replace(
                    state, pending={k: v for k, v in state.pending.items() if k != member.unit}
                )
            self.migrations[member.account] = state

    def _stalled(self) -> set[str]:
        """The migrations whose stall_after has passed since their last progress."""
        stalled = set()
        for account in _index(self.config).stall_watched:
            state = self.migrations[account]
            since = max(state.last_progress_at or 0.0, state.running_since or 0.0)
            migration = _index(self.config).by_account[account]
            if since and self.now - since >= migration.stall_after:
                stalled.add(account)
        return stalled

    def _due(self, state: MigrationState) -> bool:
        """A backoff after a failed action, or a retry of a failure, has come due (or a
        guard hold's own timer: _hold_due). Asked of every migration on every event: the
        cheap answers first (a guard hold on a low volume, younger than any max_freeze, is
        not due: 200 held migrations cost 1 ms per event without that)."""
        if 0 < state.action_retry_at <= self.now:
            return True
        failure = state.failure
        if (
            failure is not None
            and failure.phase == "waiting-retry"
            and failure.next_retry_at is not None
            and failure.next_retry_at <= self.now
        ):
            return True
        hold = state.hold
        if hold is None or hold.by != "guard":
            return False
        index = _index(self.config)
        migration = index.by_account.get(state.account)
        if migration is None:
            return False
        if (
            hold.reason in SPACE_REASONS
            and self.now - hold.since < index.min_max_freeze
            and self.volumes.get(migration.volume, _NOT_LOW).low
        ):
            return False
        return self._hold_due(migration, state, hold)

    def _hold_due(self, migration: MigrationConfig, state: MigrationState, hold: Hold) -> bool:
        """An admission that may now fit, a release slot after a recovery, or the end of a
        freeze's max_freeze: worth a look on any event."""
        if hold.reason in ADMISSION_REASONS:
            return True
        if hold.reason not in SPACE_REASONS:
            return False
        volume = self.volumes.get(migration.volume, VolumeState())
        if not volume.low:
            return True
        limit = migration.max_freeze or self.config.volumes[migration.volume].max_freeze
        return not state.freeze_expired and self.now - hold.since >= limit

    def _holds(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        volume = self.volumes.get(migration.volume, VolumeState())
        unknown = state.hold is not None and state.hold.by == "unknown"
        if volume.low and (state.hold is None or unknown) and not state.override:
            # (a pause nobody explained is taken over: most likely the guard's own, from
            # before a crash that lost the record; it is thawed at recovery)
            reason = volume.low_reason or "space"
            self.log(
                "warning",
                f"{migration.account}: pausing ({pause_mode(migration, state)}) because "
                f"volume {migration.volume} is low ({reason})",
            )
            adopted = {
                unit
                for unit, view in state.units.items()
                if view.frozen
                and unit not in state.paused_units
                and state.pending.get(unit) != "thaw"
            }
            if adopted and pause_mode(migration, state) == "freeze":
                # Frozen already, with no record of who did it: most likely the guard, just
                # before a crash that lost the record. Under the new hold it is the guard's
                # to thaw at recovery (an operator's freeze belongs in spaceguardctl pause).
                self.log(
                    "notice",
                    f"{migration.account}: {', '.join(sorted(adopted))} "
                    "already frozen: held by the guard from now on",
                )
                state = replace(state, paused_units=state.paused_units | adopted)
            return replace(state, hold=Hold("guard", reason, self.now))
        if not volume.low:
            if state.override:
                state = replace(state, override=False)
            if (
                state.last_log_failure is not None
                and state.last_log_failure.failure_class == FailureClass.DISK_FULL
                and state.last_log_failure.scope != SUMMARY
            ):
                # space is back: an old ENOSPC line must not classify a later exit (that
                # would mark a volume with plenty of space low and pause every migration);
                # rclone's summary at the end of the run does: the exit follows it
                state = replace(state, last_log_failure=None)
            if (
                state.hold is not None
                and state.hold.by == "guard"
                and state.hold.reason in SPACE_REASONS
                and self._release_slot(migration, state)
            ):
                self.log(
                    "notice",
                    f"{migration.account}: releasing the guard's hold "
                    f"({state.hold.reason}), volume {migration.volume} has "
                    f"{format_size(volume.avail_bytes)} free",
                )
                self.actions.append(ResolveAlert(f"paused/{migration.account}"))
                state = replace(
                    state,
                    hold=None,
                    last_progress_at=self.now,
                    freeze_refused=frozenset(),
                    freeze_expired=False,
                )
        return state

    def _fits(self, name: str, volume: VolumeState, more: int = 0) -> bool:
        """Whether what every running migration of the volume still writes (and `more`) is
        known and fits above pause_below: then the fill rate is no reason to pause early,
        nor to hold a resume back (they finish before the pause limit)."""
        config = self.config.volumes[name]
        committed = more
        for migration in _index(self.config).by_volume.get(name, ()):
            state = self.migrations[migration]
            if state.hold is not None or not any(v.running for v in state.units.values()):
                continue
            need = remaining_bytes(self.config.migration(migration) or _NO_MIGRATION, state)
            if need is None:
                return False
            committed += need
        return volume.avail_bytes - committed >= config.pause_below.limit(volume.size_bytes)

    def _release_slot(self, migration: MigrationConfig, state: MigrationState) -> bool:
        """Resume without a stampede: after a recovery the guard's holds on a volume are
        released in batches, highest priority first, a batch every resume_step. A batch
        is resume_batch migrations, or (resume_batch = 0, the default) as many as can write
        for a step at the rate they filled the volume before the pause without taking it
        back below resume_above (all at once when they were not filling it fast); no new
        batch while the current fill rate would. A hold on a migration with nothing
        paused costs nothing: released at once. None is released while the latest sample
        is below resume_above (a release deferred past the recovery must not come after
        free space dropped back into the band)."""
        config = self.config.volumes[migration.volume]
        volume = self.volumes.get(migration.volume, VolumeState())
        _, resume_bytes, _, resume_files = thresholds(config, volume)
        if (
            not volume.up
            or volume.avail_bytes < resume_bytes
            or (volume.files and volume.avail_files < resume_files)
        ):
            return False
        if not state.paused_units and not state.restart_on_release:
            return True
        need = remaining_bytes(migration, state)
        if need is not None and self._fits(migration.volume, volume, need):
            return True  # it finishes above pause_below with the others: no stampede risk
        waiting = sorted(
            (-other.priority, other.account)
            for other in self.config.migrations
            if other.volume == migration.volume and self._waits_for_release(other.account)
        )
        if self.now >= volume.batch_at + config.resume_step:
            # the rate the volume can take: for a step it stays above resume_above, and
            # (with predict on) it would take longer than predict to reach pause_below
            pause_bytes = config.pause_below.limit(volume.size_bytes)
            budget = min(
                (volume.avail_bytes - resume_bytes) / config.resume_step,
                (volume.avail_bytes - pause_bytes) / config.predict
                if config.predict > 0
                else float("inf"),
            )
            spare = budget - max(volume.fill_rate, 0.0)
            if spare < 0:
                return False  # the migrations resumed so far fill it too fast: wait
            first = volume.batch_at == 0.0
            writer_rate = (
                volume.pause_rate / len(waiting) if first and waiting else volume.writer_rate
            )
            size = config.resume_batch or (
                max(1, int(spare / writer_rate)) if writer_rate > 0 else len(waiting)
            )
            volume = replace(
                volume,
                batch_at=self.now,
                batch_released=0,
                batch_size=size,
                writer_rate=writer_rate,
            )
            self.volumes[migration.volume] = volume
        room = volume.batch_size - volume.batch_released
        if room <= 0 or (-migration.priority, migration.account) not in waiting[:room]:
            return False
        self.volumes[migration.volume] = replace(volume, batch_released=volume.batch_released + 1)
        return True

    def _waits_for_release(self, account: str) -> bool:
        state = self.migrations[account]
        hold = state.hold
        return (
            hold is not None
            and hold.by == "guard"
            and hold.reason in SPACE_REASONS
            and bool(state.paused_units or state.restart_on_release)
        )

    def _warn(self, name: str, config: VolumeConfig) -> None:
        """The ladder's first step: an alert only, once the volume has been below warn_below
        for warn_after; resolved when it is above it again."""
        volume = self.volumes.get(name, VolumeState())
        if config.warn_below is None or not volume.up:
            return
        below = volume.avail_bytes < config.warn_below.limit(volume.size_bytes)
        if not below:
            if volume.warned:
                self.actions.append(ResolveAlert(f"low/{name}"))
            if volume.warn_since is not None or volume.warned:
                self.volumes[name] = replace(volume, warn_since=None, warned=False)
            return
        since = volume.warn_since if volume.warn_since is not None else self.now
        warned = volume.warned
        if not warned and self.now - since >= config.warn_after:
            warned = True
            committed = committed_bytes(self.config, self._view(), name)
            self.actions.append(
                RaiseAlert(
                    key=f"low/{name}",
                    name="SpaceguardVolumeLow",
                    severity="warning",
                    labels={"volume": name},
                    summary=f"{config.path} is below {config.warn_below} free",
                    description=(
                        f"{config.path} has {format_size(volume.avail_bytes)} free (warn below "
                        f"{config.warn_below}); the running migrations still write "
                        f"{format_size(committed)}: "
                        f"{format_size(volume.avail_bytes - committed)} would be left. Nothing "
                        f"is paused yet (pause below {config.pause_below})."
                    ),
                )
            )
        if (since, warned) != (volume.warn_since, volume.warned):
            self.volumes[name] = replace(volume, warn_since=since, warned=warned)

    def _view(self) -> GuardState:
        return GuardState(volumes=self.volumes, migrations=self.migrations)

    def _admission(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        """Never start what cannot fit: a migration whose run still needs more than the
        volume has free above pause_below, after what the admitted running ones still
        need, is held before it writes (when a unit of it starts, or once its totals are
        known); below admit_below nothing new starts. Released when it fits."""
        held = state.hold is not None and state.hold.reason in ADMISSION_REASONS
        if not migration.admission or state.admitted in ("yes", "forced"):
            return state
        if state.hold is not None and not held:
            return state  # paused for something else; judged when that ends
        if not held and not any(view.running for view in state.units.values()):
            return state
        volume = self.volumes.get(migration.volume, VolumeState())
        if not volume.up:
            return state
        config = self.config.volumes[migration.volume]
        need = remaining_bytes(migration, state)
        if need is None and state.admitted == "provisional":
            return state
        others = committed_bytes(self.config, self._view(), migration.volume, migration.account)
        room = volume.avail_bytes - config.pause_below.limit(volume.size_bytes) - others
        closed = (
            state.admitted == ""
            and config.admit_below is not None
            and volume.avail_bytes < config.admit_below.limit(volume.size_bytes)
        )
        if closed:
            reason = "no-new-starts"
            note = (
                f"{config.path} has {format_size(volume.avail_bytes)} free, below admit_below "
                f"{config.admit_below}: no new migration starts writing"
            )
        elif need is None and migration.size_unit and not state.sized_at:
            return self._sizing(migration, state, held)
        elif need is not None and need > room:
            reason = "admission"
            note = (
                f"{migration.account} needs {format_size(need)} more; "
                f"{format_size(max(0, room))} free after the others "
                f"({format_size(volume.avail_bytes)} free, pause below {config.pause_below}, "
                f"the running migrations still need {format_size(others)})"
            )
        else:
            if held and need is None and state.size_error:
                self.log(
                    "notice",
                    f"{migration.account}: its size is not known ({state.size_error}): "
                    "releasing its hold; admitted provisionally until rclone gives its totals",
                )
            elif held:
                self.log("notice", f"{migration.account}: it fits now: releasing its hold")
            if held:
                self.actions.append(ResolveAlert(f"paused/{migration.account}"))
                state = replace(state, hold=None, freeze_refused=frozenset(), freeze_expired=False)
            return replace(state, admitted="yes" if need is not None else "provisional")
        if held and state.hold is not None and state.hold.reason != "sizing":
            return state
        when = (
            f"held after writing {format_size(state.transferred_bytes)} (its totals came now)"
            if state.transferred_bytes
            else "held before it writes"
        )
        self.log("warning", f"{migration.account}: {when}: {note}")
        self.actions.append(
            _paused_alert(
                migration,
                "SpaceguardMigrationNotAdmitted",
                reason,
                "guard",
                f"Migration {migration.account} held: it would not fit",
                f"{note}. It starts by itself once it fits "
                f"(spaceguardctl resume {migration.account} --force starts it anyway).",
            )
        )
        # frozen since the sizing hold, if it was one: max_freeze counts from there
        since = state.hold.since if held and state.hold is not None else self.now
        return replace(state, hold=Hold("guard", reason, since, note, alerted=True))

    def _sizing(
        self, migration: MigrationConfig, state: MigrationState, held: bool
    ) -> MigrationState:
        """Its run's size is unknown and a size probe is configured: held before it writes
        (frozen, as by admission) while size_unit measures it, one probe in flight per
        migration. A probe that has not answered within size_timeout is given up (admitted
        provisionally: the probe never blocks a migration for good); a late answer is
        still used."""
        if state.sizing_since and self.now - state.sizing_since >= migration.size_timeout:
            error = f"{migration.size_unit} gave no result within {migration.size_timeout:g}s"
            self.log(
                "warning",
                f"{migration.account}: size probe: {error}: admitting it provisionally "
                "(judged again once its size is known)",
            )
            state = replace(state, size_error=error, sized_at=self.now)
            if held:
                self.actions.append(ResolveAlert(f"paused/{migration.account}"))
            return replace(state, hold=None if held else state.hold, admitted="provisional")
        if state.hold is None or state.hold.reason != "sizing":
            if held:  # no new starts until now: that hold's alert is over
                self.actions.append(ResolveAlert(f"paused/{migration.account}"))
            note = (
                f"measuring what it has to copy: {migration.size_unit} writes "
                f"{migration.size_file} (size_timeout {migration.size_timeout:g}s)"
            )
            self.log("notice", f"{migration.account}: held before it writes: {note}")
            # no alert: a probe is short and bounded (a hold that outlives it has its own)
            state = replace(state, hold=Hold("guard", "sizing", self.now, note, alerted=True))
        if not state.sizing_since and self.bus_connected:
            self.actions.append(
                RunSize(
                    migration.account,
                    migration.size_unit,
                    str(migration.size_file),
                    migration.size_timeout,
                )
            )
            state = replace(state, sizing_since=self.now)
        return state

    def _size_measured(self, event: SizeMeasured) -> None:
        migration = self.config.migration(event.account)
        state = self.migrations.get(event.account)
        if migration is None or state is None:
            return
        state = replace(state, sizing_since=0.0, sized_at=self.now)
        if event.size_bytes is not None:
            self.log(
                "info",
                f"{event.account}: size probe: {format_size(event.size_bytes)} to copy "
                f"({event.size_bytes} bytes, {migration.size_unit})",
            )
            state = replace(state, size_bytes=event.size_bytes, size_error="")
        else:
            waiting = state.hold is not None and state.hold.reason == "sizing"
            self.log(
                "warning",
                f"{event.account}: size probe failed: {event.error}"
                + ("; admitting it provisionally" if waiting else ""),
            )
            state = replace(state, size_bytes=None, size_error=event.error or "failed")
        self.migrations[event.account] = state

    def _freeze_expiry(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        """The ladder's last step: a freeze older than max_freeze becomes a stop (rclone's
        sessions time out under a long freeze); resumed later through resume_unit. Any
        freeze of the guard's: an admission hold (its totals came while it ran: it has
        written, its sessions are open) can last as long as space is short, too."""
        hold = state.hold
        if (
            hold is None
            or hold.by != "guard"
            or (hold.reason not in SPACE_REASONS and hold.reason not in ADMISSION_REASONS)
            or state.freeze_expired
            or pause_mode(migration, state) != "freeze"
            or not state.paused_units
        ):
            return state
        limit = migration.max_freeze or self.config.volumes[migration.volume].max_freeze
        if self.now - hold.since < limit:
            return state
        self.log(
            "warning",
            f"{migration.account}: frozen for {self.now - hold.since:.0f}s (max_freeze "
            f"{limit:g}s): stopping it; it resumes through {migration.resume_unit}",
        )
        return replace(state, freeze_expired=True)

    def _running_again(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        """Stop mode, no hold, and the migration runs (through any of its units): nothing the
        guard stopped is left to restart, whoever started it."""
        if (
            state.hold is None
            and state.paused_units
            and pause_mode(migration, state) == "stop"
            and not state.pending
            and any(view.running for view in state.units.values())
        ):
            return replace(state, paused_units=frozenset(), restart_on_release=False)
        return state

    def _unexplained(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        """No unexplained pause: a unit systemd shows frozen, that no hold of the guard's
        record explains and no action in flight will change, is held as paused by
        "unknown" (shown, alerted; an operator's resume thaws it). Under a hold, it joins
        what that hold resumes."""
        if not self.bus_connected:
            return state
        frozen = {
            unit
            for unit, view in state.units.items()
            if view.frozen
            and view.active_state in ACTIVE_STATES
            and unit not in state.paused_units
            and unit not in state.pending
        }
        if not frozen:
            return state
        state = replace(state, paused_units=state.paused_units | frozen)
        if state.hold is not None:
            return state
        names = ", ".join(sorted(frozen))
        note = (
            f"{names} found frozen with no record of who froze it (systemctl freeze, or a "
            "guard that crashed before recording its freeze); spaceguardctl resume "
            f"{migration.account} thaws it"
        )
        self.log("warning", f"{migration.account}: {note}")
        self.actions.append(
            _paused_alert(
                migration,
                "SpaceguardMigrationPausedUnknown",
                "frozen",
                "unknown",
                f"Migration {migration.account} is frozen and nobody knows why",
                note,
            )
        )
        return replace(state, hold=Hold("unknown", "frozen", self.now, note, alerted=True))

    def _announce_pause(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        """Once per guard hold, when a running migration is actually being paused (a hold on
        a migration that is not running is no news until a unit of it starts)."""
        hold = state.hold
        if hold is None or hold.by != "guard" or hold.alerted:
            return state
        if not state.paused_units and not any(
            kind in ("freeze", "stop") for kind in state.pending.values()
        ):
            return state
        self.actions.append(self._pause_alert(migration, hold.reason))
        return replace(state, hold=replace(hold, alerted=True))

    def _pause_alert(self, migration: MigrationConfig, reason: str) -> RaiseAlert:
        volume_config = self.config.volumes[migration.volume]
        volume = self.volumes.get(migration.volume, VolumeState())
        return _paused_alert(
            migration,
            "SpaceguardMigrationPaused",
            reason,
            "guard",
            f"Migration {migration.account} paused: {migration.volume} is low",
            (
                f"spaceguard paused {migration.unit} ({migration.pause}) because "
                f"{volume_config.path} has {format_size(volume.avail_bytes)} free "
                f"(pause below {volume_config.pause_below}, reason {reason}). "
                "It resumes by itself once free space stays above "
                f"{volume_config.resume_above} for {volume_config.resume_after:g}s. "
                "Runbook scenario 3: df -h, du -sh PATH/* | sort -h, free space."
            ),
        )

    def _stall(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        if migration.stall_after <= 0 or state.failure is not None or state.hold is not None:
            return state
        if not any(view.running and not view.frozen for view in state.units.values()):
            return state
        if state.pending:
            return state
        since = max(state.last_progress_at or 0.0, state.running_since or 0.0)
        if since and self.now - since >= migration.stall_after:
            return self._fail(
                migration,
                state,
                FailureClass.TRANSIENT,
                "stall",
                f"no progress for {self.now - since:.0f}s (stall_after {migration.stall_after:g}s)",
            )
        return state

    def _failure_steps(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        failure = state.failure
        if failure is None:
            return state
        if failure.phase == "verifying" and "verify" not in state.pending:
            # its result died with an earlier guard process (restart): verify again
            failure = replace(failure, phase="stopping")
        if failure.phase == "stopping":
            if any(view.active_state in ACTIVE_STATES for view in state.units.values()):
                return state  # _drive_units stops them
            if any(not view.known for view in state.units.values()):
                return state
            failure = replace(failure, phase="verifying" if migration.verifies else "documenting")
            if migration.verifies and self.bus_connected and "verify" not in state.pending:
                self.actions.append(
                    RunVerify(
                        migration.account,
                        migration.verify_command,
                        migration.verify_timeout,
                        migration.verify_unit,
                    )
                )
                state = replace(state, pending={**state.pending, "verify": "verify"})
                what = migration.verify_unit or " ".join(migration.verify_command)
                failure = replace(
                    failure, steps=(*failure.steps, f"{_stamp(self.now)} verify: {what}")
                )
            elif migration.verifies:
                failure = replace(failure, phase="stopping")
        if failure.phase == "documenting":
            return self._document(migration, replace(state, failure=failure))
        if (
            failure.phase == "waiting-retry"
            and failure.next_retry_at is not None
            and self.now >= failure.next_retry_at
            and self.bus_connected
            and state.hold is None
        ):
            self.log(
                "notice",
                f"{migration.account}: retry {state.retries + 1} of "
                f"{migration.max_retries}: starting {migration.resume_unit}",
            )
            self.actions.append(ResolveAlert(f"failed/{migration.account}"))
            return replace(
                state,
                failure=None,
                retries=state.retries + 1,
                last_log_failure=None,
                restart_on_release=True,
                # the retry is the latest run from now: the failed unit's run is older (a
                # restart that finds it still `failed` does not take it for a new failure)
                run_started_at=max(state.run_started_at, self.now),
            )
        return replace(state, failure=failure)

    def _document(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        failure = state.failure
        assert failure is not None
        self.incident_seq += 1
        incident_id = (
            f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(self.now))}-"
            f"{migration.account}-{self.incident_seq}"
        )
        will_retry = (
            failure.failure_class == FailureClass.TRANSIENT
            and state.retries < migration.max_retries
        )
        next_retry_at = self.now + retry_delay(migration, state.retries) if will_retry else None
        if will_retry:
            assert next_retry_at is not None
            outcome = (
                f"retry {state.retries + 1} of {migration.max_retries} at {_stamp(next_retry_at)}"
            )
        elif failure.failure_class == FailureClass.TRANSIENT:
            outcome = f"gave up after {state.retries} retries: waiting for an operator"
        elif failure.trigger == "item-errors":
            outcome = (
                "finished with item errors: every other item was copied; left for an operator "
                "to look at the failed items (spaceguardctl retry runs it again)"
            )
        else:
            outcome = "unrecoverable: left stopped until an operator acts (spaceguardctl retry)"
        volume = self.volumes.get(migration.volume, VolumeState())
        steps = (
            *failure.steps,
            f"{_stamp(self.now)} incident {incident_id} written",
            f"{_stamp(self.now)} decision: {outcome}",
        )
        record: dict[str, Any] = {
            "id": incident_id,
            "account": migration.account,
            "unit": migration.unit,
            "units": list(migration.units),
            "time": self.now,
            "trigger": failure.trigger,
            "class": failure.failure_class.value,
            "detail": failure.detail,
            "matched_lines": list(failure.lines),
            "exit_status": failure.exit_status,
            "verify": failure.verify_result,
            "retries": state.retries,
            "max_retries": migration.max_retries,
            "next_retry_at": next_retry_at,
            "outcome": outcome,
            "steps": list(steps),
            "free_bytes": volume.avail_bytes,
            "free_files": volume.avail_files,
            "volume": migration.volume,
            "progress": {
                "transferred_bytes": state.transferred_bytes,
                "last_progress_at": state.last_progress_at,
            },
            "log": str(migration.log) if migration.log else "",
            "destination": str(migration.destination) if migration.destination else "",
            "items": _items_record(state.run_items),
        }
        self.actions.append(WriteIncident(record, failure.evidence))
        items_only = failure.trigger == "item-errors" and not will_retry
        severity = "warning" if will_retry or items_only else "critical"
        name = "SpaceguardMigrationItemErrors" if items_only else "SpaceguardMigrationFailed"
        self.actions.append(
            RaiseAlert(
                key=f"failed/{migration.account}",
                name=name,
                severity=severity,
                labels={
                    "account": migration.account,
                    "unit": migration.unit,
                    "class": failure.failure_class.value,
                    "incident": incident_id,
                },
                summary=f"Migration {migration.account} failed ({failure.failure_class})",
                description=f"{failure.detail}. {outcome}. Incident {incident_id}: "
                "spaceguardctl show " + incident_id + " (runbook scenario 1).",
            )
        )
        self.log(
            "error" if not will_retry else "warning",
            f"{migration.account}: incident {incident_id}: {outcome}",
        )
        failure = replace(
            failure,
            phase="waiting-retry" if will_retry else "needs-operator",
            incident_id=incident_id,
            steps=steps,
            next_retry_at=next_retry_at,
        )
        return replace(state, failure=failure)

    def _drive_units(self, migration: MigrationConfig, state: MigrationState) -> MigrationState:
        """Turn holds and failures into unit actions, one in flight per unit."""
        if not self.bus_connected or self.now < state.action_retry_at:
            return state
        wanted: list[UnitAction] = []
        stopping = state.failure is not None and state.failure.phase == "stopping"
        if stopping:
            wanted += [
                UnitAction("stop", unit, migration.account, "failure")
                for unit, view in state.units.items()
                if view.active_state in ACTIVE_STATES and view.active_state != "deactivating"
            ]
        elif state.hold is not None:
            reason = state.hold.reason
            for unit, view in state.units.items():
                if not view.running:
                    continue
                if pause_mode(migration, state) == "freeze" and not view.frozen:
                    wanted.append(UnitAction("freeze", unit, migration.account, reason))
                elif pause_mode(migration, state) == "stop":
                    wanted.append(UnitAction("stop", unit, migration.account, reason))
        else:
            # Thaw what the guard froze even during a failure (a unit someone started by
            # hand while it waits for a retry or an operator): only starts wait for it.
            for unit in sorted(state.paused_units):
                view = state.units.get(unit, UnitView())
                if pause_mode(migration, state) == "freeze" and view.frozen:
                    wanted.append(UnitAction("thaw", unit, migration.account, "released"))
            if (
                state.failure is None
                and state.restart_on_release
                and not state.pending
                and all(
                    view.known and view.active_state not in ACTIVE_STATES
                    for view in state.units.values()
                )
            ):
                wanted.append(
                    UnitAction(
                        "start",
                        migration.resume_unit,
                        migration.account,
                        "retry" if state.retries and not state.paused_units else "resume",
                    )
                )
        pending = dict(state.pending)
        for action in wanted:
            if action.unit in pending:
                continue
            pending[action.unit] = action.kind
            self.actions.append(action)

        if len(pending) != len(state.pending):
            state = replace(state, pending=pending)
        return state


def _paused_alert(
    migration: MigrationConfig, name: str, reason: str, by: str, summary: str, description: str
) -> RaiseAlert:
    """A migration's pause alert (one key per migration, whatever paused it: the guard for
    space or admission, or nobody known), so that a resume resolves whichever it is."""
    return RaiseAlert(
        key=f"paused/{migration.account}",
        name=name,
        severity="warning",
        labels={
            "account": migration.account,
            "unit": migration.unit,
            "volume": migration.volume,
            "reason": reason,
            "by": by,
        },
        summary=summary,
        description=description,
    )


def _items_record(items: ItemErrors) -> dict[str, Any]:
    """The failed items for an incident: counts by rule, and the first and latest few."""
    return {
        "total": items.total,
        "by_rule": [
            {"rule": rule, "class": cls.value, "count": count} for rule, cls, count in items.by_rule
        ],
        "failed": [
            {
                "path": item.path,
                "rule": item.rule,
                "class": item.failure_class.value,
                "message": item.message,
            }
            for item in items.shown
        ],
        "not_listed": items.total - len(items.shown),
    }


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
