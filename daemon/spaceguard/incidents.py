"""Incident files: the written record of a failed migration (scenario 1, step 3).

Each incident is `<state_dir>/incidents/<id>.json` plus `<id>.txt` for people. The guard only
reads the migration's destination to describe what a person might clean up (the seed's
cleanup step is a person's job): it never deletes, moves or truncates anything.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomicfile import set_aside, write_atomic
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


class IncidentStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(
        self, record: Mapping[str, Any], context: Sequence[str], partial: Mapping[str, Any]
    ) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        full = {
            **record,
            "context": list(context),
            "partial": dict(partial),
            "acked_by": "",
            "acked_at": None,
        }
        path = self.directory / f"{record['id']}.json"
        # the text first: the JSON file is what lists an incident, so it comes last
        write_atomic(self.directory / f"{record['id']}.txt", render_text(full).encode())
        write_atomic(path, json.dumps(full, indent=2, sort_keys=True).encode())
        return path

    def write_new(
        self, record: Mapping[str, Any], context: Sequence[str], partial: Mapping[str, Any]
    ) -> Path:
        """Write under the record's id, or the first of id-2, id-3... that is free."""
        incident_id = str(record["id"])
        for number in range(2, 1000):
            if not (self.directory / f"{incident_id}.json").exists():
                break
            incident_id = f"{record['id']}-{number}"
        return self.write({**record, "id": incident_id}, context, partial)

    def get(self, incident_id: str) -> dict[str, Any] | None:
        if not is_incident_id(incident_id):
            return None
        path = self.directory / f"{incident_id}.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            set_aside(path, f"unreadable incident ({error})")
            return None
        if not isinstance(data, dict):
            return None
        data["text"] = render_text(data)
        return data

    def list(self, account: str | None = None) -> list[dict[str, Any]]:
        summaries = []
        try:
            names = sorted(p.name for p in self.directory.glob("*.json"))
        except OSError:
            return []
        for name in names:
            data = self.get(name[:-5])
            if data is None or (account and data.get("account") != account):
                continue
            summaries.append(
                {
                    key: data.get(key)
                    for key in (
                        "id",
                        "account",
                        "unit",
                        "time",
                        "trigger",
                        "class",
                        "detail",
                        "outcome",
                        "acked_by",
                    )
                }
            )
        return summaries

    def open_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for summary in self.list():
            if not summary.get("acked_by"):
                account = str(summary.get("account"))
                counts[account] = counts.get(account, 0) + 1
        return counts

    def ack(self, incident_id: str, who: str, now: float) -> tuple[bool, str]:
        data = self.get(incident_id)
        if data is None:
            return False, f"no incident {incident_id!r}"
        if data.get("acked_by"):
            return True, f"{incident_id} was already acknowledged by {data['acked_by']}"
        data.pop("text", None)
        data["acked_by"], data["acked_at"] = who, now
        write_atomic(
            self.directory / f"{incident_id}.json",
            json.dumps(data, indent=2, sort_keys=True).encode(),
        )
        write_atomic(self.directory / f"{incident_id}.txt", render_text(data).encode())
        return True, f"{incident_id} acknowledged"
