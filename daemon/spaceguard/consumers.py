"""What fills each volume, for people: the guard's side of the usage scan.

`UsageMonitor` keeps, per volume, the latest scan (`usage.walk()`, run by the worker process
at idle priority), a bounded history of earlier ones, and the growth of every consumer
over the last hour. It starts a scan

* on a slow schedule (`usage_interval`, the first one at start-up),
* when free space enters the band below `resume_above` (so the figures are fresh when the
  pause comes), and when the volume runs low,
* on demand (`spaceguardctl usage VOLUME --rescan`).

Scans run one at a time: two volumes on one disk would only slow each other down. A scan
never delays the guard: the walk is in another process, the guard only waits for one
line of JSON, and the triggers are looked at once a second, off the path from a sample to
a freeze.

Everything here reports; nothing decides. The figures go to `spaceguardctl usage`, the
pause alert's description and the disk-full incident (daemon.py adds them), and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, VolumeConfig
from .metrics import UsageStats
from .model import GuardState
from .quantities import format_size
from .usage import ScanRequest, ScanResult, display

log = logging.getLogger(__name__)

GROWTH_WINDOW = 3600.0  # "growth over the last hour"
HISTORY_SECONDS = 2 * GROWTH_WINDOW
HISTORY_MAX = 64  # scans kept per volume
APPROACH_MIN_AGE = 60.0  # entering the band does not rescan figures younger than this
FRESH_SECONDS = 5.0  # `usage --rescan` within this long of the last scan returns that one
WORKER_GRACE = 30.0  # beyond the budget: a worker that says nothing is killed
WORKER_LIMIT = 16 * 1024 * 1024  # one reply line
ALERT_CONSUMERS = 5
ALERT_CANDIDATES = 3
TRIGGERS = ("schedule", "approaching", "low", "demand", "disk-full")


class ScanFailed(Exception):
    """A scan gave no result; phrased for people."""


# --- the worker process -----------------------------------------------------------------------


def worker_command() -> list[str]:
    return [sys.executable, "-m", "spaceguard.usage"]


class Worker:
    """The scanner process: started on first use, kept for its listing cache, killed and
    started again when it dies or hangs (a hung file system: it may stay in D state, so
    it is abandoned, not waited for)."""

    def __init__(self, command: Sequence[str] | None = None, grace: float = WORKER_GRACE) -> None:
        self.command = list(command or worker_command())
        self.grace = grace
        self.process: asyncio.subprocess.Process | None = None
        self.priority: dict[str, Any] = {}
        self.seq = 0
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def _start(self) -> asyncio.subprocess.Process:
        if self.process is not None and self.process.returncode is None:
            return self.process
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (package_parent, env.get("PYTHONPATH", "")) if part
        )
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                limit=WORKER_LIMIT,
                close_fds=True,
            )
        except OSError as error:
            raise ScanFailed(f"cannot start the scanner ({self.command[0]}): {error}") from None
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), self.grace)
            hello = json.loads(line)["hello"]
        except (TimeoutError, ValueError, KeyError, TypeError):
            await self._abandon(process)
            raise ScanFailed("the scanner did not start (see the journal)") from None
        self.process, self.priority = process, dict(hello)
        log.info(
            "usage scanner started: pid %s, CPU %s, I/O %s, oom_score_adj %s",
            hello.get("pid"),
            hello.get("cpu"),
            hello.get("io"),
            hello.get("oom_score_adj"),
        )
        return process

    async def _abandon(self, process: asyncio.subprocess.Process) -> None:
        """Kill it, and reap it unless it cannot die (stuck in the kernel on a hung mount)."""
        if self.process is process:
            self.process = None
        if process.stdin is not None:
            process.stdin.close()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 1.0)
        self._release(process)

    @staticmethod
    def _release(process: asyncio.subprocess.Process) -> None:
        # asyncio closes a subprocess transport only when it is collected; close it now,
        # while the loop runs (a transport collected after the loop closed cannot close)
        transport = getattr(process, "_transport", None)
        if transport is not None:
            transport.close()

    async def scan(self, request: ScanRequest) -> ScanResult:
        async with self._lock:
            process = await self._start()
            assert process.stdin is not None and process.stdout is not None
            self.seq += 1
            line = json.dumps({"id": self.seq, "request": request.to_json()}) + "\n"
            try:
                process.stdin.write(line.encode())
                await process.stdin.drain()
                reply_line = await asyncio.wait_for(
                    process.stdout.readline(), request.budget + self.grace
                )
            except TimeoutError:
                await self._abandon(process)
                raise ScanFailed(
                    f"the scanner gave no answer within {request.budget + self.grace:g}s "
                    "(a hung file system?); it was killed"
                ) from None
            except (ConnectionError, ValueError, asyncio.LimitOverrunError) as error:
                await self._abandon(process)
                raise ScanFailed(f"lost the scanner: {error}") from None
            if not reply_line:
                # it closed its output: it is exiting. Let asyncio reap it before any kill
                # (Popen.kill polls first and would reap it itself: asyncio's watcher then
                # finds no child and reports status 255 instead of the real one)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 1.0)
                await self._abandon(process)
                raise ScanFailed(
                    f"the scanner exited (status {process.returncode}); see the journal"
                )
        try:
            reply = json.loads(reply_line)
            if reply.get("error"):
                raise ScanFailed(str(reply["error"]))
            return ScanResult.from_json(reply["result"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ScanFailed(f"the scanner sent a reply the guard cannot read: {error}") from None

    async def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is not None:
            self._release(process)
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 1.0)
        except TimeoutError:
            await self._abandon(process)
        else:
            self._release(process)


# --- history and growth (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The sizes one scan found, for growth: only entries it finished (complete)."""

    at: float  # when the scan finished (wall clock)
    sizes: Mapping[str, int]


