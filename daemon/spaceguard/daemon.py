"""The guard: wires the adapters to the policy on one asyncio loop.

Events from the samplers, the log watcher, the D-Bus client, the control socket and the
timers go through `Guard.handle()`, which calls the pure policy and carries out the actions
it returns. Nothing here decides anything; it only connects, persists and reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import time
from pathlib import Path
from typing import Any

from . import __version__, journal
from .alerts import AlertReceiver, AlertSender, GuardAlert
from .atomicfile import BackgroundWriter
from .config import Config, ConfigError, load
from .consumers import FRESH_SECONDS, ScanFailed, UnknownVolume, UsageMonitor
from .control import ControlError, ControlServer
from .incidents import IncidentStore, partial_report
from .logwatch import LogPosition, LogWatcher
from .metrics import Counters, DeliveryStats, MetricsServer, Snapshot, make_registry
from .model import (
    ACTIVE_STATES,
    Action,
    ActionDone,
    BusChanged,
    ClockStepped,
    Event,
    Log,
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
    WriteIncident,
    migration_state,
)
from .notify import Notifier
from .policy import (
    decide,
    diagnostics,
    initial_state,
    is_current_line,
    pause_mode,
    reload_problem,
    unit_owner,
)
from .protocol import RequestError
from .quantities import format_size
from .rclone import ClassifyRule, CompiledRules, FailureClass, compile_rules
from .runtime import MigrationLog
from .sizeprobe import SizeFileError, read_size_file
from .stalefreezer import StaleFreezer
from .state import StateStore
from .storehealth import Store, StoreWatch
from .systemd import OutcomeUnknown, SliceUnusable, SystemdClient
from .volumes import VolumeSampler
from .watermarks import committed_bytes, remaining_bytes, seconds_to_pause

log = logging.getLogger("spaceguard")
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": journal.NOTICE,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
TICK_INTERVAL = 1.0
# each tick reconciles what a timer made due, every 10th all of it (200 migrations: 3 ms)
FULL_TICK_EVERY = 10
POSITION_SAVE_INTERVAL = 1.0
STATUS_INTERVAL = 1.0
DEFER_SECONDS = 0.002
INCIDENT_HOLD_SECONDS = 2.0  # an alert naming an incident waits this long for its write
ACK_ALL_SECONDS = 20.0  # `ack --account` stops after this (spaceguardctl waits 30 s)
# NTP slews the clock by at most 0.5 ms/s; a change of the offset beyond this is a step
CLOCK_STEP_TOLERANCE = 0.25
PAUSE_ALERT = "SpaceguardMigrationPaused"  # policy's pause alert: gets what fills the volume
ALERT_SENDER_TASK = "alert-sender"  # the name of the one task that runs AlertSender.run()


class Guard:
    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.config_problem = ""
        self.notifier = Notifier()
        self.store = StateStore(config.guard.state_dir)
        self.incident_store = IncidentStore(config.guard.state_dir / "incidents")
        self.counters = Counters()
        saved = self.store.load()
        self.saved_positions: dict[str, LogPosition] = {}
        if saved is not None:
            self.state = initial_state(config, saved.state)
            for account, raw in saved.log_positions.items():
                try:
                    self.saved_positions[account] = LogPosition.from_json(raw)
                except ValueError as error:  # that log is read from its start instead
                    log.error(
                        "saved log position of %s is unusable (%s): reading its log from the start",
                        account,
                        error,
                    )
        else:
            self.state = initial_state(config)
        self.ready = False
        self.stopping = asyncio.Event()
        self.replies: dict[str, asyncio.Future[tuple[bool, str]]] = {}
        self.request_seq = 0
        self.verify_seq = 0
        self._prune_incidents()
        self.open_incidents = self.incident_store.open_counts()
        self.logs: dict[str, MigrationLog] = {}
        self.logs_started = False
        # wall clock minus elapsed time: re-anchored at start (a step while the guard was
        # down cannot be told from the saved state)
        self._clock_offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        self.samplers: dict[str, VolumeSampler] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._durable_key: tuple[Any, ...] = ()
        self._positions_dirty = False
        self._deferred: list[Action] = []
        self._held_alerts: dict[str, tuple[GuardAlert, str]] = {}  # key → (alert, incident)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._status_key: tuple[Any, ...] = ()
        self._after_handle: asyncio.Handle | None = None
        self._status_migrations: object = None
        self._status_holds: tuple[Any, ...] = ()
        self._status_sent = 0.0
        self.systemd = SystemdClient(
            config.guard.bus_address,
            self._units(config),
            self._on_unit,
            self._on_connection,
            freezer_socket=config.guard.freezer_socket,
            resync_interval=config.guard.resync_interval,
        )
        self.logwatch = LogWatcher()
        self.stale_freezer = StaleFreezer()  # systemd 252's frozen records of dead units
        self.alert_spool_writer = BackgroundWriter("alert spool writer", max_pending=256)
        self.alerts = self._alert_sender(config)
        self.alerts_task: asyncio.Task[Any] | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_requested = self._reload_covered = 0
        self._reload_result: tuple[bool, str] | None = None
        self.metrics: MetricsServer | None = None
        self.control = ControlServer(
            config.guard.control_socket, config.guard.reader_group, config.guard.admin_group, self
        )
        self.consumers = UsageMonitor(config, lambda: self.state)
        self.store_watch = self._store_watch(config)

    # -- wiring ---------------------------------------------------------------------------

    def _store_watch(self, config: Config) -> StoreWatch:
        """The guard's own files: an alert, STATUS= and metrics while one cannot be written."""
        return StoreWatch(
            [
                Store(
                    "state",
                    "the state file",
                    "SpaceguardStateUnwritable",
                    "STATE NOT SAVED",
                    self.store.health,
                    str(self.store.path),
                ),
                Store(
                    "incidents",
                    "incidents",
                    "SpaceguardIncidentsUnwritable",
                    "INCIDENTS NOT WRITTEN",
                    self.incident_store.writer.health,
                    str(self.incident_store.directory),
                ),
                Store(
                    "alerts",
                    "the alert spool",
                    "SpaceguardAlertSpoolUnwritable",
                    "ALERT SPOOL NOT SAVED",
                    self.alert_spool_writer.health,
                    str(config.guard.state_dir / "alerts"),
                ),
            ]
        )

    def _prune_incidents(self) -> list[str]:
        guard = self.config.guard
        return self.incident_store.prune(
            time.time(), guard.acked_incidents_keep, guard.acked_incidents_max_age
        )

    def _check_stores(self) -> None:
        if self.store_watch.check(self.alerts) and self.ready:
            self._update_status(force=True)

    @staticmethod
    def _units(config: Config) -> set[str]:
        """Every unit the guard may act on: the migrations', their verify and size units,
        and the volumes' slices."""
        return {
            unit
            for migration in config.migrations
            for unit in (*migration.units, migration.verify_unit, migration.size_unit)
            if unit
        } | {volume.slice for volume in config.volumes.values() if volume.slice}

    def _alert_sender(self, config: Config) -> AlertSender:
        receivers = [
            AlertReceiver(
                name=r.name,
                kind=r.kind,
                url=r.url,
                bearer_token=r.bearer_token,
                basic_auth=r.basic_auth,
                timeout_s=r.timeout,
                proxy=r.proxy,
            )
            for r in config.alerts.receivers
        ]
        return AlertSender(
            receivers,
            config.guard.state_dir / "alerts",
            resend_interval_s=config.alerts.resend_interval,
            max_backoff_s=config.alerts.max_backoff,
            generator_url=config.alerts.generator_url,
            extra_labels=dict(config.alerts.labels),
            spool_writer=self.alert_spool_writer,  # one writer thread, whichever sender
        )

    def _rules(self, config: Config) -> CompiledRules:
        return compile_rules(
            [
                ClassifyRule(
                    name=r.name,
                    pattern=r.pattern,
                    failure_class=FailureClass(r.failure_class),
                    scope=r.scope,
                )
                for r in config.rules
            ]
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if self.store.problem:
            self._alert_state_problem()
        try:
            if self.config.guard.metrics_listen:
                self.metrics = MetricsServer(
                    make_registry(self.snapshot), self.config.guard.metrics_listen
                )
                await self.metrics.start()
            await self.control.start()
        except (OSError, ControlError) as error:
            # a port or socket path that cannot be taken: say which, exit 1 (systemd retries)
            log.error("cannot start: %s", error)
            if self.metrics is not None:
                await self.metrics.close()
            return 1
        self.systemd.launch()
        self._start_samplers()
        self._start_logs()
        self.alerts_task = self._spawn_named(self.alerts.run(), ALERT_SENDER_TASK)
        self._spawn(self._ticker())
        self._spawn(self._watchdog())
        self._spawn(self._become_ready())
        self._spawn(self.consumers.run())
        await self.stopping.wait()
        log.info(
            "stopping: paused migrations stay paused (state saved in %s)",
            self.config.guard.state_dir,
        )
        self.notifier.stopping()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        for sampler in self.samplers.values():
            sampler.stop()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_deferred()
        for key in list(self._held_alerts):  # alerts waiting for their incident's write
            self._release_alert(key)
        self._save(force=True)
        self.store.close()
        self.incident_store.writer.close()
        self.logwatch.close()
        await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.alert_spool_writer.close()  # after the senders: what they spooled last is written
        await self.consumers.close()
        await self.systemd.close()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed: %r", task.exception(), exc_info=task.exception())

    def _start_samplers(self) -> None:
        for name, volume in self.config.volumes.items():
            old = self.samplers.pop(name, None)
            if old is not None:
                old.stop()
            sampler = VolumeSampler(
                volume, self.handle, is_low=functools.partial(self._volume_low, name)
            )
            self.samplers[name] = sampler
            sampler.start()
        for name in set(self.samplers) - set(self.config.volumes):
            self.samplers.pop(name).stop()

    def _volume_low(self, name: str) -> bool:
        volume = self.state.volumes.get(name)
        return volume is not None and volume.low

    def _start_logs(self) -> None:
        """Follow the migrations' logs (again, after a reload). Not before the units' states
        are known: whether a line belongs to the current run is judged by its unit's start."""
        if not self.logs_started:
            return
        rules = self._rules(self.config)
        wanted = {m.account: m for m in self.config.migrations if m.log is not None}
        for account in list(self.logs):
            if account not in wanted:
                self.logwatch.remove(account)
                del self.logs[account]
        current = self.logwatch.positions()  # before remove(): a reload goes on from here
        for account, migration in wanted.items():
            assert migration.log is not None
            utc = migration.log_time == "utc"
            if account in self.logs:
                self.logs[account].rebind(migration.log, rules, utc)
            else:
                self.logs[account] = MigrationLog(account, migration.log, rules, utc)
            self.logwatch.remove(account)
            position = current.get(account) or self.saved_positions.get(account)
            self.logwatch.add(account, migration.log, position, self._on_lines, self._on_backlog)

    # -- events in ------------------------------------------------------------------------

    def _on_unit(self, unit: str, view: UnitView) -> None:
        if not view.running:
            self._read_log_before_end(unit)
        self.handle(UnitChanged(unit, self.stale_freezer.seen(unit, view)))

    def _read_log_before_end(self, unit: str) -> None:
        """A run's last lines say how it ended (rclone's summary: a full disk, a revoked
        token) and are in its log before its process exits, but the exit's D-Bus signal
        can be handled before inotify's event for them: the exit was then classified by
        its status alone (rclone's 1 after a full disk: an unrecoverable failure). So the
        log of a unit that stops running is read first."""
        migration = unit_owner(self.config, unit)
        if migration is None or migration.account not in self.logs:
            return
        state = self.state.migrations.get(migration.account)
        old = state.units.get(unit) if state is not None else None
        if old is None or not old.known or old.active_state in ACTIVE_STATES:
            self.logwatch.read_now(migration.account)

    def _on_connection(self, connected: bool) -> None:
        self.handle(BusChanged(connected))
        if connected and not self.logs_started:
            self.logs_started = True  # every unit's view has just been read
            self._start_logs()

    def _on_lines(self, account: str, lines: list[str], backlog: bool = False) -> None:
        migration_log = self.logs.get(account)
        migration = self.state.migrations.get(account)
        if migration_log is None or migration is None:
            return
        event = migration_log.feed(lines, backlog, functools.partial(is_current_line, migration))
        self._positions_dirty = True
        if event is not None:
            self.handle(event)

    def _on_backlog(self, account: str, lines: list[str]) -> None:
        self._on_lines(account, lines, backlog=True)

    def handle(self, event: Event) -> None:
        """The one place where events meet the policy (always on the loop thread)."""
        now = self._wall_now()
        self.state, actions = decide(self.config, self.state, event, now)
        unit_actions = [a for a in actions if isinstance(a, UnitAction | SliceFreeze)]
        for unit_action in unit_actions:
            self._execute(unit_action)
        self._after_events_soon()  # the state and STATUS=, once the calls went out
        others: list[Action] = [a for a in actions if not isinstance(a, UnitAction | SliceFreeze)]
        if unit_actions or self._deferred:
            # The alert spool fsyncs too: let the D-Bus calls go out first (they are written
            # on the next loop turns), keeping every other effect in its order.
            self._deferred.extend(others)
            if self._deferred and self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(
                    DEFER_SECONDS, self._flush_deferred
                )
        else:
            for action in others:
                self._execute(action)

    def _after_events_soon(self) -> None:
        """Save the state and update STATUS= once per loop turn, after the unit actions of
        every event of that turn went out: encoding 200 migrations takes milliseconds, and
        STATUS= is a message PID 1 must read while it answers the freezes. Per event, a
        burst of 200 replies cost 200 encodings and 200 STATUS= messages."""
        if self._after_handle is None:
            self._after_handle = asyncio.get_running_loop().call_soon(self._after_events)

    def _after_events(self) -> None:
        self._after_handle = None
        self._save()  # in the background: an fsync must not hold up the calls just made
        if self.ready:
            self._update_status()

    def _wall_now(self) -> float:
        """The wall clock, for the policy; a step of it (relative to elapsed time, which
        CLOCK_BOOTTIME counts even across a suspend) is told to the policy first, so the
        intervals it measures keep their lengths."""
        wall = time.time()
        offset = wall - time.clock_gettime(time.CLOCK_BOOTTIME)
        step = offset - self._clock_offset
        if abs(step) > CLOCK_STEP_TOLERANCE:
            self._clock_offset = offset
            self.state, actions = decide(self.config, self.state, ClockStepped(step), wall)
            for action in actions:
                self._execute(action)
        return wall

    def _flush_deferred(self) -> None:
        self._flush_handle = None
        deferred, self._deferred = self._deferred, []
        for action in deferred:
            self._execute(action)

    def _update_status(self, force: bool = False) -> None:
        """STATUS= goes to PID 1, which is on the path of every freeze: send it when what
        an operator acts on changes (holds, failures, bus, config), else once a second."""
        migrations = self.state.migrations
        if migrations is not self._status_migrations:  # (decide keeps an unchanged mapping)
            self._status_migrations = migrations
            self._status_holds = tuple((m.hold, m.failure is not None) for m in migrations.values())
        key = (
            self._status_holds,
            self.state.bus_connected,
            self.config_problem,
            tuple((v.up, v.low) for v in self.state.volumes.values()),
        )
        now = time.monotonic()
        if force or key != self._status_key or now - self._status_sent >= STATUS_INTERVAL:
            self._status_key, self._status_sent = key, now
            self.notifier.status(self.status_line())

    # -- actions out ----------------------------------------------------------------------

    def _execute(self, action: Action) -> None:
        match action:
            case UnitAction():
                self._spawn(self._unit_action(action))
            case SliceFreeze():
                self._spawn(self._slice_freeze(action))
            case RunVerify():
                self._spawn(self._verify(action))
            case RunSize():
                self._spawn(self._size_probe(action))
            case WriteIncident():
                self._record_incident(action)
            case RaiseAlert():
                description = action.description
                volume = action.labels.get("volume", "")
                if action.name == PAUSE_ALERT and volume in self.consumers.volumes:
                    # the facts of the moment: what fills the volume (latest scan, its age)
                    description += " " + self.consumers.alert_text(volume)
                    if action.labels.get("reason") == "disk_full":
                        self._spawn(self._disk_full_incident(action))
                alert = GuardAlert(
                    key=action.key,
                    name=action.name,
                    labels={**action.labels, "severity": action.severity},
                    annotations={"summary": action.summary, "description": description},
                    starts_at=time.time(),
                    ends_at=None,
                )
                if not self._hold_for_incident(alert):
                    self.alerts.fire(alert)
            case ResolveAlert():
                self._release_alert(action.key)  # a held alert goes first: order kept
                self.alerts.resolve(action.key, time.time())
            case Reply():
                future = self.replies.pop(action.request_id, None)
                if future is not None and not future.done():
                    future.set_result((action.ok, action.message))
            case ReadUnit():
                self._spawn(self.systemd.reread(action.unit))
            case Log():
                log.log(LOG_LEVELS[action.level], "%s", action.message)

    async def _unit_action(self, action: UnitAction) -> None:
        method = {
            "freeze": self.systemd.freeze,
            "thaw": self.systemd.thaw,
            "stop": self.systemd.stop,
            "start": self.systemd.start,
        }[action.kind]
        started = time.monotonic()
        try:
            reread = await self.stale_freezer.run(
                action.kind, action.unit, method, self.systemd.thaw
            )
        except OutcomeUnknown as error:  # it may have landed: the policy reads the unit
            self.counters.actions[(action.kind, action.reason, "unknown")] += 1
            self.handle(ActionDone(action, False, str(error), unknown=True))
        except Exception as error:  # any failure is reported back to the policy
            self.counters.actions[(action.kind, action.reason, "error")] += 1
            self.handle(ActionDone(action, False, str(error) or type(error).__name__))
        else:
            log.info(
                "%s %s: D-Bus call took %.1f ms",
                action.kind,
                action.unit,
                (time.monotonic() - started) * 1000,
            )
            self.counters.actions[(action.kind, action.reason, "ok")] += 1
            if action.reason == "retry":
                self.counters.retries[action.account] += 1
            self.handle(ActionDone(action, True))
            if reread:
                # systemd 252 signals no change of FreezerState alone: read it after the
                # stale record was reset (a freeze's or thaw's own reply sets it in the
                # adapter's view: no read, which cost 400 calls after 200 freezes)
                self._spawn(self.systemd.reread(action.unit))

    async def _slice_freeze(self, action: SliceFreeze) -> None:
        units = [member.unit for member in action.actions]
        started = time.monotonic()
        try:
            if any(unit in self.stale_freezer.stale for unit in units):
                raise SliceUnusable("a member's freezer record is stale (thawed before a freeze)")
            await self.systemd.freeze_slice(action.slice, units)
        except SliceUnusable as error:  # nothing was sent: freeze them one by one
            self.handle(ActionDone(action, False, str(error)))
        except Exception as error:  # an error reply may come after some members froze
            for member in action.actions:
                self.counters.actions[("freeze", member.reason, "unknown")] += 1
            self.handle(ActionDone(action, False, str(error) or type(error).__name__, True))
        else:
            log.info(
                "freeze %s (%d units): D-Bus call took %.1f ms",
                action.slice,
                len(units),
                (time.monotonic() - started) * 1000,
            )
            for member in action.actions:
                self.counters.actions[("freeze", member.reason, "ok")] += 1
            self.handle(ActionDone(action, True))

    async def _verify(self, action: RunVerify) -> None:
        self.verify_seq += 1  # unique even for two verifications in one second
        name = (
            action.unit
            or f"spaceguard-verify-{action.account}-{int(time.time())}-{self.verify_seq}.service"
        )
        log.info(
            "%s: verifying the source: %s (unit %s)",
            action.account,
            " ".join(action.command) or "configured verify_unit",
            name,
        )
        try:
            if action.unit:
                await self.systemd.run_unit(action.unit, action.timeout)
            else:
                await self.systemd.run_transient(name, action.command, action.timeout)
        except Exception as error:
            self.counters.actions[("verify", "failure", "error")] += 1
            self.handle(ActionDone(action, False, f"{error} (journalctl -u {name})"))
        else:
            self.counters.actions[("verify", "failure", "ok")] += 1
            self.handle(ActionDone(action, True))

    async def _size_probe(self, action: RunSize) -> None:
        """Start the size unit, wait for it to end, read what it wrote (on a worker
        thread: a slow or hung file system must not stop the loop) and tell the policy."""
        log.info("%s: measuring the source: starting %s", action.account, action.unit)
        started = time.time()
        try:
            await self.systemd.run_unit(action.unit, action.timeout, what="size probe")
            size = await asyncio.to_thread(read_size_file, Path(action.file), started)
        except SizeFileError as error:
            self.counters.actions[("size", "admission", "error")] += 1
            self.handle(SizeMeasured(action.account, None, str(error)))
        except Exception as error:
            self.counters.actions[("size", "admission", "error")] += 1
            message = str(error) or type(error).__name__
            self.handle(
                SizeMeasured(action.account, None, f"{message} (journalctl -u {action.unit})")
            )
        else:
            self.counters.actions[("size", "admission", "ok")] += 1
            self.handle(SizeMeasured(action.account, size))

    def _record_incident(self, action: WriteIncident) -> None:
        """In memory at once, so that `spaceguardctl show` and the alert that names it find
        it; on disk in the background (kept and retried while the disk refuses it). The
        partial-migration report follows once its scan of the destination is done."""
        record = dict(action.record)
        account = str(record["account"])
        migration_log = self.logs.get(account)
        context = migration_log.context_for(action.evidence) if migration_log else []
        collecting = {"destination": "", "note": "being collected (scanning the destination)"}
        if self.incident_store.record(record, context, collecting) is None:
            return  # logged: the bounded queue of unwritten incidents is full
        self.counters.incidents[account] += 1
        self.open_incidents = self.incident_store.open_counts()
        self._spawn(self._complete_incident(record, context))

    async def _complete_incident(self, record: dict[str, Any], context: list[str]) -> None:
        account = str(record["account"])
        migration = self.config.migration(account)
        destination = migration.destination if migration else None
        state = self.state.migrations.get(account)
        since = (state.running_since if state else None) or record["time"]
        partial = await asyncio.to_thread(partial_report, destination, since)
        self.incident_store.record(record, context, partial)
        self._log_incident(account, str(record["id"]), "incident")

    def _log_incident(self, account: str, incident_id: str, what: str) -> None:
        path = self.incident_store.directory / f"{incident_id}.json"
        health = self.incident_store.writer.health()
        if health.writable:
            log.warning("%s: %s recorded: %s", account, what, path)
        else:
            log.error(
                "%s: %s %s recorded in memory only, %s cannot be written (%s): retrying",
                account,
                what,
                incident_id,
                path,
                health.last_error,
            )

    def _hold_for_incident(self, alert: GuardAlert) -> bool:
        """An alert that names an incident goes out once the incident's first write is
        done (or failed, or took INCIDENT_HOLD_SECONDS): then its text can say truly
        whether the incident is on disk."""
        incident_id = alert.labels.get("incident", "")
        if not incident_id or not self.incident_store.is_unwritten(incident_id):
            return False
        self._release_alert(alert.key)
        self._held_alerts[alert.key] = (alert, incident_id)
        self._spawn(self._fire_when_written(alert.key, incident_id))
        return True

    async def _fire_when_written(self, key: str, incident_id: str) -> None:
        deadline = time.monotonic() + INCIDENT_HOLD_SECONDS
        while (
            self.incident_store.is_unwritten(incident_id)
            and self.incident_store.writer.health().writable
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.005)
        held = self._held_alerts.get(key)
        if held is not None and held[1] == incident_id:
            self._release_alert(key)

    def _release_alert(self, key: str) -> None:
        held = self._held_alerts.pop(key, None)
        if held is None:
            return
        alert, incident_id = held
        note = self._incident_note(incident_id)
        if note:
            annotations = {**alert.annotations}
            annotations["description"] = annotations.get("description", "") + note
            alert = dataclasses.replace(alert, annotations=annotations)
        self.alerts.fire(alert)

    def _incident_note(self, incident_id: str) -> str:
        """What an alert naming an incident the disk has not taken says about it (the
        incident is in memory: `spaceguardctl show` works; the file follows)."""
        if not self.incident_store.is_unwritten(incident_id):
            return ""
        health = self.incident_store.writer.health()
        why = health.last_error if not health.writable else "the disk is slow"
        return (
            f" (The incident is not on disk yet: {why}. The guard keeps it in memory and"
            " retries; spaceguardctl show works meanwhile.)"
        )

    async def _disk_full_incident(self, action: RaiseAlert) -> None:
        """A migration hit ENOSPC and is paused: the incident records what filled the volume,
        from a scan started now (written once the scan is done, within its budget)."""
        account, volume = action.labels["account"], action.labels["volume"]
        migration = self.state.migrations.get(account)
        migration_config = self.config.migration(account)
        if migration is None or migration_config is None:
            return
        paused_at = time.time()
        evidence = migration.last_log_failure
        try:
            await self.consumers.scan(volume, "disk-full")
            usage = self.consumers.report(volume)
        except (ScanFailed, UnknownVolume) as error:
            usage = {"volume": volume, "error": str(error), "scan": None}
        migration_log = self.logs.get(account)
        context = migration_log.context_for(evidence) if migration_log and evidence else []
        volume_state = self.state.volumes.get(volume)
        record: dict[str, Any] = {
            "id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(paused_at)) + f"-{account}-disk-full",
            "account": account,
            "unit": migration_config.unit,
            "units": list(migration_config.units),
            "time": paused_at,
            "trigger": "disk-full",
            "class": FailureClass.DISK_FULL.value,
            "detail": action.summary,
            "matched_lines": [evidence.line] if evidence else [],
            "exit_status": "",
            "verify": "",
            "retries": migration.retries,
            "max_retries": migration_config.max_retries,
            "next_retry_at": None,
            "outcome": "paused: resumes by itself once space is back (runbook scenario 3)",
            "steps": [action.description],
            "free_bytes": volume_state.avail_bytes if volume_state else 0,
            "free_files": volume_state.avail_files if volume_state else 0,
            "volume": volume,
            "progress": {
                "transferred_bytes": migration.transferred_bytes,
                "last_progress_at": migration.last_progress_at,
            },
            "log": str(migration_config.log) if migration_config.log else "",
            "destination": str(migration_config.destination or ""),
            "usage": usage,
        }
        partial = {"destination": "", "note": "a pause: nothing was stopped half-way"}
        incident_id = self.incident_store.record(record, context, partial, new=True)
        if incident_id is None:
            return  # logged: the bounded queue of unwritten incidents is full
        self.counters.incidents[account] += 1
        self.open_incidents = self.incident_store.open_counts()
        self._log_incident(account, incident_id, "disk-full incident")

    # -- persistence ------------------------------------------------------------------------

    def _save(self, force: bool = False) -> None:
        state = self.state
        key = (
            state.migrations,
            state.incident_seq,
            tuple((v.low, v.low_reason) for v in state.volumes.values()),
        )
        if not force and key == self._durable_key:
            return
        positions = self._positions()
        if force:
            try:
                self.store.save(state, positions)
            except OSError as error:
                log.error("cannot save state to %s: %s", self.store.path, error)
                return
        else:
            self.store.save_soon(state, positions)
        self._durable_key = key
        self._positions_dirty = False

    def _positions(self) -> dict[str, dict[str, int]]:
        current = {key: position.to_json() for key, position in self.logwatch.positions().items()}
        if self.logs_started:
            return current
        # the logs are followed once the bus is connected: a state saved before that keeps
        # the saved positions (else a kill then makes the next start re-read every log)
        saved = {key: position.to_json() for key, position in self.saved_positions.items()}
        return {**saved, **current}

    # -- timers -----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        last_positions = last_recheck = time.monotonic()
        ticks = 0
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            ticks += 1
            self.handle(Tick(full=ticks % FULL_TICK_EVERY == 0))
            self._check_stores()
            if time.monotonic() - last_recheck >= self.config.guard.log_recheck_interval:
                last_recheck = time.monotonic()
                self.logwatch.recheck()  # backs inotify up: a missed event cannot blind us
            if (
                self._positions_dirty
                and time.monotonic() - last_positions >= POSITION_SAVE_INTERVAL
            ):
                self._positions_dirty = False
                self.store.save_soon(self.state, self._positions())
                last_positions = time.monotonic()

    async def _become_ready(self) -> None:
        while not (
            self.state.bus_connected
            and all(v.sampled_at or v.error for v in self.state.volumes.values())
        ):
            await asyncio.sleep(0.01)
        self.ready = True
        self.notifier.ready(self.status_line())
        log.info(
            "spaceguard %s ready: %d volumes, %d migrations",
            __version__,
            len(self.config.volumes),
            len(self.config.migrations),
        )

    def healthy(self) -> bool:
        """Earned watchdog: every sampler reported within its deadline."""
        now = time.monotonic()
        return all(
            now - sampler.last_report <= max(3 * sampler.config.poll_max, 2.0)
            for sampler in self.samplers.values()
        )

    async def _watchdog(self) -> None:
        interval = Notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            if self.healthy():
                self.notifier.watchdog()
            else:
                log.error("a volume sampler is late: withholding the watchdog ping")
            await asyncio.sleep(interval)

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        """Reload the config file. One reload at a time (SIGHUP and `spaceguardctl reload`
        may come together); requests that arrive while one runs are coalesced into the
        next one, which reads the file after all of them were made."""
        self._reload_requested += 1
        requested = self._reload_requested
        async with self._reload_lock:
            if self._reload_covered >= requested and self._reload_result is not None:
                return self._reload_result  # a reload begun after this request covered it
            covers = self._reload_requested
            result = await self._reload_once()
            self._reload_covered, self._reload_result = covers, result
            return result

    async def _reload_once(self) -> tuple[bool, str]:
        self.notifier.reloading()
        try:
            config = await asyncio.to_thread(load, self.config_path)
            problem = reload_problem(self.config, config, self.state)
            if problem:
                raise ConfigError(f"{self.config_path}: {problem}")
        except ConfigError as error:
            self.config_problem = f"reload refused, old config kept: {error}"
            log.error("%s", self.config_problem)
            self.notifier.ready(self.status_line())
            return False, str(error)
        old_config, self.config = self.config, config
        self.config_problem = ""
        self.consumers.reconfigure(config)
        self.state = initial_state(config, self.state)
        journal.set_level(config.guard.log_level)
        self.systemd.set_units(self._units(config))
        self.systemd.resync_interval = config.guard.resync_interval
        self._start_samplers()
        self._start_logs()
        if config.alerts != old_config.alerts:
            await self._restart_alerts()
        self.handle(Tick())
        log.info("configuration reloaded from %s", self.config_path)
        self.notifier.ready(self.status_line())
        return True, f"reloaded {self.config_path}"

    async def _restart_alerts(self) -> None:
        """New receivers: a new sender on the same spool (nothing undelivered is lost).

        Only under the reload lock: the old sender's task has ended before the new one
        reads the spool, so never two senders write it. The new sender also takes over
        the old one's view of what fires, in case a spool write had failed meanwhile."""
        old, task = self.alerts, self.alerts_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.alerts = self._alert_sender(self.config)
        firing = old.firing_alerts()
        for alert in firing.values():
            self.alerts.fire(alert)
        for key in set(self.alerts.firing_alerts()) - set(firing):
            self.alerts.resolve(key)
        if task is not None:  # else run() starts it
            self.alerts_task = self._spawn_named(self.alerts.run(), ALERT_SENDER_TASK)

    def _spawn_named(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = self._spawn(coroutine)
        task.set_name(name)
        return task

    def alert_sender_tasks(self) -> int:
        """How many alert senders run on the loop (1 unless a restart went wrong)."""
        return sum(
            1
            for task in asyncio.all_tasks()
            if task.get_name() == ALERT_SENDER_TASK and not task.done()
        )

    # -- reporting --------------------------------------------------------------------------

    def status_line(self) -> str:
        parts = []
        for name, volume in self.state.volumes.items():
            if not volume.up:
                parts.append(f"{name}: UNAVAILABLE")
                continue
            percent = 100.0 * volume.avail_bytes / volume.size_bytes if volume.size_bytes else 0
            parts.append(
                f"{name}: {format_size(volume.avail_bytes)} free ({percent:.1f}%)"
                + (f" LOW({volume.low_reason})" if volume.low else "")
            )
        paused = [
            f"{account} ({m.hold.by}: {m.hold.reason})"
            for account, m in self.state.migrations.items()
            if m.hold
        ]
        failed = [account for account, m in self.state.migrations.items() if m.failure]
        line = "; ".join(parts)
        line += "; paused: " + (", ".join(paused) if paused else "none")
        if failed:
            line += "; failed: " + ", ".join(failed)
        if not self.state.bus_connected:
            line += "; D-Bus DISCONNECTED"
        polled = self.logwatch.polled()
        if polled:
            line += "; logs followed by stat (no inotify watch): " + ", ".join(sorted(polled))
        if self.config_problem:
            line += "; RELOAD FAILED (old config kept, see journal)"
        return line + self.store_watch.status_words()

    def snapshot(self) -> Snapshot:
        stats = self.alerts.stats()
        delivery = {
            name: DeliveryStats(
                sent_ok=s.sent_ok,
                sent_error=s.sent_error,
                spooled=s.spooled,
                oldest_spooled_age=s.oldest_spooled_age,
            )
            for name, s in stats.items()
        }
        return Snapshot(
            config=self.config,
            state=self.state,
            counters=self.counters,
            now=time.time(),
            config_reload_ok=not self.config_problem,
            open_incidents=self.open_incidents,
            delivery=delivery,
            log_lines={a: m.lines_read for a, m in self.logs.items()},
            log_errors={(a, c.value): n for a, m in self.logs.items() for c, n in m.errors.items()},
            item_errors={
                (a, c.value, rule): n
                for a, m in self.logs.items()
                for (rule, c), n in m.item_errors.items()
            },
            past_errors={a: m.past_errors for a, m in self.logs.items()},
            log_polled=self.logwatch.polled(),
            inotify_overflows=self.logwatch.overflows,
            usage=self.consumers.stats(),
            stores=self.store_watch.stats(),
        )

    def _alert_state_problem(self) -> None:
        self.alerts.fire(
            GuardAlert(
                key="state-corrupt",
                name="SpaceguardStateCorrupt",
                labels={"severity": "warning"},
                annotations={
                    "summary": "spaceguard's saved state was unreadable",
                    "description": self.store.problem,
                },
                starts_at=time.time(),
                ends_at=None,
            )
        )

    # -- ControlBackend -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        volumes = []
        for name, volume_config in self.config.volumes.items():
            volume = self.state.volumes.get(name)
            if volume is None:
                continue
            eta = seconds_to_pause(volume_config, volume)
            volumes.append(
                {
                    "name": name,
                    "path": str(volume_config.path),
                    "up": volume.up,
                    "error": volume.error,
                    "avail_bytes": volume.avail_bytes,
                    "size_bytes": volume.size_bytes,
                    "avail_files": volume.avail_files,
                    "files": volume.files,
                    "fill_rate": volume.fill_rate,
                    "seconds_to_pause": None if eta == float("inf") else eta,
                    "low": volume.low,
                    "low_reason": volume.low_reason,
                    "pause_below": str(volume_config.pause_below),
                    "resume_above": str(volume_config.resume_above),
                    # what the running migrations still write, and what that leaves
                    "committed_bytes": committed_bytes(self.config, self.state, name),
                    "projected_free_bytes": volume.avail_bytes
                    - committed_bytes(self.config, self.state, name),
                }
            )
        migrations = []
        for migration_config in self.config.migrations:
            migration = self.state.migrations[migration_config.account]
            failure = migration.failure
            migrations.append(
                {
                    "account": migration.account,
                    "unit": migration_config.unit,
                    "units": {
                        unit: {
                            "active_state": v.active_state,
                            "sub_state": v.sub_state,
                            "freezer_state": v.freezer_state,
                            "result": v.result,
                            "type": v.service_type,
                        }
                        for unit, v in migration.units.items()
                    },
                    "pause": pause_mode(migration_config, migration),
                    "remaining_bytes": remaining_bytes(migration_config, migration),
                    "size_probe": {
                        "unit": migration_config.size_unit,
                        "bytes": migration.size_bytes,
                        "at": migration.sized_at or None,
                        "error": migration.size_error,
                        "running_since": migration.sizing_since or None,
                    }
                    if migration_config.size_unit
                    else None,
                    "priority": migration_config.priority,
                    "item_errors": {
                        "total": migration.run_items.total,
                        "by_rule": [
                            {"rule": rule, "class": cls.value, "count": count}
                            for rule, cls, count in migration.run_items.by_rule
                        ],
                    },
                    "volume": migration_config.volume,
                    "state": migration_state(migration),
                    "hold": {
                        "by": migration.hold.by,
                        "reason": migration.hold.reason,
                        "since": migration.hold.since,
                        "note": migration.hold.note,
                    }
                    if migration.hold
                    else None,
                    "failure": {
                        "class": failure.failure_class,
                        "trigger": failure.trigger,
                        "detail": failure.detail,
                        "phase": failure.phase,
                        "incident": failure.incident_id,
                        "next_retry_at": failure.next_retry_at,
                    }
                    if failure
                    else None,
                    "retries": migration.retries,
                    "max_retries": migration_config.max_retries,
                    "log_polled": self.logwatch.polled().get(migration.account, ""),
                    "transferred_bytes": migration.transferred_bytes,
                    "last_progress_at": migration.last_progress_at,
                }
            )
        return {
            "version": __version__,
            "ready": self.ready,
            "bus_connected": self.state.bus_connected,
            "freeze_path": self.systemd.freeze_path,
            "alert_sender_tasks": self.alert_sender_tasks(),
            "config": str(self.config_path),
            "config_problem": self.config_problem,
            "state_problem": self.store.problem,
            "state_unwritable": {
                name: {"error": h.last_error, "since": h.failing_since, "pending": h.pending}
                for name, h in self.store_watch.failing().items()
            },
            "volumes": volumes,
            "migrations": migrations,
            "diagnostics": diagnostics(self.config, self.state),
        }

    async def operator(
        self, verb: str, account: str, reason: str, force: bool, who: str
    ) -> tuple[bool, str]:
        if verb not in ("pause", "resume", "retry"):
            return False, f"unknown operator verb {verb!r}"
        self.request_seq += 1
        request_id = f"req-{self.request_seq}"
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self.replies[request_id] = future
        self.handle(OperatorRequest(request_id, verb, account, reason, force, who))  # type: ignore[arg-type]
        try:
            # the reply may be deferred behind the unit actions the request caused
            return await asyncio.wait_for(future, 5.0)
        except TimeoutError:
            return False, "the policy gave no answer"
        finally:
            self.replies.pop(request_id, None)

    def incidents(self, account: str | None) -> list[dict[str, Any]]:
        return self.incident_store.list(account)

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        return self.incident_store.get(incident_id)

    def ack(self, incident_id: str, who: str) -> tuple[bool, str]:
        result = self.incident_store.ack(incident_id, who, time.time())
        self._prune_incidents()
        self.open_incidents = self.incident_store.open_counts()
        return result

    async def ack_account(self, account: str, who: str) -> tuple[bool, str]:
        """Every open incident of `account` (a migration that failed again and again),
        each recorded as `ack` records one; no faster than the incident writer takes them
        (it holds 64 at most), and within ACK_ALL_SECONDS (the client waits)."""
        store = self.incident_store
        listed = store.list(account)
        waiting = [str(item["id"]) for item in listed if not item.get("acked_by")]
        if not listed and self.config.migration(account) is None:
            return False, f"no migration and no incident for account {account!r}"
        deadline = time.monotonic() + ACK_ALL_SECONDS
        done = 0
        try:
            for incident_id in waiting:
                while store.writer.room() == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)  # the disk is slower than the acks
                if store.writer.room() == 0:
                    break
                ok, message = store.ack(incident_id, who, time.time())
                if not ok:
                    return False, f"{account}: {done} acknowledged, then {message}"
                done += 1
        finally:
            # pruning skips what is not on disk yet, and takes what the writer has room
            # for: let the acks reach the disk, then prune until nothing more goes
            while True:
                await asyncio.to_thread(store.writer.flush, max(0.0, deadline - time.monotonic()))
                if not self._prune_incidents() or time.monotonic() >= deadline:
                    break
            self.open_incidents = store.open_counts()
        if done < len(waiting):
            return False, (
                f"{account}: {done} of {len(waiting)} open incidents acknowledged; the "
                "incident disk is slow: run it again for the rest"
            )
        if not waiting:
            return True, f"{account} has no open incidents"
        return True, f"{account}: {done} incident{'s' if done != 1 else ''} acknowledged"

    async def usage(self, volume: str | None, rescan: bool) -> dict[str, Any]:
        """`spaceguardctl usage [VOLUME] [--rescan]`: the latest figures, with their age."""
        names = [volume] if volume is not None else list(self.config.volumes)
        reports = []
        for name in names:
            try:
                if rescan:
                    await self.consumers.scan(name, "demand", fresh=FRESH_SECONDS)
                reports.append(self.consumers.report(name))
            except UnknownVolume as error:
                raise RequestError("not-found", str(error)) from None
            except ScanFailed as error:
                if volume is not None:
                    raise RequestError("refused", f"usage {name}: {error}") from None
                reports.append({**self.consumers.report(name), "error": str(error)})
        return {"volumes": reports, "now": time.time()}

    async def check_config(self, path: str | None) -> tuple[bool, str]:
        """Off the loop: a config on a slow or hung file system must not stall the guard
        (config.load refuses FIFOs, devices and files above 1 MiB)."""
        target = Path(path) if path else self.config_path
        try:
            config = await asyncio.to_thread(load, target)
        except ConfigError as error:
            return False, str(error)
        notes = diagnostics(config, initial_state(config, self.state))
        return True, (
            f"{target}: OK ({len(config.volumes)} volumes, {len(config.migrations)} migrations)"
            + "".join(f"\nnote: {note}" for note in notes)
        )


async def run_guard(config_path: Path) -> int:
    try:
        config = load(config_path)
    except ConfigError as error:
        log.error("%s", error)
        return 1
    journal.set_level(config.guard.log_level)
    config.guard.state_dir.mkdir(parents=True, exist_ok=True)
    guard = Guard(config_path, config)
    return await guard.run()
