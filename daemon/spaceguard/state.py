"""Durable state: what the guard paused and why, failures, retries, log positions.

One JSON file in the state directory, written atomically (temp file, fsync, rename, fsync
the directory), so a crash leaves either the old or the new file. A file that cannot be
read back (corrupt, half-written by something else, from a future version, unreadable,
a directory) is renamed aside and reported, and the guard starts from a clean slate
rather than crash-looping. Writes happen on one writer thread, latest state wins.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomicfile import BackgroundWriter, WriterHealth, set_aside, write_atomic
from .model import (
    Failure,
    FailureClass,
    GuardState,
    Hold,
    ItemError,
    ItemErrors,
    LogEvidence,
    MigrationState,
    VolumeState,
)

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass(frozen=True)
class Saved:
    state: GuardState
    log_positions: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def durable(state: GuardState) -> dict[str, Any]:
    """The part of the state worth keeping across a restart (no live samples or unit
    views: those are re-read, and reconciled against what was saved)."""
    return {
        "incident_seq": state.incident_seq,
        "volumes": {
            name: {"low": v.low, "low_reason": v.low_reason, "low_since": v.low_since}
            for name, v in state.volumes.items()
        },
        "migrations": {
            account: {
                "hold": asdict(m.hold) if m.hold else None,
                "paused_units": sorted(m.paused_units),
                # unit actions in flight: their replies die with the process; the policy
                # judges on the first sight of each unit whether they landed
                "pending": {
                    unit: kind for unit, kind in sorted(m.pending.items()) if unit != "verify"
                },
                "restart_on_release": m.restart_on_release,
                "override": m.override,
                "failure": _failure_json(m.failure),
                "retries": m.retries,
                "last_progress_at": m.last_progress_at,
                "transferred_bytes": m.transferred_bytes,
                "finished": m.finished,
                "run_started_at": m.run_started_at,
                "run_items": _items_json(m.run_items),
                # what the run's log said decides its exit's class, after a restart too
                "last_log_failure": _evidence_json(m.last_log_failure),
                "total_bytes": m.total_bytes,
                "admitted": m.admitted,
                "freeze_expired": m.freeze_expired,
                # the size probe's latest result (a probe in flight is asked for again)
                "size_bytes": m.size_bytes,
                "sized_at": m.sized_at,
                "size_error": m.size_error,
            }
            for account, m in state.migrations.items()
        },
    }


def _failure_json(failure: Failure | None) -> dict[str, Any] | None:
    if failure is None:
        return None
    data = asdict(failure)
    data["failure_class"] = failure.failure_class.value
    data["lines"] = list(failure.lines)
    data["steps"] = list(failure.steps)
    data["evidence"] = _evidence_json(failure.evidence)
    return data


def _evidence_json(evidence: LogEvidence | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    return {
        "failure_class": evidence.failure_class.value,
        "rule": evidence.rule,
        "line": evidence.line,
        "seq": evidence.seq,
        "before": list(evidence.before),
        "scope": evidence.scope,
    }


def _evidence(data: Mapping[str, Any] | None) -> LogEvidence | None:
    if data is None:
        return None
    return LogEvidence(
        FailureClass(data["failure_class"]),
        str(data["rule"]),
        str(data["line"]),
        int(data["seq"]),
        tuple(str(line) for line in data["before"]),
        str(data.get("scope", "run")),
    )


def _items_json(items: ItemErrors) -> dict[str, Any]:
    def item(error: ItemError) -> list[str]:
        return [error.path, error.failure_class.value, error.rule, error.message]

    return {
        "total": items.total,
        "by_rule": [[rule, cls.value, count] for rule, cls, count in items.by_rule],
        "first": [item(error) for error in items.first],
        "last": [item(error) for error in items.last],
    }


def _items(data: Mapping[str, Any] | None) -> ItemErrors:
    if data is None:
        return ItemErrors()

    def item(raw: list[str]) -> ItemError:
        path, cls, rule, message = raw
        return ItemError(str(path), FailureClass(cls), str(rule), str(message))

    return ItemErrors(
        total=int(data["total"]),
        by_rule=tuple(
            (str(rule), FailureClass(cls), int(count)) for rule, cls, count in data["by_rule"]
        ),
        first=tuple(item(raw) for raw in data["first"]),
        last=tuple(item(raw) for raw in data["last"]),
    )


def _failure(data: Mapping[str, Any]) -> Failure:
    fields = {
        **data,
        "failure_class": FailureClass(data["failure_class"]),
        "lines": tuple(data["lines"]),
        "steps": tuple(data["steps"]),
        "evidence": _evidence(data.get("evidence")),
    }
    return Failure(**fields)


def _size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"size_bytes: expected a whole number >= 0 or null, got {value!r}")
    return value


def _restore(data: Mapping[str, Any]) -> GuardState:
    volumes = {
        name: VolumeState(
            low=bool(v["low"]), low_reason=str(v["low_reason"]), low_since=float(v["low_since"])
        )
        for name, v in data["volumes"].items()
    }
    migrations = {}
    for account, m in data["migrations"].items():
        failure = m["failure"]
        migrations[account] = MigrationState(
            account=account,
            hold=Hold(**m["hold"]) if m["hold"] else None,
            paused_units=frozenset(m["paused_units"]),
            pending={str(unit): str(kind) for unit, kind in m.get("pending", {}).items()},
            restart_on_release=bool(m["restart_on_release"]),
            override=bool(m["override"]),
            failure=_failure(failure) if failure else None,
            retries=int(m["retries"]),
            last_progress_at=m["last_progress_at"],
            transferred_bytes=int(m["transferred_bytes"]),
            finished=bool(m["finished"]),
            run_started_at=float(m.get("run_started_at", 0.0)),
            run_items=_items(m.get("run_items")),
            last_log_failure=_evidence(m.get("last_log_failure")),
            total_bytes=int(m.get("total_bytes", 0)),
            admitted=str(m.get("admitted", "")),
            freeze_expired=bool(m.get("freeze_expired", False)),
            size_bytes=_size(m.get("size_bytes")),
            sized_at=float(m.get("sized_at", 0.0)),
            size_error=str(m.get("size_error", "")),
        )
    return GuardState(
        volumes=volumes, migrations=migrations, incident_seq=int(data["incident_seq"])
    )


class StateStore:
    """The state file. The caller (the loop) hands over a state snapshot (immutable: the
    policy copies before it changes anything); one writer thread (`BackgroundWriter`)
    encodes and writes it, and keeps only the latest: behind a slow disk the guard writes
    less often, never a backlog of stale copies, and never two writes of this file at once.
    A state that cannot be written (disk full, read-only, EACCES, a directory in the way)
    stays queued and is retried with backoff; the last good file stays in place (atomic
    writes), and `health()` says what is wrong."""

    KEY = "state.json"

    def __init__(self, state_dir: Path, writer: BackgroundWriter | None = None) -> None:
        self.path = state_dir / "state.json"
        self.problem = ""  # set when the saved file had to be set aside: reported in status
        self._written: bytes = b""  # what the file holds (writer thread, or load before it)
        self.writes = 0  # files written (an unchanged state is not written again)
        self.writer = writer or BackgroundWriter("state writer", max_pending=1)

    def load(self) -> Saved | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:  # a directory, EACCES, EIO: never a crash loop
            self._set_aside(f"saved state cannot be read ({error.strerror or error})")
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(
                    f"unknown format (version {data.get('version')!r})"
                    if isinstance(data, dict)
                    else "not a JSON object"
                )
            saved = Saved(
                state=_restore(data["state"]),
                log_positions={k: dict(v) for k, v in data["log_positions"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self._set_aside(f"saved state is unreadable ({type(error).__name__}: {error})")
            return None
        self._written = raw
        return saved

    def _set_aside(self, why: str) -> None:
        """Keep the bad file for a person (never delete it) and start clean; if even the
        rename fails (read-only), say so: the writer then reports every failed write."""
        try:
            aside = set_aside(self.path, why)
        except OSError as error:
            self.problem = f"{why}; could not set it aside either ({error.strerror or error})"
            log.error("%s: %s", self.path, self.problem)
            return
        self.problem = f"{why}; set aside as {aside}"

    def encode(
        self, state: GuardState, log_positions: Mapping[str, Mapping[str, int]]
    ) -> bytes | None:
        """The file's content, or None when it is what the file already holds."""
        data = json.dumps(
            {"version": STATE_VERSION, "state": durable(state), "log_positions": log_positions},
            sort_keys=True,
        ).encode()
        return None if data == self._written else data

    def save_soon(self, state: GuardState, log_positions: Mapping[str, Mapping[str, int]]) -> bool:
        """Hand the state to the writer thread (it replaces a state still waiting there),
        which encodes it and writes it if anything durable changed. Costs the caller no
        encoding and no disk: an fsync must not delay the loop, nor a freeze that the same
        decision just sent."""
        positions = {key: dict(value) for key, value in log_positions.items()}
        return self.writer.submit(self.KEY, functools.partial(self._write, state, positions))

    def save(
        self,
        state: GuardState,
        log_positions: Mapping[str, Mapping[str, int]],
        timeout: float = 5.0,
    ) -> bool:
        """Write now (at shutdown, in tests): False when nothing changed; raises OSError
        when it could not be written within `timeout` (it stays queued)."""
        before = self.writes
        self.save_soon(state, log_positions)
        if not self.writer.flush(timeout):
            health = self.writer.health()
            raise OSError(health.last_error or f"not written within {timeout:g}s")
        return self.writes > before

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait for the writer; False when a write is still failing or waiting."""
        return self.writer.flush(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        return self.writer.close(timeout)

    def health(self) -> WriterHealth:
        return self.writer.health()

    def _write(self, state: GuardState, positions: Mapping[str, Mapping[str, int]]) -> None:
        """On the writer thread only."""
        data = self.encode(state, positions)
        if data is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, data)
        self._written = data
        self.writes += 1