def sample_of(result: ScanResult) -> Sample:
    sizes = {entry.path: entry.bytes for entry in result.consumers if entry.complete}
    for destination in result.destinations:
        if destination.entry is not None and destination.entry.complete:
            sizes[destination.entry.path] = destination.entry.bytes
    if result.complete:
        sizes[result.root] = result.scanned_bytes
    return Sample(result.finished_at, sizes)


def growth(
    history: Sequence[Sample], current: Sample, path: str, window: float = GROWTH_WINDOW
) -> tuple[int, float] | None:
    """(bytes grown, over how many seconds) for `path`, against the newest earlier scan at
    least `window` old, else the oldest one there is; None without an earlier figure."""
    now_bytes = current.sizes.get(path)
    if now_bytes is None:
        return None
    base: Sample | None = None
    for sample in history:  # oldest first
        if sample.at >= current.at or path not in sample.sizes:
            continue
        if base is None or current.at - sample.at >= window:
            base = sample
    if base is None:
        return None
    return now_bytes - base.sizes[path], current.at - base.at


def prune(history: deque[Sample], now: float) -> None:
    while len(history) > 1 and now - history[0].at > HISTORY_SECONDS:
        history.popleft()


# --- text for people (pure) -----------------------------------------------------------------


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def growth_text(grown: tuple[int, float] | None) -> str:
    if grown is None:
        return "growth not known yet"
    change, span = grown
    sign = "+" if change >= 0 else "-"
    return f"{sign}{format_size(abs(change))} in {ago(span)}"


def unexplained_text(result: ScanResult) -> str:
    unexplained = result.unexplained_bytes
    if unexplained is None:
        return "not known (the scan was cut)"
    text = format_size(max(0, unexplained))
    if unexplained < 0:
        text += " (files were removed during the scan)"
    return (
        f"{text} (used {format_size(result.used_bytes)} minus scanned "
        f"{format_size(result.scanned_bytes)}: files deleted but still open, space under "
        f"other mounts, metadata; besides {format_size(result.reserved_bytes)} reserved)"
    )


