"""Incident files: the written record of a failed migration (scenario 1, step 3).

Each incident is `<state_dir>/incidents/<id>.json` plus `<id>.txt` for people. The guard only
reads the migration's destination to describe what a person might clean up (the seed's
cleanup step is a person's job): it never deletes, moves or truncates anything of it. Of
its own files, it prunes acknowledged incidents beyond `guard.acked_incidents_keep` or
older than `guard.acked_incidents_max_age`; an incident nobody acknowledged stays.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomicfile import BackgroundWriter, set_aside, write_atomic
from .names import is_incident_id
from .quantities import format_size

log = logging.getLogger(__name__)
PARTIAL_SCAN_LIMIT = 200_000  # entries: a report, not an inventory
PARTIAL_SCAN_SECONDS = 5.0


def partial_report(destination: Path | None, since: float) -> dict[str, Any]:
    """What the migration left in its destination: totals, and files changed since the run
    started (candidates a person may want to check). Read-only; bounded in time and size."""
    if destination is None:
        return {"destination": "", "note": "no destination configured"}
    report: dict[str, Any] = {
        "destination": str(destination),
        "files": 0,
        "bytes": 0,
        "recent": [],
        "truncated": False,
    }
    recent: list[tuple[float, str, int]] = []
    deadline = time.monotonic() + PARTIAL_SCAN_SECONDS
    seen = 0
    try:
        for root, dirs, files in os.walk(destination):
            dirs.sort()
            for name in files:
                seen += 1
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                report["files"] += 1
                report["bytes"] += st.st_size
                if st.st_mtime >= since:
                    recent.append((st.st_mtime, path, st.st_size))
            if seen >= PARTIAL_SCAN_LIMIT or time.monotonic() > deadline:
                report["truncated"] = True
                break
    except OSError as error:
        report["error"] = str(error)
    recent.sort(reverse=True)
    report["recent"] = [
        {"path": path, "bytes": size, "mtime": mtime} for mtime, path, size in recent[:20]
    ]
    report["recent_count"] = len(recent)
    return report


def render_text(record: Mapping[str, Any]) -> str:
    """The human-readable incident, in the order a person works through it."""
    lines = [
        f"Incident {record['id']}",
        f"  account:   {record['account']}   unit: {record['unit']}",
        f"  when:      {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record['time']))}",
        f"  trigger:   {record['trigger']}   class: {record['class']}",
        f"  detail:    {record['detail']}",
        f"  exit:      {record.get('exit_status') or '-'}",
        f"  verify:    {record.get('verify') or 'not configured'}",
        f"  free:      {record.get('free_bytes', 0)} bytes, {record.get('free_files', 0)} inodes "
        f"on volume {record.get('volume', '')}",
        f"  progress:  {record.get('progress', {}).get('transferred_bytes', 0)} bytes transferred",
        f"  outcome:   {record['outcome']}",
        "",
        "Matched lines:",
        *(f"  {line}" for line in record.get("matched_lines", []) or ["  (none)"]),
        "",
        f"Log context ({record.get('log') or 'no log configured'}):",
        *(f"  {line}" for line in record.get("context", []) or ["  (none)"]),
        "",
        "Steps taken:",
        *(f"  {step}" for step in record.get("steps", [])),
        "",
    ]
    items = record.get("items") or {}
    if items.get("total"):
        lines.append(f"Items rclone could not copy ({items['total']}; it copied the others):")
        lines += [
            f"  {rule['count']:>8}  {rule['rule']} ({rule['class']})"
            for rule in items.get("by_rule", [])
        ]
        lines += [
            f"  {item['path']}: {item['message']}  [{item['rule']}]"
            for item in items.get("failed", [])
        ]
        if items.get("not_listed"):
            lines.append(f"  ... and {items['not_listed']} more (see the log)")
        lines.append("")
    partial = record.get("partial") or {}
    lines.append("Partial migration (for a person to review; the guard deletes nothing):")
    if partial.get("destination"):
        lines.append(
            f"  {partial['destination']}: {partial.get('files', 0)} files, "
            f"{partial.get('bytes', 0)} bytes"
            + (" (scan truncated)" if partial.get("truncated") else "")
        )
        lines.append(f"  changed during the failed run: {partial.get('recent_count', 0)} files")
        lines += [
            f"    {item['path']} ({item['bytes']} bytes)" for item in partial.get("recent", [])
        ]
    else:
        lines.append(f"  {partial.get('note', 'no destination configured')}")
    if isinstance(record.get("usage"), dict):
        lines += ["", *usage_lines(record["usage"])]
    if record.get("class") == "disk_full":
        lines += [
            "",
            "Runbook (scenario 3): the migration is paused, not failed; free space (see what",
            "fills the volume above), and it resumes by itself once space is back. Then",
            f"`spaceguardctl ack {record['id']}`.",
            "",
        ]
    else:
        lines += [
            "",
            "Runbook (scenario 1): check the source with `rclone lsd` / `rclone check`,",
            "read the log, fix the cause, then `spaceguardctl retry ACCOUNT` and "
            f"`spaceguardctl ack {record['id']}`.",
            "",
        ]
    if record.get("acked_by"):
        lines.append(
            f"Acknowledged by {record['acked_by']} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(record['acked_at']))}"
        )
    return "\n".join(lines) + "\n"


def usage_lines(usage: Mapping[str, Any]) -> list[str]:
    """What filled the volume (consumers.UsageMonitor.report), for the incident's text."""
    volume = usage.get("volume", "")
    scan = usage.get("scan")
    if not isinstance(scan, dict):
        return [f"What fills volume {volume}: no scan ({usage.get('error') or 'none ran'})"]
    state = "complete" if scan.get("complete") else f"partial: {scan.get('cut')}"
    lines = [
        f"What fills volume {volume} ({usage.get('path', '')}), scan of "
        f"{scan.get('entries', 0):,} entries in {scan.get('duration_seconds', 0):.1f}s, {state}:"
    ]
    for item in scan.get("consumers", []):
        growth = item.get("growth_bytes")
        grown = (
            f", {'+' if growth >= 0 else '-'}{format_size(abs(growth))} in "
            f"{item.get('growth_seconds', 0) / 60:.0f}m"
            if isinstance(growth, int)
            else ""
        )
        lower = "" if item.get("complete", True) else " (at least)"
        lines.append(f"  {format_size(item['bytes']):>10}  {item['path']}{lower}{grown}")
    unexplained = scan.get("unexplained_bytes")
    lines.append(
        "  not explained by any directory: "
        + (
            f"{format_size(max(0, unexplained))} (deleted but open files, other mounts' "
            f"shadows, metadata; {format_size(scan.get('reserved_bytes', 0))} reserved)"
            if isinstance(unexplained, int)
            else "not known (the scan was cut)"
        )
    )
    for item in scan.get("destinations", []):
        size = item.get("bytes")
        shown = format_size(size) if isinstance(size, int) else item.get("note", "")
        lines.append(f"  destination of {item.get('account')}: {item.get('path')} {shown}")
    candidates = scan.get("candidates", [])
    if candidates:
        lines.append("  reclaim candidates (listed for a person; the guard deletes nothing):")
        lines += [
            f"    {c['kind']:<12} {format_size(c['bytes']):>10}  {c['path']}" for c in candidates
        ]
    return lines


