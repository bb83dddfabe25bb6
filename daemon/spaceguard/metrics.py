"""Prometheus metrics (prometheus-client), computed on scrape from the guard's current view.

State metrics are not mirrored into gauges on every change: a custom collector reads a
snapshot when Prometheus asks. The endpoint is served on the asyncio loop (no thread), so a
scrape always sees a consistent view, and a hung loop shows as a failed scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .atomicfile import WriterHealth
from .config import Config
from .model import MIGRATION_STATES, FailureClass, GuardState, migration_state
from .watermarks import remaining_bytes, seconds_to_pause

# /metrics is for Prometheus (a scrape or two at a time) and a person with curl
METRICS_MAX_CONNECTIONS = 32
METRICS_REQUEST_DEADLINE = 5.0  # seconds for the whole request, however it trickles in
METRICS_REPLY_DEADLINE = 10.0
REFUSED_LINGER = 0.2  # seconds a refused client may finish sending its request

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """Monotonic counts since the guard started (Prometheus handles the resets)."""

    actions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    incidents: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class DeliveryStats:
    sent_ok: int = 0
    sent_error: int = 0
    spooled: int = 0
    oldest_spooled_age: float = 0.0


@dataclass(frozen=True)
class UsageStats:
    """One volume's latest usage scan (consumers.py), as the metrics show it."""

    scanned_at: float = 0.0  # 0: no scan yet
    duration: float = 0.0
    partial: bool = False
    entries: int = 0
    unexplained: int | None = None
    # path → (bytes, growth in bytes per second or None): the destinations and the top N
    paths: Mapping[str, tuple[int, float | None]] = field(default_factory=dict)
    reclaimable: Mapping[str, int] = field(default_factory=dict)  # candidate kind → bytes
    scans: Mapping[str, int] = field(default_factory=dict)  # complete | partial | error
    scanning: bool = False


@dataclass(frozen=True)
class Snapshot:
    config: Config
    state: GuardState
    counters: Counters
    now: float
    config_reload_ok: bool = True
    open_incidents: Mapping[str, int] = field(default_factory=dict)
    delivery: Mapping[str, DeliveryStats] = field(default_factory=dict)
    log_lines: Mapping[str, int] = field(default_factory=dict)  # account → lines read
    log_errors: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (account, class)
    usage: Mapping[str, UsageStats] = field(default_factory=dict)  # volume → its latest scan
    # (account, class, rule) → item errors of current runs; account → lines of earlier runs
    item_errors: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    past_errors: Mapping[str, int] = field(default_factory=dict)
    # account → why its log is followed by stat (inotify cannot watch it); overflows
    log_polled: Mapping[str, str] = field(default_factory=dict)
    inotify_overflows: int = 0
    # store (state | incidents | alerts) → how its background writer fares
    stores: Mapping[str, WriterHealth] = field(default_factory=dict)


class GuardCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from _guard(snap)
        yield from _volumes(snap)
        yield from _migrations(snap)
        yield from _activity(snap)
        yield from _delivery(snap)
        yield from _stores(snap)
        yield from _usage(snap)