def alert_text(
    result: ScanResult | None,
    history: Sequence[Sample],
    volume: str,
    now: float,
    scanning: bool,
) -> str:
    """One paragraph for the pause alert: the top consumers with growth, the unexplained
    rest, the reclaim candidates."""
    if result is None:
        return (
            f"What fills it: no usage scan yet ({'one is running' if scanning else 'none ran'});"
            f" see spaceguardctl usage {volume}."
        )
    current = sample_of(result)
    parts = [
        f"{entry.path} {format_size(entry.bytes)}"
        + ("" if entry.complete else " (at least)")
        + f" ({growth_text(growth(history, current, entry.path))})"
        for entry in result.consumers[:ALERT_CONSUMERS]
    ]
    state = "complete" if result.complete else f"partial: {result.cut}"
    text = (
        f"What fills it (usage scan {ago(now - result.finished_at)} ago, {state}): "
        + ("; ".join(parts) or "nothing found")
        + f". Not explained by any directory: {unexplained_text(result)}."
    )
    found = [(kind, total) for kind, total in sorted(result.reclaimable.items()) if total > 0]
    if found:
        text += " Reclaim candidates, listed, not touched: " + ", ".join(
            f"{kind} {format_size(total)}" for kind, total in found
        )
        listed = sorted(result.candidates, key=lambda c: -c.bytes)[:ALERT_CANDIDATES]
        text += " (largest: " + "; ".join(f"{c.path} {format_size(c.bytes)}" for c in listed) + ")."
    return text + f" Details: spaceguardctl usage {volume}."


# --- the monitor ----------------------------------------------------------------------------


@dataclass
class VolumeUsage:
    latest: ScanResult | None = None
    trigger: str = ""  # what started the latest scan
    history: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY_MAX))
    running: str = ""  # the trigger of the scan in progress ("" when none)
    running_since: float = 0.0
    queued: str = ""
    waiters: list[asyncio.Future[ScanResult]] = field(default_factory=list)
    error: str = ""  # the last scan's failure
    error_at: float = 0.0
    scans: Counter[str] = field(default_factory=Counter)  # complete | partial | error
    next_scheduled: float = 0.0  # monotonic
    was_low: bool = False
    was_approaching: bool = False


class UnknownVolume(Exception):
    pass


