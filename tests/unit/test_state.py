"""state.py: the durable state file: atomic writes, round trips, bad files set aside."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spaceguard import atomicfile
from spaceguard.atomicfile import write_atomic
from spaceguard.model import (
    Failure,
    FailureClass,
    GuardState,
    Hold,
    LogEvidence,
    MigrationState,
    VolumeState,
)
from spaceguard.state import STATE_VERSION, StateStore, _restore, durable

T0 = 1_750_000_000.0


def sample_state() -> GuardState:
    failure = Failure(
        failure_class=FailureClass.TRANSIENT,
        trigger="unit-failed",
        detail="m365-migrate@bob.service failed (result=exit-code exited=5)",
        since=T0 - 60,
        phase="waiting-retry",
        lines=("ERROR : 429 Too Many",),
        exit_status="result=exit-code exited=5",
        incident_id="20250615T000000Z-bob-3",
        verify_result="passed",
        steps=("a", "b"),
        next_retry_at=T0 + 90.5,
    )
    return GuardState(
        volumes={
            "space": VolumeState(
                up=True,
                avail_bytes=123,
                low=True,
                low_reason="space",
                low_since=T0 - 600,
                recovered_since=T0 - 5,
            )
        },
        migrations={
            "alice": MigrationState(
                account="alice",
                hold=Hold("guard", "space", T0 - 600),
                paused_units=frozenset({"a.service", "b.service"}),
                restart_on_release=True,
                retries=1,
                last_progress_at=T0 - 700.25,
                transferred_bytes=10**12,
            ),
            "bob": MigrationState(
                account="bob",
                failure=failure,
                retries=2,
                override=True,
                hold=Hold("operator", "operator", T0, note="maintenance"),
            ),
            "carol": MigrationState(account="carol", finished=True),
        },
        bus_connected=True,
        incident_seq=3,
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "state.json")


# --- durable round trip ------------------------------------------------------------------


def test_durable_round_trip() -> None:
    saved = sample_state()
    restored = _restore(json.loads(json.dumps(durable(saved))))
    assert durable(restored) == durable(saved)
    assert restored.incident_seq == 3
    alice, bob = restored.migrations["alice"], restored.migrations["bob"]
    assert alice.hold == Hold("guard", "space", T0 - 600)
    assert alice.paused_units == {"a.service", "b.service"}
    assert alice.restart_on_release and alice.retries == 1
    assert alice.last_progress_at == T0 - 700.25 and alice.transferred_bytes == 10**12
    assert bob.failure == saved.migrations["bob"].failure  # tuples, not lists
    assert bob.override and bob.hold.note == "maintenance"
    assert restored.migrations["carol"].finished
    # live views are not kept: they are re-read and reconciled
    space = restored.volumes["space"]
    assert (space.low, space.low_reason, space.low_since) == (True, "space", T0 - 600)
    assert not space.up and space.recovered_since is None
    assert not restored.bus_connected


def test_store_save_and_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    positions = {"alice": {"inode": 42, "offset": 1000}}
    assert store.save(sample_state(), positions)
    assert not store.save(sample_state(), positions)  # nothing changed: no write
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o640
    loaded = StateStore(tmp_path).load()
    assert loaded is not None
    assert durable(loaded.state) == durable(sample_state())
    assert loaded.log_positions == positions
    assert leftovers(tmp_path) == []


def test_store_creates_its_directory(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "lib" / "spaceguard")
    assert store.save(GuardState(), {})
    assert StateStore(tmp_path / "lib" / "spaceguard").load() is not None


def test_no_file_is_a_clean_start(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() is None
    assert store.problem == ""


# --- atomic writes -------------------------------------------------------------------------


def test_write_atomic_replaces(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "rename"])
def test_a_crash_mid_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b'{"old": true}')

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if fail_at == "write":
        real_fdopen = os.fdopen

        class Failing:
            def __init__(self, fd: int, mode: str) -> None:
                self.handle = real_fdopen(fd, mode)

            def __enter__(self) -> Failing:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

            def write(self, data: bytes) -> int:
                self.handle.write(data[: len(data) // 2])  # half of it, then the disk is full
                raise OSError(28, "No space left on device")

        monkeypatch.setattr(atomicfile.os, "fdopen", Failing)
    elif fail_at == "fsync":
        monkeypatch.setattr(atomicfile.os, "fsync", boom)
    else:
        monkeypatch.setattr(atomicfile.os, "rename", boom)
    with pytest.raises(OSError):
        write_atomic(path, b'{"new": true, "padding": "' + b"x" * 10000 + b'"}')
    monkeypatch.undo()
    assert path.read_bytes() == b'{"old": true}'
    assert leftovers(tmp_path) == []  # the temporary file is cleaned up


def test_the_new_file_is_complete_or_absent(tmp_path: Path) -> None:
    """Every write goes to a temporary name first: at no point does state.json hold a
    partial document (checked by reading it after every rename)."""
    path = tmp_path / "state.json"
    for size in (10, 100_000, 10, 1_000_000):
        data = json.dumps({"x": "y" * size}).encode()
        write_atomic(path, data)
        assert json.loads(path.read_bytes()) == {"x": "y" * size}


# --- bad files are set aside -------------------------------------------------------------------


def corrupt_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("state.json.corrupt-*"))


@pytest.mark.parametrize(
    "content",
    [
        b'{"version": 1, "state": {"incident_seq": 1, "volu',  # cut short
        b"\x00\x00\x00\x00",
        b"",
        b"[1, 2, 3]",
        b'"just a string"',
        json.dumps({"version": 1}).encode(),  # keys missing
        json.dumps(
            {
                "version": 1,
                "state": {"incident_seq": "x", "volumes": {}, "migrations": {}},
                "log_positions": {},
            }
        ).encode(),
        json.dumps(
            {
                "version": 1,
                "state": {
                    "incident_seq": 0,
                    "volumes": {},
                    "migrations": {"a": {"hold": {"by": "guard"}}},
                },
                "log_positions": {},
            }
        ).encode(),
    ],
)
def test_a_corrupt_file_is_set_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    store = StateStore(tmp_path)
    assert store.load() is None
    assert store.problem and "set aside" in store.problem
    (aside,) = corrupt_files(tmp_path)
    assert aside.read_bytes() == content  # kept for a person to read, never deleted
    assert str(aside) in store.problem
    assert not (tmp_path / "state.json").exists()
    # and the guard goes on: the next save writes a fresh file
    assert store.save(GuardState(), {})
    assert StateStore(tmp_path).load() is not None


@pytest.mark.parametrize("version", [0, 2, 99, "1", None])
def test_an_unknown_version_is_set_aside(tmp_path: Path, version: object) -> None:
    good = json.loads(
        json.dumps(
            {"version": STATE_VERSION, "state": durable(sample_state()), "log_positions": {}}
        )
    )
    good["version"] = version
    (tmp_path / "state.json").write_text(json.dumps(good), encoding="utf-8")
    store = StateStore(tmp_path)
    assert store.load() is None
    assert "version" in store.problem
    assert len(corrupt_files(tmp_path)) == 1


# --- any durable state survives ----------------------------------------------------------------

TIMES = st.floats(min_value=0, max_value=4e9, allow_nan=False)
TEXT = st.text(max_size=20)
HOLDS = st.none() | st.builds(
    Hold, by=st.sampled_from(["guard", "operator"]), reason=TEXT, since=TIMES, note=TEXT
)
FAILURES = st.none() | st.builds(
    Failure,
    failure_class=st.sampled_from([FailureClass.TRANSIENT, FailureClass.UNRECOVERABLE]),
    trigger=st.sampled_from(["unit-failed", "log", "stall"]),
    detail=TEXT,
    since=TIMES,
    phase=st.sampled_from(
        ["stopping", "verifying", "documenting", "waiting-retry", "needs-operator"]
    ),
    lines=st.lists(TEXT, max_size=3).map(tuple),
    exit_status=TEXT,
    incident_id=TEXT,
    verify_result=TEXT,
    steps=st.lists(TEXT, max_size=3).map(tuple),
    next_retry_at=st.none() | TIMES,
    evidence=st.none()
    | st.builds(
        LogEvidence,
        failure_class=st.sampled_from(list(FailureClass)),
        rule=TEXT,
        line=TEXT,
        seq=st.integers(0, 2**40),
        before=st.lists(TEXT, max_size=3).map(tuple),
    ),
)
MIGRATIONS = st.builds(
    MigrationState,
    account=st.just("x"),
    hold=HOLDS,
    paused_units=st.frozensets(st.sampled_from(["a.service", "b.service"])),
    restart_on_release=st.booleans(),
    override=st.booleans(),
    failure=FAILURES,
    retries=st.integers(0, 100),
    last_progress_at=st.none() | TIMES,
    transferred_bytes=st.integers(0, 2**62),
    finished=st.booleans(),
)


@settings(max_examples=100, deadline=None)
@given(
    migrations=st.dictionaries(st.sampled_from(["alice", "bob", "carol"]), MIGRATIONS),
    low=st.booleans(),
    reason=TEXT,
    since=TIMES,
    seq=st.integers(0, 10**6),
)
def test_any_durable_state_round_trips(
    migrations: dict[str, MigrationState], low: bool, reason: str, since: float, seq: int
) -> None:
    state = GuardState(
        volumes={"space": VolumeState(low=low, low_reason=reason, low_since=since)},
        migrations={
            account: MigrationState(**{**m.__dict__, "account": account})
            for account, m in migrations.items()
        },
        incident_seq=seq,
    )
    data = json.dumps(
        {"version": STATE_VERSION, "state": durable(state), "log_positions": {}}, sort_keys=True
    )
    assert durable(_restore(json.loads(data)["state"])) == durable(state)
