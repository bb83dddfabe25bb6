"""The state directory fails under the real guard, for real: a tiny ext4 loop volume mounted
as the state directory fills up (ENOSPC), is remounted read-only, gets a directory where
state.json goes, or loses its permissions (chmod 000: the guard runs as root without any
capability, so the mode binds it). The guard keeps freezing and thawing a migration
meanwhile, says so (metrics, STATUS=, an alert that goes out from memory because the alert
spool is on the same volume), and writes a complete state once the fault clears: a SIGKILL
right after shows that the restarted guard knows what it froze.

At start: a state.json that is a directory, or unreadable, is set aside; no crash loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.guardrig import GuardRig, free_port, wait_until
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume

SLEEPER = "sleeper@bob.service"
WRITABLE = 'spaceguard_state_writable{store="state"}'
ERRORS = 'spaceguard_state_write_errors_total{store="state"}'
MIB = 1024 * 1024


class Hook:
    """A webhook receiver on 127.0.0.1 recording every alert state the guard sends."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook.lock:
                    hook.bodies.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def states(self, key: str) -> list[str]:
        with self.lock:
            return [b["status"] for b in self.bodies if b["key"] == key]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()
    yield receiver
    receiver.close()


def config(mountpoint: Path, hook_port: int) -> str:
    return f"""
        [volumes.space]
        path = "{mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "1s"
        predict = "0s"

        [[migrations]]
        account = "bob"
        unit = "{SLEEPER}"
        volume = "space"

        [alerts]
        resend_interval = "1h"

        [[alerts.receivers]]
        name = "hook"
        kind = "webhook"
        url = "http://127.0.0.1:{hook_port}/hook"
        timeout = "2s"
        """


def fill(directory: Path) -> Path:
    """Take every free block of the file system (as its owner could: -m 0)."""
    path = directory / "ballast.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (MIB, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
        os.fsync(fd)
    finally:
        os.close(fd)
    probe = directory / "probe"
    with pytest.raises(OSError):  # a positive check that it is full
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"x" * 8192)
        finally:
            os.close(fd)
            probe.unlink()
    return path


def inject(fault: str, state_dir: Path) -> Callable[[], None]:
    """Break the state directory; returns what clears the fault again."""
    if fault == "full":
        ballast = fill(state_dir)
        return ballast.unlink
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
        return lambda: subprocess.run(
            ["mount", "-o", "remount,rw", str(state_dir)], check=True
        ).check_returncode()
    if fault == "directory":
        state = state_dir / "state.json"
        state.rename(state_dir / "moved-away.json")
        state.mkdir()
        (state / "something").write_text("a directory where the state file goes")

        def clear() -> None:
            (state / "something").unlink()
            state.rmdir()

        return clear
    if fault == "no-access":
        os.chmod(state_dir, 0o000)
        return lambda: os.chmod(state_dir, 0o750)
    raise ValueError(fault)


def boot(
    loop_volume: Callable[..., LoopVolume],
    sandbox: Any,
    venv_python: str,
    tmp_path: Path,
    hook: Hook,
) -> tuple[GuardRig, LoopVolume, LoopVolume]:
    state_volume = loop_volume(8, name="statevol")
    volume = loop_volume(128, name="space")
    sandbox.up({SLEEPER: "[Service]\nExecStart=/bin/sleep infinity\n"})
    rig = GuardRig(sandbox, tmp_path, venv_python)
    rig.state_dir = state_volume.mountpoint
    rig.write_config(config(volume.mountpoint, hook.port))
    rig.install()
    return rig, state_volume, volume


def saved_bob(rig: GuardRig) -> dict[str, Any]:
    state: Any = rig.saved_state()
    return dict(state["state"]["migrations"]["bob"])


