"""The incident store: an in-memory index (list and counts never re-read the directory),
writes on a background writer, incidents the disk refuses kept in memory (bounded) and
retried, acknowledged incidents pruned by count and age, unacknowledged ones never.

The faults are real files in tmp_path: a file where the incidents directory goes makes
every mkdir fail, for root too; the integration test (test_incident_faults.py) fills and
locks a real state volume under the real guard."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from spaceguard.atomicfile import BackgroundWriter
from spaceguard.incidents import IncidentStore

WAIT = 10.0
T0 = 1_763_900_000.0


def record(number: int, account: str = "alice", when: float = T0) -> dict[str, Any]:
    return {
        "id": f"20251123T120000Z-{account}-{number}",
        "account": account,
        "unit": f"m365-migrate@{account}.service",
        "units": [f"m365-migrate@{account}.service"],
        "time": when + number,
        "trigger": "exit",
        "class": "transient",
        "detail": "exited with status 5",
        "outcome": "retry 1 of 3",
        "steps": ["stopped"],
    }


def store_in(directory: Path, **writer: Any) -> IncidentStore:
    settings = {"initial_backoff": 0.01, "max_backoff": 0.02, **writer}
    store = IncidentStore(directory, BackgroundWriter("incident writer", **settings))
    store.load()
    return store


def on_disk(directory: Path, incident_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / f"{incident_id}.json").read_text())
    return data


def test_list_and_counts_come_from_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_in(tmp_path)
    for number in range(1, 4):
        store.write(record(number), ["context"], {"note": "none"})
    again = store_in(tmp_path)  # a restart: read once
    assert [s["id"] for s in again.list()] == [record(n)["id"] for n in (1, 2, 3)]

    def no_disk(*args: object, **kwargs: object) -> object:
        raise AssertionError("the directory was read again")

    monkeypatch.setattr(Path, "read_bytes", no_disk)
    monkeypatch.setattr(Path, "glob", no_disk)
    for _ in range(100):  # what every incident and every ack used to cost: a re-parse
        assert again.open_counts() == {"alice": 3}
        assert len(again.list("alice")) == 3
    store.writer.close()
    again.writer.close()


def test_an_incident_the_disk_refuses_is_kept_shown_acked_and_written_later(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "incidents"
    directory.write_text("a file where the directory goes")
    store = store_in(directory)
    incident_id = store.record(record(1), ["line before", "the error"], {"note": "none"})
    assert incident_id == record(1)["id"]
    assert not store.writer.flush(WAIT)  # refused: kept
    health = store.writer.health()
    assert not health.writable and health.pending == 1
    shown = store.get(incident_id)
    assert shown is not None and "not on disk yet" in shown["unwritten"]
    assert "the error" in shown["text"]
    assert store.open_counts() == {"alice": 1}
    assert store.ack(incident_id, "uid 0 (root)", T0 + 100) == (True, f"{incident_id} acknowledged")
    assert store.open_counts() == {}
    directory.unlink()  # the fault clears: the next retry writes the latest version
    assert store.writer.flush(WAIT)
    data = on_disk(directory, incident_id)
    assert data["acked_by"] == "uid 0 (root)" and data["context"][-1] == "the error"
    assert "Acknowledged by uid 0 (root)" in (directory / f"{incident_id}.txt").read_text()
    assert not store.is_unwritten(incident_id) and store.get(incident_id) is not None
    store.writer.close()


def test_unwritten_incidents_are_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "incidents"
    directory.write_text("")
    store = store_in(directory, max_pending=2)
    assert store.record(record(1), [], {}) is not None
    assert store.record(record(2), [], {}) is not None
    assert store.record(record(3), [], {}) is None  # a third would grow without bound
    assert store.lost_total == 1 and store.unwritten == 2
    assert "could not be kept" in caplog.text
    assert [s["id"] for s in store.list()] == [record(1)["id"], record(2)["id"]]
    store.writer.close()


def test_an_ack_never_waits_for_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_in(tmp_path)
    assert store.write(record(1), [], {}).exists()
    release = threading.Event()
    real = store._write_files

    def slow(full: dict[str, Any]) -> None:
        assert release.wait(WAIT)
        real(full)

    monkeypatch.setattr(store, "_write_files", slow)
    ok, _ = store.ack(record(1)["id"], "uid 0 (root)", T0 + 5)  # returns at once
    assert ok and store.open_counts() == {}
    assert on_disk(tmp_path, record(1)["id"])["acked_by"] == ""  # not yet on disk
    release.set()
    assert store.writer.flush(WAIT)
    assert on_disk(tmp_path, record(1)["id"])["acked_by"] == "uid 0 (root)"
    store.writer.close()


def test_a_new_incident_gets_a_free_id(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    first = store.record(record(1), [], {}, new=True)
    second = store.record(record(1), [], {}, new=True)
    assert (first, second) == (record(1)["id"], record(1)["id"] + "-2")
    store.writer.close()


def test_pruning_keeps_the_newest_acknowledged_and_every_open_one(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    for number in range(1, 7):
        store.record(record(number), [], {})
    for number in range(1, 5):  # 1..4 acknowledged, 5 and 6 open
        store.ack(record(number)["id"], "root", T0 + 1000 + number)
    assert store.writer.flush(WAIT)
    pruned = store.prune(T0 + 2000, keep=2, max_age=0)
    assert pruned == [record(2)["id"], record(1)["id"]]
    assert store.writer.flush(WAIT)
    remaining = sorted(p.name for p in tmp_path.glob("*.json"))
    assert remaining == sorted(f"{record(n)['id']}.json" for n in (3, 4, 5, 6))
    assert not list(tmp_path.glob(f"{record(1)['id']}.*"))  # the .txt too
    # by age: acknowledged more than 500 s before "now"
    assert store.prune(T0 + 1503.5, keep=100, max_age=500) == [record(3)["id"]]
    assert store.open_counts() == {"alice": 2}
    # a restart sees the same: the pruned files are gone, open ones stay
    assert store.writer.flush(WAIT)
    again = store_in(tmp_path)
    assert [s["id"] for s in again.list()] == [record(n)["id"] for n in (4, 5, 6)]
    store.writer.close()
    again.writer.close()


def test_ack_account_takes_them_all_at_the_writers_pace(tmp_path: Path) -> None:
    """`spaceguardctl ack --account` on a migration that failed 100 times: more acks than
    the incident writer holds (64), so the guard waits for it between them; every one is
    acknowledged on disk, bob's are left alone, and pruning keeps its bound."""
    import asyncio

    from spaceguard.config import parse
    from spaceguard.daemon import Guard

    document = {
        "guard": {
            "state_dir": str(tmp_path / "state"),
            "control_socket": str(tmp_path / "control.sock"),
            "acked_incidents_keep": 30,
        },
        "volumes": {"space": {"path": str(tmp_path), "require_mount": False}},
        "migrations": [
            {"account": "alice", "unit": "m365-migrate@alice.service", "volume": "space"}
        ],
    }
    config = parse(tmp_path / "spaceguard.toml", document)

    async def body() -> tuple[tuple[bool, str], tuple[bool, str], tuple[bool, str]]:
        guard = Guard(tmp_path / "spaceguard.toml", config)
        store = guard.incident_store
        for number in range(100):
            store.write(record(number), [], {})
        store.write(record(1, account="bob"), [], {})
        done = await guard.ack_account("alice", "uid 0 (root)")
        again = await guard.ack_account("alice", "uid 0 (root)")
        unknown = await guard.ack_account("carol", "uid 0 (root)")
        assert store.writer.flush(WAIT)
        assert store.open_counts() == {"bob": 1}
        assert guard.open_incidents == {"bob": 1}
        kept = [item for item in store.list("alice")]
        assert len(kept) == 30 and all(item["acked_by"] == "uid 0 (root)" for item in kept)
        assert all(on_disk(store.directory, item["id"])["acked_by"] for item in kept)
        assert len(list(store.directory.glob("*alice*.json"))) == 30  # the rest pruned
        guard.store.close()
        store.writer.close()
        return done, again, unknown

    done, again, unknown = asyncio.run(body())
    assert done == (True, "alice: 100 incidents acknowledged")
    assert again == (True, "alice has no open incidents")
    assert unknown == (False, "no migration and no incident for account 'carol'")


def test_pruning_takes_what_the_writer_has_room_for_and_keeps_the_rest_listed(
    tmp_path: Path,
) -> None:
    store = store_in(tmp_path, max_pending=2)
    for number in range(5):
        store.write(record(number), [], {})
        store.ack(record(number)["id"], "uid 0 (root)", T0 + 10)
        assert store.writer.flush(WAIT)
    first = store.prune(T0 + 20, keep=0)
    assert len(first) == 2  # the writer holds 2: before, the other 3 left the index only
    assert len(store.list()) == 3
    assert store.writer.flush(WAIT)
    assert len(store.prune(T0 + 20, keep=0)) == 2
    assert store.writer.flush(WAIT)
    assert len(store.prune(T0 + 20, keep=0)) == 1
    assert store.writer.flush(WAIT)
    assert store.list() == [] and list(tmp_path.glob("*.json")) == []
    store.writer.close()