def _guard(snap: Snapshot) -> Iterator[Metric]:
    info = GaugeMetricFamily("spaceguard_build_info", "spaceguard version", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield GaugeMetricFamily(
        "spaceguard_dbus_connected",
        "1 while the guard is connected to the system bus",
        value=int(snap.state.bus_connected),
    )
    yield GaugeMetricFamily(
        "spaceguard_config_last_reload_successful",
        "0 when the last reload was refused (the old config stays)",
        value=int(snap.config_reload_ok),
    )


def _volumes(snap: Snapshot) -> Iterator[Metric]:
    labels = ["volume"]
    families = {
        "up": GaugeMetricFamily(
            "spaceguard_volume_up",
            "1 while the volume's path is a mounted file system the guard can sample",
            labels=labels,
        ),
        "avail": GaugeMetricFamily(
            "spaceguard_volume_avail_bytes",
            "bytes available to unprivileged writers (f_bavail)",
            labels=labels,
        ),
        "size": GaugeMetricFamily(
            "spaceguard_volume_size_bytes", "file system size in bytes", labels=labels
        ),
        "files_avail": GaugeMetricFamily(
            "spaceguard_volume_files_avail",
            "inodes available to unprivileged writers (f_favail)",
            labels=labels,
        ),
        "files": GaugeMetricFamily(
            "spaceguard_volume_files", "inodes in the file system", labels=labels
        ),
        "rate": GaugeMetricFamily(
            "spaceguard_volume_fill_rate_bytes_per_second",
            "bytes consumed per second (negative when freed)",
            labels=labels,
        ),
        "eta": GaugeMetricFamily(
            "spaceguard_volume_seconds_to_pause",
            "predicted seconds until "
            "the pause threshold at the current fill rate (+Inf: not "
            "filling)",
            labels=labels,
        ),
        "low": GaugeMetricFamily(
            "spaceguard_volume_low",
            "1 while the volume is below its pause threshold (migrations on it are paused)",
            labels=labels,
        ),
    }
    for name, volume_config in snap.config.volumes.items():
        volume = snap.state.volumes.get(name)
        if volume is None:
            continue
        families["up"].add_metric([name], int(volume.up))
        families["low"].add_metric([name], int(volume.low))
        if volume.sampled_at:
            families["avail"].add_metric([name], volume.avail_bytes)
            families["size"].add_metric([name], volume.size_bytes)
            families["files_avail"].add_metric([name], volume.avail_files)
            families["files"].add_metric([name], volume.files)
            families["rate"].add_metric([name], volume.fill_rate)
            families["eta"].add_metric([name], seconds_to_pause(volume_config, volume))
    yield from families.values()


def _migrations(snap: Snapshot) -> Iterator[Metric]:
    labels = ["account", "unit"]
    state_family = GaugeMetricFamily(
        "spaceguard_migration_state",
        "1 for the migration's current state",
        labels=[*labels, "state"],
    )
    paused = GaugeMetricFamily(
        "spaceguard_migration_paused", "1 while the migration is paused", labels=labels
    )
    paused_seconds = GaugeMetricFamily(
        "spaceguard_migration_paused_seconds",
        "how long the migration has been paused",
        labels=labels,
    )
    pause_info = GaugeMetricFamily(
        "spaceguard_migration_pause_info",
        "who paused the migration and why (1 while paused)",
        labels=[*labels, "by", "reason"],
    )
    failed = GaugeMetricFamily(
        "spaceguard_migration_failed", "1 while the migration is failed", labels=[*labels, "class"]
    )
    stalled = GaugeMetricFamily(
        "spaceguard_migration_stalled",
        "1 while the migration is stopped for making no progress",
        labels=labels,
    )
    retries = CounterMetricFamily(
        "spaceguard_migration_retries", "retries started by the guard", labels=labels
    )
    progress = GaugeMetricFamily(
        "spaceguard_migration_last_progress_timestamp_seconds",
        "when the migration last made progress",
        labels=labels,
    )
    transferred = GaugeMetricFamily(
        "spaceguard_migration_transferred_bytes",
        "bytes transferred, from rclone's stats",
        labels=labels,
    )
    remaining = GaugeMetricFamily(
        "spaceguard_migration_remaining_bytes",
        "what the current run still writes (rclone's totals, else expected_size or its size probe)",
        labels=labels,
    )
    unit_frozen = GaugeMetricFamily(
        "spaceguard_unit_frozen",
        "1 while systemd reports the unit's cgroup frozen (FreezerState), whoever froze it",
        labels=["account", "unit"],
    )
    for migration_config in snap.config.migrations:
        migration = snap.state.migrations.get(migration_config.account)
        if migration is None:
            continue
        for unit, view in sorted(migration.units.items()):
            if view.known:
                unit_frozen.add_metric([migration_config.account, unit], int(view.frozen))
        key = [migration_config.account, migration_config.unit]
        need = remaining_bytes(migration_config, migration)
        if need is not None:
            remaining.add_metric(key, need)
        current = migration_state(migration)
        for name in MIGRATION_STATES:
            state_family.add_metric([*key, name], int(name == current))
        hold = migration.hold
        paused.add_metric(key, int(hold is not None))
        paused_seconds.add_metric(key, max(0.0, snap.now - hold.since) if hold else 0.0)
        if hold is not None:
            pause_info.add_metric([*key, hold.by, hold.reason], 1)
        failure = migration.failure
        for failure_class in (FailureClass.TRANSIENT, FailureClass.UNRECOVERABLE):
            failed.add_metric(
                [*key, failure_class],
                int(failure is not None and failure.failure_class == failure_class),
            )
        stalled.add_metric(key, int(failure is not None and failure.trigger == "stall"))
        retries.add_metric(key, snap.counters.retries[migration_config.account])
        if migration.last_progress_at:
            progress.add_metric(key, migration.last_progress_at)
        transferred.add_metric(key, migration.transferred_bytes)
    yield from (
        remaining,
        unit_frozen,
        state_family,
        paused,
        paused_seconds,
        pause_info,
        failed,
        stalled,
        retries,
        progress,
        transferred,
    )


def _activity(snap: Snapshot) -> Iterator[Metric]:
    counters = snap.counters
    accounts = [m.account for m in snap.config.migrations]
    lines = CounterMetricFamily("spaceguard_log_lines", "log lines read", labels=["account"])
    errors = CounterMetricFamily(
        "spaceguard_log_errors", "classified error lines", labels=["account", "class"]
    )
    incidents = CounterMetricFamily("spaceguard_incidents", "incidents written", labels=["account"])
    open_incidents = GaugeMetricFamily(
        "spaceguard_incidents_open", "incidents not acknowledged", labels=["account"]
    )
    for account in accounts:
        lines.add_metric([account], snap.log_lines.get(account, 0))
        incidents.add_metric([account], counters.incidents[account])
        open_incidents.add_metric([account], snap.open_incidents.get(account, 0))
    for (account, failure_class), count in sorted(snap.log_errors.items()):
        errors.add_metric([account, failure_class], count)
    item_errors = CounterMetricFamily(
        "spaceguard_log_item_errors",
        "items rclone could not copy and went on without (current runs)",
        labels=["account", "class", "rule"],
    )
    for (account, failure_class, rule), count in sorted(snap.item_errors.items()):
        item_errors.add_metric([account, failure_class, rule], count)
    past = CounterMetricFamily(
        "spaceguard_log_past_errors",
        "classified lines of earlier runs (read for position only, never acted on)",
        labels=["account"],
    )
    for account in accounts:
        past.add_metric([account], snap.past_errors.get(account, 0))
    actions = CounterMetricFamily(
        "spaceguard_actions", "actions taken on units", labels=["action", "reason", "result"]
    )
    for (action, reason, result), count in sorted(counters.actions.items()):
        actions.add_metric([action, reason, result], count)
    polled = GaugeMetricFamily(
        "spaceguard_log_polled",
        "1 while the log is followed by stat every 0.25 s: inotify cannot watch it",
        labels=["account"],
    )
    for account in accounts:
        polled.add_metric([account], 1 if account in snap.log_polled else 0)
    overflows = CounterMetricFamily(
        "spaceguard_log_inotify_overflows",
        "inotify event queue overflows (every log was rechecked by stat)",
    )
    overflows.add_metric([], snap.inotify_overflows)
    yield from (lines, errors, item_errors, past, polled, overflows, incidents, open_incidents)
    yield actions


def _stores(snap: Snapshot) -> Iterator[Metric]:
    """The guard's own files (state dir): 0 while a store cannot be written (it guards on
    from memory and retries; see storehealth.py)."""
    labels = ["store"]
    writable = GaugeMetricFamily(
        "spaceguard_state_writable",
        "1 while the store's files in the state directory can be written",
        labels=labels,
    )
    errors = CounterMetricFamily(
        "spaceguard_state_write_errors", "failed write attempts", labels=labels
    )
    pending = GaugeMetricFamily(
        "spaceguard_state_writes_pending",
        "writes waiting in memory (coalesced: the latest content of each file)",
        labels=labels,
    )
    dropped = CounterMetricFamily(
        "spaceguard_state_writes_dropped",
        "writes refused because the bounded queue was full",
        labels=labels,
    )
    for name, health in sorted(snap.stores.items()):
        writable.add_metric([name], int(health.writable))
        errors.add_metric([name], health.errors_total)
        pending.add_metric([name], health.pending)
        dropped.add_metric([name], health.dropped_total)
    yield from (writable, errors, pending, dropped)


def _delivery(snap: Snapshot) -> Iterator[Metric]:
    sent = CounterMetricFamily(
        "spaceguard_alerts_sent", "alert deliveries", labels=["receiver", "result"]
    )
    spooled = GaugeMetricFamily(
        "spaceguard_alerts_spooled", "alerts waiting for delivery", labels=["receiver"]
    )
    oldest = GaugeMetricFamily(
        "spaceguard_alerts_oldest_spooled_age_seconds",
        "age of the oldest undelivered alert",
        labels=["receiver"],
    )
    for receiver, stats in sorted(snap.delivery.items()):
        sent.add_metric([receiver, "ok"], stats.sent_ok)
        sent.add_metric([receiver, "error"], stats.sent_error)
        spooled.add_metric([receiver], stats.spooled)
        oldest.add_metric([receiver], stats.oldest_spooled_age)
    yield from (sent, spooled, oldest)


def _usage(snap: Snapshot) -> Iterator[Metric]:
    volume = ["volume"]
    size = GaugeMetricFamily(
        "spaceguard_usage_bytes",
        "disk usage (st_blocks, hard links once) of the destinations and the largest entries",
        labels=["volume", "path"],
    )
    grown = GaugeMetricFamily(
        "spaceguard_usage_growth_bytes_per_second",
        "growth of each path in spaceguard_usage_bytes, over about the last hour of scans",
        labels=["volume", "path"],
    )
    unexplained = GaugeMetricFamily(
        "spaceguard_usage_unexplained_bytes",
        "used space no scanned entry accounts for (deleted but open files, shadowed mounts)",
        labels=volume,
    )
    reclaimable = GaugeMetricFamily(
        "spaceguard_usage_reclaimable_bytes",
        "space held by reclaim candidates, listed for a person (the guard deletes nothing)",
        labels=["volume", "kind"],
    )
    scanned = GaugeMetricFamily(
        "spaceguard_usage_scan_timestamp_seconds",
        "when the latest usage scan finished",
        labels=volume,
    )
    duration = GaugeMetricFamily(
        "spaceguard_usage_scan_duration_seconds",
        "how long the latest usage scan took",
        labels=volume,
    )
    partial = GaugeMetricFamily(
        "spaceguard_usage_scan_partial",
        "1 when the latest usage scan was cut by its time or entry budget",
        labels=volume,
    )
    entries = GaugeMetricFamily(
        "spaceguard_usage_scan_entries", "entries the latest usage scan read", labels=volume
    )
    running = GaugeMetricFamily(
        "spaceguard_usage_scan_running", "1 while a usage scan of the volume runs", labels=volume
    )
    scans = CounterMetricFamily(
        "spaceguard_usage_scans", "usage scans by result", labels=["volume", "result"]
    )
    for name, stats in sorted(snap.usage.items()):
        running.add_metric([name], int(stats.scanning))
        for result in ("complete", "partial", "error"):
            scans.add_metric([name, result], stats.scans.get(result, 0))
        if not stats.scanned_at:
            continue
        scanned.add_metric([name], stats.scanned_at)
        duration.add_metric([name], stats.duration)
        partial.add_metric([name], int(stats.partial))
        entries.add_metric([name], stats.entries)
        if stats.unexplained is not None:
            unexplained.add_metric([name], max(0, stats.unexplained))
        for kind, total in sorted(stats.reclaimable.items()):
            reclaimable.add_metric([name, kind], total)
        for path, (nbytes, rate) in sorted(stats.paths.items()):
            size.add_metric([name, path], nbytes)
            if rate is not None:
                grown.add_metric([name, path], rate)
    yield from (size, grown, unexplained, reclaimable, scanned, duration, partial, entries)
    yield from (running, scans)


class MetricsServer:
    """A minimal HTTP/1.0 server for GET /metrics on the guard's own loop.

    Bounded by design, so that clients cannot take what the guard needs to act: at most
    `max_connections` at once (one more is answered 503 and closed at once, without
    reading its request), each with `request_deadline` seconds for its whole request
    (a client dripping its headers byte by byte gains nothing) and `reply_deadline` for
    taking the reply."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        *,
        max_connections: int = METRICS_MAX_CONNECTIONS,
        request_deadline: float = METRICS_REQUEST_DEADLINE,
        reply_deadline: float = METRICS_REPLY_DEADLINE,
    ) -> None:
        self.registry = registry
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.server: asyncio.Server | None = None
        self.max_connections = max_connections
        self.request_deadline = request_deadline
        self.reply_deadline = reply_deadline
        self.connections = 0  # being served now
        self.refused = 0  # answered 503 since start: too many at once
        self._lingering = 0

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as error:
            raise OSError(
                error.errno, f"metrics_listen {self.host}:{self.port}: {error.strerror or error}"
            ) from None
        for sock in self.server.sockets:
            self.port = int(sock.getsockname()[1])
            break
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            await self._refuse(reader, writer)
            return
        self.connections += 1
        try:
            await self._answer(reader, writer)
        finally:
            self.connections -= 1

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """503, then a short linger for the request already sent (closing with it unread
        would reset the connection, and the client might never see the 503); lingering
        ones are bounded too, beyond that the connection is simply closed."""
        self.refused += 1
        body = f"more than {self.max_connections} connections at once; try again\n"
        try:
            writer.write(
                "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\n"
                f"Connection: close\r\n\r\n{body}".encode()
            )
            if self._lingering < self.max_connections:
                self._lingering += 1
                try:
                    writer.write_eof()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(REFUSED_LINGER):
                            while await reader.read(65536):
                                pass
                finally:
                    self._lingering -= 1
        except (OSError, RuntimeError):
            pass  # the client went away
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_deadline)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method != "GET":
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?")[0] in ("/metrics", "/"):
                body = generate_latest(self.registry)
                status, kind = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body, kind = "404 Not Found", b"try /metrics\n", "text/plain"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), self.reply_deadline)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass
        finally:
            writer.close()


def make_registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GuardCollector(snapshot))
    return registry