@pytest.mark.parametrize("fault", ["full", "read-only", "directory", "no-access"])
def test_the_guard_guards_on_while_its_state_dir_fails(
    fault: str, loop_volume: Any, sandbox: Any, venv_python: str, tmp_path: Path, hook: Hook
) -> None:
    rig, _state_volume, volume = boot(loop_volume, sandbox, venv_python, tmp_path, hook)
    rig.start()
    pid = rig.main_pid()
    sandbox.systemctl("start", SLEEPER)
    wait_until(
        lambda: (rig.state_dir / "state.json").is_file() and saved_bob(rig)["run_started_at"],
        10,
        "a state file that has seen bob start",
    )
    good = (rig.state_dir / "state.json").read_bytes()
    assert rig.metrics()[WRITABLE] == 1

    clear = inject(fault, rig.state_dir)
    try:
        # the volume runs low: the guard freezes bob and must save that, and cannot
        ballast = make_ballast(volume, 110)
        sandbox.wait_for(SLEEPER, "FreezerState", "frozen", timeout=20)
        wait_until(
            lambda: rig.metrics()[WRITABLE] == 0,
            20,
            "the metrics to say the state cannot be written",
            on_timeout=rig.journal,
        )
        assert rig.metrics()[ERRORS] >= 1
        wait_until(lambda: "STATE NOT SAVED" in rig.status_text(), 10, "STATUS= to say so")
        # the alert reaches the receiver although its spool cannot be written either
        wait_until(
            lambda: hook.states("state-unwritable") == ["firing"],
            20,
            "the state-unwritable alert, delivered from memory",
            on_timeout=rig.journal,
        )
        assert hook.states("paused/bob") == ["firing"]
        # the guard keeps guarding: thaw on recovery, freeze again on the next fill
        ballast.unlink()
        sandbox.wait_for(SLEEPER, "FreezerState", "running", timeout=20)
        ballast = make_ballast(volume, 110)
        sandbox.wait_for(SLEEPER, "FreezerState", "frozen", timeout=20)
        assert rig.metrics()[WRITABLE] == 0
        if fault == "directory":
            assert (rig.state_dir / "moved-away.json").read_bytes() == good  # untouched
        elif fault != "no-access":
            assert (rig.state_dir / "state.json").read_bytes() == good  # the last good one
    finally:
        clear()

    # the fault clears: the next retry (at most 10 s of backoff) writes the whole state
    wait_until(
        lambda: rig.metrics()[WRITABLE] == 1,
        30,
        "the state to be written again",
        on_timeout=rig.journal,
    )
    wait_until(
        lambda: hook.states("state-unwritable") == ["firing", "resolved"],
        20,
        "the alert to resolve",
    )
    assert "STATE NOT SAVED" not in rig.status_text()
    bob = saved_bob(rig)
    assert bob["hold"]["by"] == "guard" and bob["hold"]["reason"] == "space"
    assert bob["paused_units"] == [SLEEPER]
    assert rig.main_pid() == pid, "the guard rode the fault out without a restart"

    # complete: a guard killed now restarts from that file and knows it froze bob
    sandbox.systemctl("kill", "--signal=KILL", "spaceguard.service")
    wait_until(lambda: rig.main_pid() not in (0, pid), 30, "systemd to restart the guard")
    wait_until(
        lambda: rig.status_text().startswith("space:"), 30, "the restarted guard to be ready"
    )
    assert "no record of who froze it" not in rig.journal()
    ballast.unlink()
    sandbox.wait_for(SLEEPER, "FreezerState", "running", timeout=30)
    wait_until(lambda: saved_bob(rig)["hold"] is None, 10, "the thaw saved")


@pytest.mark.parametrize("fault", ["directory", "unreadable"])
def test_a_bad_state_file_at_start_is_set_aside_without_a_crash_loop(
    fault: str, loop_volume: Any, sandbox: Any, venv_python: str, tmp_path: Path, hook: Hook
) -> None:
    rig, _state_volume, volume = boot(loop_volume, sandbox, venv_python, tmp_path, hook)
    state = rig.state_dir / "state.json"
    if fault == "directory":
        state.mkdir()
        (state / "something").write_text("")
    else:
        state.write_text('{"version": 1}')
        os.chmod(state, 0o000)  # binds the guard: it runs without CAP_DAC_OVERRIDE
    rig.start()
    pid = rig.main_pid()
    (aside,) = rig.state_dir.glob("state.json.corrupt-*")
    assert aside.is_dir() == (fault == "directory")
    wait_until(lambda: state.is_file(), 10, "a new state file")
    wait_until(
        lambda: hook.states("state-corrupt") == ["firing"],
        20,
        "the state-corrupt alert",
        on_timeout=rig.journal,
    )
    assert "cannot be read" in rig.journal()
    sandbox.systemctl("start", SLEEPER)
    ballast = make_ballast(volume, 110)
    sandbox.wait_for(SLEEPER, "FreezerState", "frozen", timeout=20)
    ballast.unlink()
    sandbox.wait_for(SLEEPER, "FreezerState", "running", timeout=20)
    assert rig.main_pid() == pid
    assert sandbox.show("spaceguard.service", "NRestarts") == "0"