SUMMARY_KEYS = (
    "id",
    "account",
    "unit",
    "time",
    "trigger",
    "class",
    "detail",
    "outcome",
    "acked_by",
    "acked_at",
)
MAX_UNWRITTEN = 64  # incidents kept in memory while the disk refuses them
KEEP_ACKED = 1000  # acknowledged incidents kept on disk (config: acked_incidents_keep)
KEEP_ACKED_SECONDS = 90 * 86400.0  # ... and for how long (acked_incidents_max_age)


def _summary(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: data.get(key) for key in SUMMARY_KEYS}


class IncidentStore:
    """The incidents: an in-memory index of their summaries (read once at start, then
    updated on every write and ack: `list` and `open_counts` never touch the disk), writes
    on a background writer (never on the loop), and what the disk refuses kept in memory
    (at most MAX_UNWRITTEN) and retried, so that `show`, `incidents` and `ack` work on an
    incident the moment it is recorded, whether or not it has reached the disk yet.
    Acknowledged incidents beyond a count or an age are pruned; unacknowledged ones never.

    Call everything but the writer's jobs from one thread (the loop)."""

    def __init__(self, directory: Path, writer: BackgroundWriter | None = None) -> None:
        self.directory = directory
        self.writer = writer or BackgroundWriter("incident writer", max_pending=MAX_UNWRITTEN)
        self._index: dict[str, dict[str, Any]] = {}  # id → summary, in id order
        self._unwritten: dict[str, dict[str, Any]] = {}  # id → full record, until on disk
        self._lock = threading.Lock()  # _unwritten: the writer thread removes what it wrote
        self.lost_total = 0  # incidents the bounded queue could not take (logged)
        self.pruned_total = 0
        self._loaded = False

    # -- the index ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read every incident's summary once (at start)."""
        self._loaded = True
        try:
            names = sorted(p.name for p in self.directory.glob("*.json"))
        except OSError as error:
            log.error("cannot list incidents in %s: %s", self.directory, error)
            names = []
        for name in names:
            data = self._read(name[:-5])
            if data is not None:
                self._index[str(data.get("id", name[:-5]))] = _summary(data)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _read(self, incident_id: str) -> dict[str, Any] | None:
        path = self.directory / f"{incident_id}.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            try:
                set_aside(path, f"unreadable incident ({error})")
            except OSError as aside_error:
                log.error("%s: unreadable (%s), cannot set it aside: %s", path, error, aside_error)
            return None
        return data if isinstance(data, dict) else None

    # -- writing -------------------------------------------------------------------------------

    def record(
        self,
        record: Mapping[str, Any],
        context: Sequence[str],
        partial: Mapping[str, Any],
        *,
        new: bool = False,
    ) -> str | None:
        """Record an incident (or a newer version of one: same id) and queue its files for
        the writer; returns its id, or None when MAX_UNWRITTEN incidents already wait for
        the disk (logged: that one is lost). With `new`, a free id is chosen: the record's
        own, or id-2, id-3..."""
        self._ensure_loaded()
        incident_id = str(record["id"])
        if new:
            for number in range(2, 1000):
                if incident_id not in self._index:
                    break
                incident_id = f"{record['id']}-{number}"
        with self._lock:
            previous = self._unwritten.get(incident_id) or self._index.get(incident_id) or {}
        full = {
            **record,
            "id": incident_id,
            "context": list(context),
            "partial": dict(partial),
            "acked_by": previous.get("acked_by", ""),
            "acked_at": previous.get("acked_at"),
        }
        if not self._queue(full):
            return None
        self._index[incident_id] = _summary(full)
        return incident_id

    def write(
        self, record: Mapping[str, Any], context: Sequence[str], partial: Mapping[str, Any]
    ) -> Path:
        """Record and wait for the files (tests, tools): raises OSError if not written."""
        incident_id = self.record(record, context, partial)
        if incident_id is None:
            raise OSError(f"incident {record['id']} not taken: {MAX_UNWRITTEN} wait for the disk")
        if not self.writer.flush(10.0):
            raise OSError(self.writer.health().last_error or "incident not written in 10s")
        return self.directory / f"{incident_id}.json"

    def _queue(self, full: dict[str, Any]) -> bool:
        incident_id = str(full["id"])
        with self._lock:
            self._unwritten[incident_id] = full
        if self.writer.submit(incident_id, functools.partial(self._write_files, full)):
            return True
        with self._lock:
            self._unwritten.pop(incident_id, None)
        self.lost_total += 1
        log.error(
            "incident %s could not be kept: %d incidents already wait for %s to be writable",
            incident_id,
            MAX_UNWRITTEN,
            self.directory,
        )
        return False

    def _write_files(self, full: dict[str, Any]) -> None:
        """On the writer thread."""
        incident_id = str(full["id"])
        self.directory.mkdir(parents=True, exist_ok=True)
        # the text first: the JSON file is what lists an incident, so it comes last
        write_atomic(self.directory / f"{incident_id}.txt", render_text(full).encode())
        write_atomic(
            self.directory / f"{incident_id}.json",
            json.dumps(full, indent=2, sort_keys=True).encode(),
        )
        with self._lock:
            if self._unwritten.get(incident_id) is full:  # not replaced meanwhile
                del self._unwritten[incident_id]

    @property
    def unwritten(self) -> int:
        with self._lock:
            return len(self._unwritten)

    def is_unwritten(self, incident_id: str) -> bool:
        with self._lock:
            return incident_id in self._unwritten

    # -- reading ---------------------------------------------------------------------------

    def get(self, incident_id: str) -> dict[str, Any] | None:
        if not is_incident_id(incident_id):
            return None
        with self._lock:
            pending = self._unwritten.get(incident_id)
        if pending is not None:
            data = dict(pending)
            health = self.writer.health()
            data["unwritten"] = (
                f"not on disk yet ({health.last_error or 'being written'}): kept in memory "
                "and retried"
            )
        else:
            if self._loaded and incident_id not in self._index:
                return None
            read = self._read(incident_id)
            if read is None:
                return None
            data = read
        data["text"] = render_text(data)
        return data

    def list(self, account: str | None = None) -> list[dict[str, Any]]:
        self._ensure_loaded()
        return [
            {key: summary.get(key) for key in SUMMARY_KEYS if key != "acked_at"}
            for _, summary in sorted(self._index.items())
            if not account or summary.get("account") == account
        ]

    def open_counts(self) -> dict[str, int]:
        self._ensure_loaded()
        counts: dict[str, int] = {}
        for summary in self._index.values():
            if not summary.get("acked_by"):
                account = str(summary.get("account"))
                counts[account] = counts.get(account, 0) + 1
        return counts

    def ack(self, incident_id: str, who: str, now: float) -> tuple[bool, str]:
        self._ensure_loaded()
        data = self.get(incident_id)
        if data is None:
            return False, f"no incident {incident_id!r}"
        if data.get("acked_by"):
            return True, f"{incident_id} was already acknowledged by {data['acked_by']}"
        for key in ("text", "unwritten"):
            data.pop(key, None)
        data["acked_by"], data["acked_at"] = who, now
        if not self._queue(data):
            return False, f"{incident_id}: cannot record the acknowledgement (the disk refuses)"
        self._index[incident_id] = _summary(data)
        return True, f"{incident_id} acknowledged"

    # -- pruning ---------------------------------------------------------------------------

    def prune(
        self, now: float, keep: int = KEEP_ACKED, max_age: float = KEEP_ACKED_SECONDS
    ) -> builtins.list[str]:
        """Forget acknowledged incidents beyond the newest `keep`, or acknowledged more than
        `max_age` seconds ago (0: no age limit); their files are removed by the writer. An
        incident nobody acknowledged is never pruned. Returns the ids pruned."""
        self._ensure_loaded()
        acked = sorted(
            (
                (float(s.get("acked_at") or s.get("time") or 0), incident_id)
                for incident_id, s in self._index.items()
                if s.get("acked_by") and not self.is_unwritten(incident_id)
            ),
            reverse=True,
        )
        doomed = [
            incident_id
            for rank, (acked_at, incident_id) in enumerate(acked)
            if rank >= keep or (max_age > 0 and now - acked_at > max_age)
        ]
        removed = []
        for incident_id in doomed:
            if not self.writer.submit(
                f"prune {incident_id}", functools.partial(self._remove_files, incident_id)
            ):
                break  # the writer is full: the rest stays listed, for the next prune
            del self._index[incident_id]
            removed.append(incident_id)
        doomed = removed
        if doomed:
            self.pruned_total += len(doomed)
            log.info("pruned %d acknowledged incident(s): %s", len(doomed), ", ".join(doomed))
        return doomed

    def _remove_files(self, incident_id: str) -> None:
        """On the writer thread: the JSON first (it is what lists an incident)."""
        for suffix in (".json", ".txt"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{incident_id}{suffix}").unlink()