class UsageMonitor:
    def __init__(
        self,
        config: Config,
        state: Callable[[], GuardState],
        worker: Worker | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.state = state
        self.worker = worker or Worker()
        self.clock, self.wall = clock, wall
        self.volumes: dict[str, VolumeUsage] = {}
        self._wakeup = asyncio.Event()
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        for name in list(self.volumes):
            if name not in config.volumes:
                for waiter in self.volumes.pop(name).waiters:
                    if not waiter.done():
                        waiter.set_exception(ScanFailed(f"volume {name} left the config"))
        for name in config.volumes:
            self.volumes.setdefault(name, VolumeUsage(next_scheduled=self.clock()))

    def request(self, config: VolumeConfig) -> ScanRequest:
        destinations = {
            migration.account: str(migration.destination)
            for migration in self.config.migrations
            if migration.volume == config.name and migration.destination is not None
        }
        return ScanRequest(
            root=str(config.path),
            depth=config.usage_depth,
            top=config.usage_top,
            budget=config.usage_budget,
            max_entries=config.usage_max_entries,
            destinations=destinations,
            old_after=config.usage_old_after,
        )

    # -- starting scans -------------------------------------------------------------------

    def volume(self, name: str) -> VolumeUsage:
        usage = self.volumes.get(name)
        if usage is None:
            known = ", ".join(sorted(self.config.volumes)) or "none"
            raise UnknownVolume(f"no volume {name!r} (configured: {known})")
        return usage

    def unavailable(self, name: str) -> str:
        """Why volume `name` cannot be scanned now ("" if it can)."""
        volume = self.state().volumes.get(name)
        if volume is None or (not volume.sampled_at and not volume.error):
            return ""  # not sampled yet: the walk itself will say if it cannot
        if not volume.up:
            return f"volume {name} is unavailable ({volume.error or 'not mounted'})"
        return ""

    def trigger(self, name: str, trigger: str) -> None:
        """Queue a scan of `name` unless one is queued or running."""
        usage = self.volume(name)
        if usage.running or usage.queued:
            return
        usage.queued = trigger
        self._wakeup.set()

    async def scan(self, name: str, trigger: str = "demand", fresh: float = 0.0) -> ScanResult:
        """A result no older than `fresh` seconds (0: a new scan), waiting for it."""
        usage = self.volume(name)
        problem = self.unavailable(name)
        if problem:
            raise ScanFailed(problem)
        latest = usage.latest
        if fresh and latest is not None and self.wall() - latest.finished_at <= fresh:
            return latest
        future: asyncio.Future[ScanResult] = asyncio.get_running_loop().create_future()
        usage.waiters.append(future)
        if not usage.running:
            self.trigger(name, trigger)
        return await future

    async def run(self) -> None:
        """Look at the triggers once a second and run the queued scans, one at a time."""
        runner = asyncio.get_running_loop().create_task(self._run_scans())
        try:
            while True:
                self._check_triggers()
                await asyncio.sleep(1.0)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    def _check_triggers(self) -> None:
        state = self.state()
        now = self.clock()
        for name, config in self.config.volumes.items():
            usage = self.volumes.get(name)
            volume = state.volumes.get(name)
            if usage is None or volume is None or not volume.up or not volume.sampled_at:
                continue
            low = volume.low
            approaching = not low and volume.avail_bytes < config.resume_above.limit(
                volume.size_bytes
            )
            latest_age = self.wall() - usage.latest.finished_at if usage.latest else float("inf")
            if low and not usage.was_low:
                self.trigger(name, "low")
            elif approaching and not usage.was_approaching and latest_age > APPROACH_MIN_AGE:
                self.trigger(name, "approaching")
            elif config.usage_interval and now >= usage.next_scheduled:
                self.trigger(name, "schedule")
            usage.was_low, usage.was_approaching = low, approaching

    async def _run_scans(self) -> None:
        while True:
            queued = [(name, usage) for name, usage in self.volumes.items() if usage.queued]
            if not queued:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # a volume running low goes first
            name, usage = min(
                queued, key=lambda item: item[1].queued not in ("low", "disk-full", "demand")
            )
            await self._scan_one(name, usage)

    async def _scan_one(self, name: str, usage: VolumeUsage) -> None:
        trigger, usage.queued = usage.queued, ""
        config = self.config.volumes.get(name)
        if config is None:
            return
        problem = self.unavailable(name)
        usage.running, usage.running_since = trigger, self.wall()
        try:
            if problem:
                raise ScanFailed(problem)
            result = await self.worker.scan(self.request(config))
        except ScanFailed as error:
            usage.error, usage.error_at = str(error), self.wall()
            usage.scans["error"] += 1
            log.warning("usage %s: scan (%s) failed: %s", name, trigger, error)
            self._finish(usage, config, error=error)
            return
        except Exception as error:  # a bug must cost one scan, not the monitor
            usage.error, usage.error_at = f"{type(error).__name__}: {error}", self.wall()
            usage.scans["error"] += 1
            log.exception("usage %s: scan (%s) failed", name, trigger)
            self._finish(usage, config, error=ScanFailed(usage.error))
            return
        usage.error = ""
        usage.latest, usage.trigger = result, trigger
        usage.history.append(sample_of(result))
        prune(usage.history, result.finished_at)
        usage.scans["complete" if result.complete else "partial"] += 1
        log.info("usage %s: %s", name, self.summary(name, result))
        self._finish(usage, config, result=result)

    def _finish(
        self,
        usage: VolumeUsage,
        config: VolumeConfig,
        result: ScanResult | None = None,
        error: ScanFailed | None = None,
    ) -> None:
        usage.running = ""
        usage.next_scheduled = self.clock() + (config.usage_interval or float("inf"))
        waiters, usage.waiters = usage.waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if result is not None:
                waiter.set_result(result)
            else:
                waiter.set_exception(error or ScanFailed("no result"))

    async def close(self) -> None:
        await self.worker.close()

    # -- reporting ----------------------------------------------------------------------------

    def summary(self, name: str, result: ScanResult) -> str:
        """One journal line for a finished scan."""
        usage = self.volumes[name]
        current = sample_of(result)
        top = ", ".join(
            f"{entry.path} {format_size(entry.bytes)} "
            f"({growth_text(growth(usage.history, current, entry.path))})"
            for entry in result.consumers[:3]
        )
        state = "complete" if result.complete else f"PARTIAL ({result.cut})"
        return (
            f"scanned {result.entries:,} entries in {result.duration:.1f}s, {state}: "
            f"{top or 'empty'}; unexplained {unexplained_text(result)}"
        )

    def alert_text(self, name: str) -> str:
        usage = self.volumes.get(name)
        if usage is None:
            return ""
        return alert_text(usage.latest, list(usage.history), name, self.wall(), bool(usage.running))

    def report(self, name: str) -> dict[str, Any]:
        """What `spaceguardctl usage` shows (and the disk-full incident records)."""
        usage = self.volume(name)
        config = self.config.volumes[name]
        now = self.wall()
        report: dict[str, Any] = {
            "volume": name,
            "path": str(config.path),
            "scanning": bool(usage.running),
            "scanning_since": usage.running_since if usage.running else None,
            "error": usage.error,
            "error_at": usage.error_at or None,
            "depth": config.usage_depth,
            "scan": None,
        }
        result = usage.latest
        if result is None:
            return report
        current = sample_of(result)
        history = list(usage.history)

        def with_growth(entry_path: str, fields: dict[str, Any]) -> dict[str, Any]:
            grown = growth(history, current, entry_path)
            fields["growth_bytes"] = grown[0] if grown else None
            fields["growth_seconds"] = grown[1] if grown else None
            return fields

        report["scan"] = {
            "trigger": usage.trigger,
            "started_at": result.started_at,
            "finished_at": result.finished_at,
            "age_seconds": max(0.0, now - result.finished_at),
            "duration_seconds": result.duration,
            "complete": result.complete,
            "cut": result.cut,
            "entries": result.entries,
            "directories": result.directories,
            "used_bytes": result.used_bytes,
            "scanned_bytes": result.scanned_bytes,
            "unexplained_bytes": result.unexplained_bytes,
            "reserved_bytes": result.reserved_bytes,
            "consumers": [with_growth(entry.path, entry.to_json()) for entry in result.consumers],
            "destinations": [
                with_growth(
                    destination.entry.path if destination.entry else "",
                    {
                        "account": destination.name,
                        "path": destination.path,
                        "bytes": destination.entry.bytes if destination.entry else None,
                        "complete": destination.entry.complete if destination.entry else None,
                        "note": destination.note,
                    },
                )
                for destination in result.destinations
            ],
            "candidates": [candidate.to_json() for candidate in result.candidates],
            "reclaimable": dict(result.reclaimable),
            "other_mounts": list(result.other_mounts),
            "unreadable": result.unreadable,
            "vanished": result.vanished,
            "errors": list(result.errors),
            "hardlinks": result.hardlinks,
            "cached_dirs": result.cached_dirs,
        }
        return report

    def stats(self) -> dict[str, UsageStats]:
        """Per volume, for the metrics: bounded to the destinations and the top N."""
        stats = {}
        for name, usage in self.volumes.items():
            result = usage.latest
            if result is None:
                stats[name] = UsageStats(scans=dict(usage.scans), scanning=bool(usage.running))
                continue
            current = sample_of(result)
            history = list(usage.history)
            paths: dict[str, tuple[int, float | None]] = {}
            entries = [entry for entry in result.consumers]
            entries += [d.entry for d in result.destinations if d.entry is not None]
            for entry in entries:
                grown = growth(history, current, entry.path)
                rate = grown[0] / grown[1] if grown and grown[1] > 0 else None
                paths[entry.path] = (entry.bytes, rate)
            stats[name] = UsageStats(
                scanned_at=result.finished_at,
                duration=result.duration,
                partial=not result.complete,
                entries=result.entries,
                unexplained=result.unexplained_bytes,
                paths=paths,
                reclaimable=dict(result.reclaimable),
                scans=dict(usage.scans),
                scanning=bool(usage.running),
            )
        return stats


__all__ = [
    "TRIGGERS",
    "ScanFailed",
    "UnknownVolume",
    "UsageMonitor",
    "Worker",
    "alert_text",
    "display",
    "growth",
]
