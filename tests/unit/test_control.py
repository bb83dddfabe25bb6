"""The control socket and spaceguardctl, end to end on a real Unix socket.

A real ControlServer listens in a temporary directory; the backend is a small recording
stand-in (the server is under test here, not the daemon). spaceguardctl runs as a
subprocess, as an operator would run it; the permission tests run it as uid 65534 with
`setpriv` (they need root and skip without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import functools
import grp
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox import readable_package_dir, require

DAEMON_DIR = Path(__file__).resolve().parents[2] / "daemon"
if str(DAEMON_DIR) not in sys.path:
    sys.path.insert(0, str(DAEMON_DIR))

from spaceguard import __version__  # noqa: E402
from spaceguard.control import (  # noqa: E402
    Access,
    ControlError,
    ControlServer,
    Peer,
    handle_line,
    peer_groups,
)
from spaceguard.protocol import MAX_LINE_BYTES  # noqa: E402

NOBODY_UID = 65534
NOBODY_GID = 65534
NOW = time.time()

STATUS: dict[str, Any] = {
    "version": __version__,
    "ready": True,
    "bus_connected": True,
    "config": "/etc/spaceguard/spaceguard.toml",
    "config_problem": "",
    "state_problem": "",
    "volumes": [
        {
            "name": "space",
            "path": "/space",
            "up": True,
            "error": "",
            "avail_bytes": 3 * 1024**3,
            "size_bytes": 100 * 1024**3,
            "avail_files": 900_000,
            "files": 1_000_000,
            "fill_rate": 12 * 1024**2,
            "seconds_to_pause": 200.0,
            "low": True,
            "low_reason": "bytes",
            "pause_below": "5%",
            "resume_above": "10%",
        },
        {
            "name": "scratch",
            "path": "/scratch",
            "up": False,
            "error": "not mounted",
            "avail_bytes": 0,
            "size_bytes": 0,
            "avail_files": 0,
            "files": 0,
            "fill_rate": 0.0,
            "seconds_to_pause": None,
            "low": False,
            "low_reason": "",
            "pause_below": "5%",
            "resume_above": "10%",
        },
    ],
    "migrations": [
        {
            "account": "alice",
            "unit": "m365-migrate@alice.service",
            "units": {"m365-migrate@alice.service": {"active_state": "active"}},
            "volume": "space",
            "state": "paused",
            "hold": {
                "by": "operator",
                "reason": "operator",
                "since": NOW - 300,
                "note": "disk swap \x1b[31m",
            },
            "failure": None,
            "retries": 0,
            "max_retries": 3,
            "transferred_bytes": 5 * 1024**3,
            "last_progress_at": NOW - 12,
        },
        {
            "account": "bob",
            "unit": "m365-migrate@bob.service",
            "units": {},
            "volume": "space",
            "state": "failed",
            "hold": None,
            "failure": {
                "class": "unrecoverable",
                "trigger": "log",
                "detail": "token expired",
                "phase": "needs-operator",
                "incident": "20240101T000000Z-bob-1",
                "next_retry_at": None,
            },
            "retries": 3,
            "max_retries": 3,
            "transferred_bytes": 0,
            "last_progress_at": None,
        },
    ],
}
INCIDENT: dict[str, Any] = {
    "id": "20240101T000000Z-bob-1",
    "account": "bob",
    "unit": "m365-migrate@bob.service",
    "time": 1704067200.0,
    "trigger": "log",
    "class": "unrecoverable",
    "detail": "token expired",
    "outcome": "needs operator",
    "acked_by": "",
    "text": "Incident 20240101T000000Z-bob-1\n  account:   bob\n",
}


def status_now() -> dict[str, Any]:
    """STATUS with its times moved from NOW (import time) to this call, so that "5m00s ago"
    holds however long the suite ran before a test."""
    shift = time.time() - NOW
    status = copy.deepcopy(STATUS)
    for migration in status["migrations"]:
        if migration.get("hold"):
            migration["hold"]["since"] += shift
        if migration.get("last_progress_at"):
            migration["last_progress_at"] += shift
    return status


class RecordingBackend:
    """Answers like the daemon would, and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = False
        self.fail_with: Exception | None = None
        self.operator_delay = 0.0
        self.last_status: dict[str, Any] = {}

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def status(self) -> dict[str, Any]:
        self.calls.append(("status",))
        self._maybe_fail()
        self.last_status = status_now()
        return self.last_status

    async def operator(
        self, verb: str, account: str, reason: str, force: bool, who: str
    ) -> tuple[bool, str]:
        self.calls.append(("operator", verb, account, reason, force, who))
        self._maybe_fail()
        if self.operator_delay:
            await asyncio.sleep(self.operator_delay)
        if self.refuse:
            return False, f"{account}: not paused"
        return True, f"{account}: {verb} done"

    def incidents(self, account: str | None) -> list[dict[str, Any]]:
        self.calls.append(("incidents", account))
        self._maybe_fail()
        return [{key: INCIDENT[key] for key in INCIDENT if key != "text"}]

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        self.calls.append(("incident", incident_id))
        self._maybe_fail()
        return INCIDENT if incident_id == INCIDENT["id"] else None

    def ack(self, incident_id: str, who: str) -> tuple[bool, str]:
        self.calls.append(("ack", incident_id, who))
        self._maybe_fail()
        if self.refuse:
            return False, f"no incident {incident_id!r}"
        return True, f"{incident_id} acknowledged"

    async def ack_account(self, account: str, who: str) -> tuple[bool, str]:
        self.calls.append(("ack_account", account, who))
        self._maybe_fail()
        return True, f"{account}: 2 incidents acknowledged"

    async def reload(self) -> tuple[bool, str]:
        self.calls.append(("reload",))
        self._maybe_fail()
        if self.refuse:
            return False, "kept the old config: volumes.space.path: missing (required)"
        return True, "reloaded"

    async def check_config(self, path: str | None) -> tuple[bool, str]:
        self.calls.append(("check_config", path))
        self._maybe_fail()
        if self.refuse:
            return False, f"{path}: not valid TOML"
        return True, f"{path or 'config'}: OK (1 volumes, 2 migrations)"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is root-only), with a short
    path (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sg-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(
    path: Path,
    backend: RecordingBackend,
    reader_group: str = "",
    admin_group: str = "",
    **options: Any,
) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, reader_group, admin_group, backend, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(60):
            return await body()

    return asyncio.run(main())


async def exchange(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send lines on one connection, read one reply per line."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        replies = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        return replies
    finally:
        writer.close()


def request(verb: str, **args: Any) -> bytes:
    return json.dumps({"v": 1, "verb": verb, "args": args}).encode() + b"\n"


# --- spaceguardctl as a subprocess ---------------------------------------------------------


@functools.cache
def _python_for(uid: int | None) -> str:
    """A python3 the given uid can run (ours lives under /root when it is pyenv's)."""
    if uid is None:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [
                "setpriv",
                "--reuid",
                str(uid),
                "--regid",
                str(uid),
                "--clear-groups",
                candidate,
                "-c",
                "import json",
            ],
            capture_output=True,
            cwd="/",
        )
        if probe.returncode == 0:
            return candidate
    require(False, f"no python3 that uid {uid} can run")
    raise AssertionError("unreachable")


async def ctl(
    socket_path: Path | None,
    *argv: str,
    as_uid: int | None = None,
    env: dict[str, str] | None = None,
    groups: str | None = None,
) -> tuple[int, str, str]:
    """Run spaceguardctl (as `as_uid`, holding the supplementary `groups`, comma-separated
    names or gids, or none)."""
    command = [_python_for(as_uid), "-m", "spaceguard.ctl"]
    if socket_path is not None:
        command += ["--socket", str(socket_path)]
    command += list(argv)
    if as_uid is not None:
        command = [
            "setpriv",
            "--reuid",
            str(as_uid),
            "--regid",
            str(as_uid),
            *(["--groups", groups] if groups else ["--clear-groups"]),
            *command,
        ]
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(DAEMON_DIR if as_uid is None else readable_package_dir()),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
        cwd="/",
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


# --- every verb ------------------------------------------------------------------------------

ROOT_WHO = "uid 0 (root)"
VERB_CASES: list[tuple[list[str], tuple[Any, ...], list[str]]] = [
    # (argv, the backend call it makes, what the human output shows)
    (
        ["status"],
        ("status",),
        [
            "VOLUMES",
            "FREE %",
            "TIME TO PAUSE",
            "space",
            "/space",
            "3.0 GiB",
            "3.0%",
            "900,000 (90.0%)",
            "12.0 MiB/s",
            "LOW: bytes",
            "UNAVAILABLE: not mounted",
            "MIGRATIONS",
            "PAUSED BY / REASON / SINCE",
            "alice",
            "m365-migrate@alice.service",
            "operator: disk swap \\x1b[31m, 5m00s ago",
            "5.0 GiB",
            "12s ago",
            "unrecoverable/log, needs-operator, incident 20240101T000000Z-bob-1, token expired",
            "3/3",
            "D-Bus connected",
        ],
    ),
    (
        ["pause", "alice", "--reason", "disk swap"],
        ("operator", "pause", "alice", "disk swap", False, ROOT_WHO),
        ["alice: pause done"],
    ),
    (
        ["pause", "alice"],
        ("operator", "pause", "alice", "", False, ROOT_WHO),
        ["alice: pause done"],
    ),
    (
        ["resume", "alice", "--force"],
        ("operator", "resume", "alice", "", True, ROOT_WHO),
        ["alice: resume done"],
    ),
    (
        ["resume", "alice"],
        ("operator", "resume", "alice", "", False, ROOT_WHO),
        ["alice: resume done"],
    ),
    (["retry", "bob"], ("operator", "retry", "bob", "", False, ROOT_WHO), ["bob: retry done"]),
    (
        ["incidents"],
        ("incidents", None),
        [
            "ID",
            "TIME (UTC)",
            "20240101T000000Z-bob-1",
            "2024-01-01 00:00:00",
            "unrecoverable",
            "token expired",
        ],
    ),
    (["incidents", "--account", "bob"], ("incidents", "bob"), ["20240101T000000Z-bob-1"]),
    (
        ["show", "20240101T000000Z-bob-1"],
        ("incident", "20240101T000000Z-bob-1"),
        ["Incident 20240101T000000Z-bob-1\n  account:   bob\n"],
    ),
    (
        ["ack", "20240101T000000Z-bob-1"],
        ("ack", "20240101T000000Z-bob-1", ROOT_WHO),
        ["20240101T000000Z-bob-1 acknowledged"],
    ),
    (
        ["ack", "--account", "bob"],
        ("ack_account", "bob", ROOT_WHO),
        ["bob: 2 incidents acknowledged"],
    ),
    (["reload"], ("reload",), ["reloaded"]),
    (["check-config"], ("check_config", None), ["config: OK"]),
    (["check-config", "/etc/x.toml"], ("check_config", "/etc/x.toml"), ["/etc/x.toml: OK"]),
    (["version"], (), [f"spaceguardctl {__version__}", f"spaceguard {__version__} (protocol 1)"]),
]


@pytest.mark.parametrize(
    ("argv", "call", "shown"), VERB_CASES, ids=[" ".join(case[0]) for case in VERB_CASES]
)
def test_ctl_verb_human_and_json(
    socket_dir: Path, argv: list[str], call: tuple[Any, ...], shown: list[str]
) -> None:
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            code, out, err = await ctl(path, *argv)
            assert (code, err) == (0, "")
            for text in shown:
                assert text in out
            assert "\x1b" not in out  # control characters from the guard are escaped
            assert backend.calls == ([call] if call else [])
            backend.calls.clear()
            code, out, err = await ctl(path, "--json", *argv)
            assert (code, err) == (0, "")
            result = json.loads(out)
            assert backend.calls == ([call] if call else [])
            if argv[0] == "status":
                assert result["migrations"][0]["hold"]["note"] == "disk swap \x1b[31m"
                assert result["volumes"][1]["seconds_to_pause"] is None
            elif argv[0] == "show":
                assert result == INCIDENT
            elif argv[0] == "incidents":
                assert result[0]["id"] == INCIDENT["id"]
            elif argv[0] == "version":
                assert result == {"version": __version__, "protocol": 1}
            else:
                assert result == {"message": shown[0]} or shown[0] in result["message"]

    run(body)


def test_common_options_after_the_verb_and_from_the_environment(socket_dir: Path) -> None:
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            code, out, _ = await ctl(None, "status", "--json", "--socket", str(path))
            assert code == 0 and json.loads(out)["version"] == __version__
            code, out, _ = await ctl(None, "version", env={"SPACEGUARD_SOCKET": str(path)})
            assert code == 0 and "protocol 1" in out

    run(body)


def test_ctl_exit_codes(socket_dir: Path) -> None:
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            backend.refuse = True
            code, out, err = await ctl(path, "resume", "alice")
            assert (code, out, err) == (1, "", "spaceguardctl: alice: not paused\n")
            code, _, err = await ctl(path, "reload")
            assert code == 1 and err.startswith("spaceguardctl: kept the old config")
            code, _, err = await ctl(path, "check-config", "/etc/bad.toml")
            assert code == 1 and "not valid TOML" in err
            code, _, err = await ctl(path, "show", "no-such-incident")
            assert (code, err) == (1, "spaceguardctl: no incident 'no-such-incident'\n")
            code, _, err = await ctl(path, "pause", "../etc")
            assert code == 1 and "account" in err and err.count("\n") == 1
            backend.fail_with = RuntimeError("state store on fire")
            code, _, err = await ctl(path, "status")
            assert code == 1 and "state store on fire" in err
            for argv in (
                ["frobnicate"],
                ["pause"],
                ["resume", "a", "--bogus"],
                [],
                ["status", "--timeout", "-1"],
            ):
                code, out, err = await ctl(path, *argv)
                assert code == 2 and out == "" and "usage:" in err

    run(body)
    # exit 3: say which problem, and the path
    code, _, err = run(lambda: ctl(socket_dir / "missing.sock", "status"))
    assert code == 3 and "no such socket" in err and "missing.sock" in err
    stale = socket_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        unbound.bind(str(stale))  # a socket file nothing listens on
        code, _, err = run(lambda: ctl(stale, "status"))
    assert code == 3 and "connection refused" in err and str(stale) in err


def test_ctl_times_out_when_the_guard_does_not_answer(socket_dir: Path) -> None:
    backend = RecordingBackend()
    backend.operator_delay = 5.0
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            # the backend answers after 5 s: a ctl that did not give up would exit 0
            code, _, err = await ctl(path, "--timeout", "0.5", "pause", "alice")
            assert code == 1 and "no reply within 0.5 s" in err

    run(body)


# --- the protocol, raw ------------------------------------------------------------------------


def test_every_verb_round_trips_on_one_connection(socket_dir: Path) -> None:
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            replies = await exchange(
                path,
                b'{"v": 1, "verb": "status", "id": 1}\n',
                b'{"v": 1, "verb": "version", "id": "two"}\n',
                request("incidents"),
                request("incidents", account="bob"),
                request("show", incident=INCIDENT["id"]),
                request("check-config"),
                request("check-config", path="/etc/x.toml"),
                request("pause", account="alice", reason="why"),
                request("resume", account="alice", force=True),
                request("retry", account="alice"),
                request("ack", incident=INCIDENT["id"]),
                request("reload"),
            )
        assert all(reply["ok"] and reply["v"] == 1 for reply in replies), replies
        assert replies[0]["id"] == 1 and replies[1]["id"] == "two"
        assert "id" not in replies[2]
        assert replies[0]["result"] == backend.last_status
        assert replies[1]["result"] == {"version": __version__, "protocol": 1}
        assert replies[7]["result"] == {"message": "alice: pause done"}
        assert backend.calls == [
            ("status",),
            ("incidents", None),
            ("incidents", "bob"),
            ("incident", INCIDENT["id"]),
            ("check_config", None),
            ("check_config", "/etc/x.toml"),
            ("operator", "pause", "alice", "why", False, ROOT_WHO),
            ("operator", "resume", "alice", "", True, ROOT_WHO),
            ("operator", "retry", "alice", "", False, ROOT_WHO),
            ("ack", INCIDENT["id"], ROOT_WHO),
            ("reload",),
        ]

    run(body)


BAD_REQUESTS: list[tuple[bytes, str, str]] = [
    # (line, error code, a word the message must contain)
    (b"{not json\n", "bad-json", "JSON"),
    (b"\xff\xfe\n", "bad-json", "UTF-8"),
    (b"\n", "bad-json", "empty"),
    (b"[" * 5000 + b"\n", "bad-json", "deep"),
    (b'"status"\n', "bad-request", "object"),
    (b'{"verb": "status"}\n', "bad-request", "version"),
    (b'{"v": "1", "verb": "status"}\n', "bad-request", "integer"),
    (b'{"v": true, "verb": "status"}\n', "bad-request", "integer"),
    (b'{"v": 2, "verb": "status"}\n', "unsupported-version", "version 2"),
    (b'{"v": 1}\n', "bad-request", "verb"),
    (b'{"v": 1, "verb": "rm -rf"}\n', "unknown-verb", "rm -rf"),
    (b'{"v": 1, "verb": "status", "sudo": true}\n', "bad-request", "sudo"),
    (b'{"v": 1, "verb": "status", "id": [1]}\n', "bad-request", "id"),
    (b'{"v": 1, "verb": "status", "args": []}\n', "bad-request", "args"),
    (b'{"v": 1, "verb": "status", "args": {"x": 1}}\n', "bad-request", "'x'"),
    (b'{"v": 1, "verb": "pause", "args": {}}\n', "bad-request", "'account'"),
    (b'{"v": 1, "verb": "pause", "args": {"account": 7}}\n', "bad-request", "account"),
    (b'{"v": 1, "verb": "pause", "args": {"account": "-x"}}\n', "bad-request", "account"),
    (b'{"v": 1, "verb": "pause", "args": {"account": "a/../b"}}\n', "bad-request", "account"),
    (
        b'{"v": 1, "verb": "pause", "args": {"account": "a", "force": true}}\n',
        "bad-request",
        "force",
    ),
    (request("pause", account="a", reason="x" * 501), "bad-request", "reason"),
    (request("pause", account="a", reason="line\nforged"), "bad-request", "reason"),
    (request("resume", account="a", force="yes"), "bad-request", "force"),
    (request("resume", account="a", force=1), "bad-request", "force"),
    (request("show", incident="../../etc/passwd"), "bad-request", "incident"),
    (request("show"), "bad-request", "incident"),
    (request("ack", incident=""), "bad-request", "incident"),
    (request("ack"), "bad-request", "give either 'incident' or 'account'"),
    (
        request("ack", incident="20240101T000000Z-bob-1", account="bob"),
        "bad-request",
        "give either 'incident' or 'account'",
    ),
    (request("ack", account="a/../b"), "bad-request", "account"),
    (request("check-config", path="relative.toml"), "bad-request", "path"),
    (request("incidents", account=None), "bad-request", "account"),
]


def test_bad_requests_get_clear_errors_and_change_nothing(socket_dir: Path) -> None:
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            lines = [line for line, _, _ in BAD_REQUESTS]
            replies = await exchange(path, *lines, request("version"))
        for (line, code, word), reply in zip(BAD_REQUESTS, replies, strict=False):
            assert reply["v"] == 1 and reply["ok"] is False, line
            assert reply["error"]["code"] == code, (line, reply)
            assert word in reply["error"]["message"], (line, reply)
        assert replies[-1]["ok"]  # the connection survived all of them
        assert backend.calls == []

    run(body)


def test_the_reply_keeps_the_request_id_even_on_errors(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, RecordingBackend()):
            replies = await exchange(
                path,
                b'{"v": 1, "verb": "nope", "id": "abc"}\n',
                b'{"v": 1, "verb": "status", "id": 1.5}\n',
            )
        assert replies[0]["id"] == "abc" and replies[0]["error"]["code"] == "unknown-verb"
        assert "id" not in replies[1] and replies[1]["error"]["code"] == "bad-request"

    run(body)


def test_backend_exceptions_become_internal_errors(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, backend):
            backend.fail_with = KeyError("alice")
            failed = await exchange(path, request("pause", account="alice"))
            backend.fail_with = None
            after = await exchange(path, request("status"))
        assert failed[0]["error"] == {
            "code": "internal",
            "message": "pause failed: KeyError: 'alice'",
        }
        assert after[0]["ok"]

    with caplog.at_level(logging.ERROR, logger="spaceguard.control"):
        run(body)
    assert any(
        "KeyError" in (record.exc_text or "") or record.exc_info for record in caplog.records
    )


def test_results_that_are_not_json_are_reported_not_sent(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"

    class Odd(RecordingBackend):
        def status(self) -> dict[str, Any]:
            return {"path": Path("/space"), "rate": float("nan")}

        def incidents(self, account: str | None) -> list[dict[str, Any]]:
            return [{"eta": float("inf"), "nested": ({"x": -float("inf")},)}]

    async def body() -> list[dict[str, Any]]:
        async with serving(path, Odd()):
            return await exchange(path, request("status"), request("incidents"))

    status, incidents = run(body)
    assert status["error"]["code"] == "internal" and "PosixPath" in status["error"]["message"]
    assert incidents["result"] == [{"eta": None, "nested": [{"x": None}]}]


# --- bad clients ---------------------------------------------------------------------------


def test_a_line_over_64_kib_is_refused_and_the_connection_closed(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, RecordingBackend()):
            # exactly at the limit: accepted
            head = b'{"v": 1, "verb": "version"'
            at_limit = head + b" " * (MAX_LINE_BYTES - len(head) - 1) + b"}\n"
            assert len(at_limit) == MAX_LINE_BYTES + 1
            assert (await exchange(path, at_limit))[0]["ok"]
            # 100 KiB: refused, then closed
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"v": 1, "verb": "status", "args": {"x": "' + b"a" * 100 * 1024)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            reply = json.loads(await reader.readline())
            assert reply["error"]["code"] == "too-long"
            assert await reader.read() == b""  # closed
            writer.close()

    run(body)


def test_an_idle_client_is_told_and_closed(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, RecordingBackend(), idle_timeout=0.3) as server:
            reader, writer = await asyncio.open_unix_connection(str(path))
            reply = json.loads(await reader.readline())
            assert reply["error"] == {
                "code": "timeout",
                "message": "no complete request within 0.3 s; closing",
            }
            assert await reader.read() == b""
            writer.close()
            # a slow drip of bytes does not reset the deadline: the reply comes while the
            # client is still dripping (a deadline reset by every byte would never come)
            reader, writer = await asyncio.open_unix_connection(str(path))
            # read meanwhile: once a write fails, asyncio's reader raises instead of reading
            reply_line = asyncio.create_task(reader.readline())
            async with asyncio.timeout(30):
                while not reply_line.done():
                    writer.write(b" ")
                    await asyncio.sleep(0.05)
            reply = json.loads(await reply_line)
            assert reply["error"]["code"] == "timeout"
            writer.close()
            assert server.client_count == 0

    run(body)


def test_a_last_request_without_newline_is_answered(socket_dir: Path) -> None:
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, RecordingBackend()):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(request("version").rstrip(b"\n"))
            writer.write_eof()
            data = await reader.read()
            writer.close()
        assert json.loads(data)["result"]["protocol"] == 1

    run(body)


def test_hundreds_of_clients_are_answered_or_told_busy(socket_dir: Path) -> None:
    """300 clients at once, 256 allowed: every one is answered or told busy, none hangs.
    (How the guard reacts while clients crowd its socket: bench/control_latency.py.)"""
    path = socket_dir / "control.sock"
    clients = 300

    async def body() -> tuple[int, int]:
        # idle_timeout: however long 300 connections take here, none is timed out meanwhile
        async with serving(path, RecordingBackend(), max_clients=256, idle_timeout=60) as server:
            replies: list[asyncio.Task[bytes]] = []
            connected = 0
            all_connected = asyncio.Event()

            async def client() -> str:
                nonlocal connected
                reader, writer = await asyncio.open_unix_connection(str(path))
                # read meanwhile: a busy reply comes at once, and once a write fails
                # asyncio's reader raises instead of returning what it has
                reply_line = asyncio.create_task(reader.readline())
                replies.append(reply_line)
                connected += 1
                if connected == clients:
                    # connect() returns once the kernel queues us: wait for the accepts,
                    # and for the busy replies to arrive
                    while (
                        server.client_count + server.refused_busy < clients
                        or sum(line.done() for line in replies) < server.refused_busy
                    ):
                        await asyncio.sleep(0.01)
                    all_connected.set()
                await all_connected.wait()  # hold every connection open at once
                try:
                    if not reply_line.done():  # not told busy: ask
                        writer.write(request("status"))
                        await writer.drain()
                    reply = json.loads(await reply_line)
                finally:
                    writer.close()
                return "ok" if reply["ok"] else str(reply["error"]["code"])

            async with asyncio.timeout(50):  # none hangs
                outcomes = await asyncio.gather(*(client() for _ in range(clients)))
            assert set(outcomes) <= {"ok", "busy"}
            assert server.refused_busy == outcomes.count("busy")
            # the slots are free again
            assert (await exchange(path, request("version")))[0]["ok"]
            return outcomes.count("ok"), outcomes.count("busy")

    assert run(body) == (256, 44)


# --- the socket file and socket activation --------------------------------------------------


def test_socket_file_mode_group_stale_file_and_cleanup(socket_dir: Path) -> None:
    path = socket_dir / "sub" / "control.sock"

    async def body() -> None:
        # a stale socket (nothing listens) is replaced
        path.parent.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
            stale.bind(str(path))
        async with serving(
            path, RecordingBackend(), reader_group="no-such-group-sg", admin_group="nogroup"
        ):
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
            assert st.st_gid == grp.getgrnam("nogroup").gr_gid
            # a second guard on the same path refuses instead of stealing it
            with pytest.raises(ControlError, match="already listening"):
                await ControlServer(path, "", "", RecordingBackend()).start()
        assert not path.exists()  # removed on close
        # anything that is not a socket is never removed
        path.write_text("data")
        with pytest.raises(ControlError, match="not a socket"):
            await ControlServer(path, "", "", RecordingBackend()).start()
        assert path.read_text() == "data"

    require(os.geteuid() == 0, "chown to another group needs root")
    run(body)


ACTIVATED_GUARD = """
import asyncio, os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from spaceguard.control import ControlServer
from spaceguard.control import __version__  # noqa

class Backend:
    def status(self): return {"version": "activated", "pid": os.getpid()}

async def main():
    server = ControlServer(Path(sys.argv[2]), "", "", Backend())
    await server.start()
    assert server.inherited and "LISTEN_FDS" not in os.environ
    await asyncio.sleep(30)

asyncio.run(main())
"""


def test_socket_activation_uses_the_inherited_socket(socket_dir: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    require(activate is not None, "systemd-socket-activate is not installed (package systemd)")
    assert activate is not None
    path = socket_dir / "activated.sock"
    script = socket_dir / "guard.py"
    script.write_text(ACTIVATED_GUARD)
    # the server is told another path: it must use the inherited fd, not bind
    unused = socket_dir / "not-bound.sock"
    process = subprocess.Popen(
        [activate, "-l", str(path), sys.executable, str(script), str(DAEMON_DIR), str(unused)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        code, out, err = run(lambda: ctl(path, "--json", "status"))
        assert code == 0, err
        assert json.loads(out) == {"version": "activated", "pid": process.pid}
        assert not unused.exists()
    finally:
        process.terminate()
        process.wait(10)


# --- who may do what (SO_PEERCRED) -------------------------------------------------------------


def _require_setpriv() -> None:
    require(
        os.geteuid() == 0 and shutil.which("setpriv") is not None,
        "needs root and setpriv to run spaceguardctl as another uid",
    )


@contextlib.contextmanager
def _group_with_nobody() -> Iterator[str]:
    """A new group whose only member is nobody (listed in /etc/group, not the primary)."""
    name = f"sg-{uuid.uuid4().hex[:10]}"
    made = subprocess.run(["groupadd", "-U", "nobody", name], capture_output=True, text=True)
    require(made.returncode == 0, f"cannot create a test group: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def test_permission_denied_on_the_socket_file_is_exit_3(socket_dir: Path) -> None:
    _require_setpriv()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, RecordingBackend()):  # 0660 root:root
            code, _, err = await ctl(path, "status", as_uid=NOBODY_UID)
            assert code == 3 and "permission denied" in err and str(path) in err

    run(body)


def test_outsiders_are_refused_and_the_refusal_is_logged(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _require_setpriv()
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(
            path, backend, reader_group="sg-readers-absent", admin_group="sg-admins-absent"
        ):
            path.chmod(0o666)  # let uid 65534 connect: the guard itself must refuse
            code, out, err = await ctl(path, "status", as_uid=NOBODY_UID)
            assert (code, out) == (4, "")
            assert err == (
                "spaceguardctl: status needs root or membership in group "
                "'sg-readers-absent' or group 'sg-admins-absent'; you are "
                "uid 65534 (nobody)\n"
            )
            code, _, err = await ctl(path, "pause", "alice", as_uid=NOBODY_UID)
            assert code == 4 and "group 'sg-admins-absent'" in err
            assert "sg-readers-absent" not in err
            code, _, err = await ctl(path, "--json", "version", as_uid=NOBODY_UID)
            assert code == 4
        assert backend.calls == []

    with caplog.at_level(logging.WARNING, logger="spaceguard.control"):
        run(body)
    refusals = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "refused" in record.getMessage()
    ]
    assert len(refusals) == 3
    assert all("uid 65534 (nobody), pid " in message for message in refusals)
    assert [message.split()[2] for message in refusals] == ["status", "pause", "version"]


def test_no_groups_configured_means_root_only(socket_dir: Path) -> None:
    _require_setpriv()
    path = socket_dir / "control.sock"

    async def body() -> None:
        async with serving(path, RecordingBackend()):
            path.chmod(0o666)
            code, _, err = await ctl(path, "incidents", as_uid=NOBODY_UID)
            assert code == 4 and "needs root (no group is configured for it)" in err
            assert (await ctl(path, "incidents"))[0] == 0  # root

    run(body)


def test_reader_group_reads_but_does_not_change(socket_dir: Path) -> None:
    _require_setpriv()
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body(reader_group: str, groups: str | None = None) -> None:
        async with serving(
            path, backend, reader_group=reader_group, admin_group="sg-admins-absent"
        ):
            path.chmod(0o666)
            for argv in (
                ["status"],
                ["incidents"],
                ["show", INCIDENT["id"]],
                ["version"],
                ["check-config"],
            ):
                code, _, err = await ctl(path, *argv, as_uid=NOBODY_UID, groups=groups)
                assert code == 0, (argv, err)
            for argv in (
                ["pause", "alice"],
                ["resume", "alice"],
                ["retry", "alice"],
                ["ack", INCIDENT["id"]],
                ["reload"],
                ["check-config", "/etc/shadow"],
            ):
                code, _, err = await ctl(path, *argv, as_uid=NOBODY_UID, groups=groups)
                assert code == 4 and "sg-admins-absent" in err, (argv, err)
        assert not any(call[0] in ("operator", "ack", "reload") for call in backend.calls)
        assert ("check_config", "/etc/shadow") not in backend.calls

    # membership by primary group (nobody's gid is nogroup)
    run(lambda: body("nogroup"))
    # a supplementary group the caller's process holds (SO_PEERGROUPS)
    with _group_with_nobody() as group:
        run(lambda: body(group, groups=group))


def test_admin_group_may_change(socket_dir: Path) -> None:
    _require_setpriv()
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body(admin_group: str, groups: str | None = None) -> None:
        backend.calls.clear()
        async with serving(path, backend, admin_group=admin_group):
            path.chmod(0o666)
            for argv in (
                ["status"],
                ["pause", "alice", "--reason", "swap"],
                ["ack", "x-1"],
                ["check-config", "/etc/x.toml"],
            ):
                code, _, err = await ctl(path, *argv, as_uid=NOBODY_UID, groups=groups)
                assert code == 0, (argv, err)
        assert ("operator", "pause", "alice", "swap", False, "uid 65534 (nobody)") in backend.calls
        assert ("ack", "x-1", "uid 65534 (nobody)") in backend.calls

    with _group_with_nobody() as group:
        run(lambda: body(group, groups=group))
    run(lambda: body("nogroup"))


def test_a_client_that_dropped_a_supplementary_group_has_dropped_its_rights(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nobody is a member of the admin group in /etc/group. A spaceguardctl whose process
    holds that group may change; the same user's process that dropped it (setgroups,
    here through setpriv) may not, although the group database still lists it: rights
    come from the groups the process holds (SO_PEERGROUPS), not from the database."""
    _require_setpriv()
    backend = RecordingBackend()
    path = socket_dir / "control.sock"

    async def body(admin: str, reader: str) -> None:
        async with serving(path, backend, reader_group=reader, admin_group=admin):
            path.chmod(0o666)
            # holds both: reads and changes
            code, _, err = await ctl(
                path, "pause", "alice", as_uid=NOBODY_UID, groups=f"{admin},{reader}"
            )
            assert code == 0, err
            # dropped the admin group, kept the readers': reads, may not change
            code, _, err = await ctl(path, "status", as_uid=NOBODY_UID, groups=reader)
            assert code == 0, err
            code, out, err = await ctl(path, "resume", "alice", as_uid=NOBODY_UID, groups=reader)
            assert (code, out) == (4, "") and f"group {admin!r}" in err, err
            # dropped every supplementary group: not even a reader any more
            code, _, err = await ctl(path, "status", as_uid=NOBODY_UID)
            assert code == 4 and "you are uid 65534 (nobody)" in err, err
        operator_calls = [call for call in backend.calls if call[0] == "operator"]
        assert [call[1] for call in operator_calls] == ["pause"]

    with (
        _group_with_nobody() as admin,
        _group_with_nobody() as reader,
        caplog.at_level(logging.WARNING, logger="spaceguard.control"),
    ):
        run(lambda: body(admin, reader))
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert [message.split()[2] for message in refused] == ["resume", "status"]


def test_peer_groups_come_from_the_kernel(socket_dir: Path) -> None:
    """SO_PEERGROUPS on a real socket pair: this process's own supplementary groups; and
    a kernel without it means None (then only a process's own group counts)."""
    left, right = socket.socketpair()
    with left, right:
        assert peer_groups(left) == frozenset(os.getgroups())

    class Old:
        def getsockopt(self, *args: object) -> bytes:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    assert peer_groups(Old()) is None  # type: ignore[arg-type]
    access = Access("readers", "admins", 100, 200)
    unknown = Peer(uid=1000, gid=1000, pid=1, user="x", gids=frozenset({1000}), groups_known=False)
    assert not access.may_read(unknown) and not access.may_change(unknown)
    primary = Peer(uid=1000, gid=100, pid=1, user="x", gids=frozenset({100}), groups_known=False)
    assert access.may_read(primary) and not access.may_change(primary)
    reply = asyncio.run(
        handle_line(request("status").rstrip(b"\n"), unknown, RecordingBackend(), access)
    )
    assert reply["error"]["code"] == "forbidden"
    assert "cannot tell the groups of your process: SO_PEERGROUPS" in reply["error"]["message"]


def test_spaceguardctl_shows_busy_when_the_guard_closed_before_it_sent(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guard at its client limit answers "busy" and closes without reading: the
    request's send then fails (EPIPE), and the operator must see "busy", not "connection
    lost". The send is held until the guard side has closed, so it always fails here."""
    import threading

    from spaceguard import ctl as ctl_module
    from spaceguard.protocol import encode_reply, error_reply

    path = socket_dir / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    closed = threading.Event()

    def refuse() -> None:
        conn, _ = listener.accept()
        conn.sendall(encode_reply(error_reply("busy", "too many clients (256); try again")))
        conn.close()
        closed.set()

    def encode_after_close(verb: str, args: Any) -> bytes:
        assert closed.wait(10)
        return b'{"v": 1, "verb": "status"}\n' * 10_000  # more than one write: it must fail

    thread = threading.Thread(target=refuse)
    thread.start()
    monkeypatch.setattr(ctl_module, "encode_request", encode_after_close)
    try:
        with pytest.raises(ctl_module.CtlError, match=r"too many clients \(256\); try again"):
            ctl_module.call(str(path), "status", {}, timeout=10)
    finally:
        thread.join(10)
        listener.close()
