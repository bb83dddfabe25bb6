"""Faults (issue 12): reloads that race each other, and a reload that races a freeze.

The real guard as a Type=notify unit in a real systemd sandbox, on a real ext4 loop
volume, with a real webhook receiver (a local HTTP server) behind its alert sender.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from tests.guardrig import GUARD_UNIT, GuardRig, wait_until
from tests.installed import ShippedRig
from tests.integration.test_operators import ctl, ctl_json
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, SystemdSandbox
from tests.unit.test_alertmanager_real import NotificationRecorder

ALICE = "writer@alice.service"
BOB = "sleeper@bob.service"
SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"
PAUSED = 'spaceguard_migration_paused{account="alice",unit="' + ALICE + '"}'


def config(volume: LoopVolume, webhook: str, resend: str, *, bob: bool = False) -> str:
    text = f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "1s"
        predict = "0s"

        [[migrations]]
        account = "alice"
        unit = "{ALICE}"
        volume = "space"
        pause = "freeze"

        [alerts]
        resend_interval = "{resend}"
        max_backoff = "1s"

        [[alerts.receivers]]
        name = "hook"
        kind = "webhook"
        url = "{webhook}"
        timeout = "2s"
        """
    if bob:
        text += f"""
        [[migrations]]
        account = "bob"
        unit = "{BOB}"
        volume = "space"
        pause = "freeze"
        """
    return text


def guard_host_pid(sandbox: SystemdSandbox) -> int:
    """The guard's PID as the host sees it (MainPID is the sandbox's PID namespace's)."""
    main = int(sandbox.show(GUARD_UNIT, "MainPID"))
    for pid in (sandbox.unit_cgroup(GUARD_UNIT) / "cgroup.procs").read_text().split():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == main:
                return int(pid)
    raise AssertionError(f"no host PID for the guard's MainPID {main}")


def raw_request(path: Path, verb: str, timeout: float = 30.0) -> dict[str, Any]:
    """One request over the control socket, without spaceguardctl's start-up time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"v": 1, "verb": verb}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def hook_bodies(webhook: NotificationRecorder, status: str) -> list[dict[str, Any]]:
    return [
        body
        for body in list(webhook.notifications)
        if body.get("key") == "paused/alice" and body.get("status") == status
    ]


def spool(rig: GuardRig) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((rig.state_dir / "alerts" / "hook.json").read_text())
    return document


def test_sighup_and_ctl_reload_together_keep_one_alert_sender(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(128)
    webhook = NotificationRecorder()
    try:
        sandbox.up({ALICE: SLEEPER})
        rig = ShippedRig(sandbox, tmp_path, venv_python)
        rig.write_config(config(volume, webhook.url, "1m"))
        rig.install()
        rig.start()
        sandbox.systemctl("start", ALICE)
        pid = guard_host_pid(sandbox)

        # A firing alert, delivered, before the storm: it is in the spool as delivered.
        ballast = make_ballast(volume, 100)
        sandbox.wait_for(ALICE, "FreezerState", "frozen", timeout=30)
        wait_until(lambda: hook_bodies(webhook, "firing"), 15, "the pause alert at the webhook")
        wait_until(
            lambda: not spool(rig)["alerts"][0]["pending"], 10, "the spool to record delivery"
        )

        # The storm: SIGHUPs and `reload` requests over the socket fired together, 40
        # rounds, while the config file keeps changing [alerts] (atomically replaced), so
        # that reloads running at once read different files and each restarts the sender.
        errors: list[str] = []
        replies: list[dict[str, Any]] = []
        rewriting = threading.Event()

        gid = rig.config_path.stat().st_gid

        def rewrite_config() -> None:
            variant = 0
            while not rewriting.is_set():
                variant += 1
                body = config(volume, webhook.url, f"{60 + variant % 7}s")
                scratch = rig.config_path.with_suffix(".tmp")
                scratch.write_text(rig.guard_section() + "\n" + textwrap.dedent(body))
                os.chown(scratch, 0, gid)  # as the package installs it: 0640 root:spaceguard
                scratch.chmod(0o640)
                scratch.replace(rig.config_path)
                time.sleep(0.001)

        def socket_reloads(count: int) -> None:
            for _ in range(count):
                try:
                    replies.append(raw_request(rig.host_socket, "reload"))
                except OSError as error:
                    errors.append(repr(error))

        writer = threading.Thread(target=rewrite_config)
        writer.start()
        try:
            for _ in range(40):
                clients = [threading.Thread(target=socket_reloads, args=(2,)) for _ in range(3)]
                for client in clients:
                    client.start()
                for _ in range(3):
                    os.kill(pid, signal.SIGHUP)
                    time.sleep(0.002)
                for client in clients:
                    client.join(60)
        finally:
            rewriting.set()
            writer.join()
        assert not errors, errors
        assert len(replies) == 40 * 3 * 2
        assert all(reply["ok"] for reply in replies), [r for r in replies if not r["ok"]][:3]
        # A last reload, with spaceguardctl: it is answered after every reload requested
        # before it has run (they are serialised).
        last = ctl(rig, "reload")
        assert last.returncode == 0, last.stdout + last.stderr
        status = ctl_json(rig, "status")
        assert isinstance(status, dict)
        assert status["alert_sender_tasks"] == 1
        journal = rig.journal()
        assert "internal task failed" not in journal
        assert "configuration reloaded" in journal
        assert guard_host_pid(sandbox) == pid

        # The spool is intact: one receiver's document, the alert delivered, nothing pending.
        document = spool(rig)
        assert document["format"] == "spaceguard-alert-spool"
        [entry] = document["alerts"]
        assert entry["key"] == "paused/alice" and entry["pending"] == []
        assert entry["delivered_firing"]["alert"]["ends_at"] is None

        # Space comes back: the resolved state is delivered once, and the spool forgets the
        # alert (an orphaned sender would write its stale view back).
        ballast.unlink()
        sandbox.wait_for(ALICE, "FreezerState", "running", timeout=30)
        wait_until(lambda: hook_bodies(webhook, "resolved"), 15, "the resolved alert")
        wait_until(lambda: spool(rig)["alerts"] == [], 10, "the spool to forget the alert")
        # a probe that went through the same sender after the resolve: reload once more
        assert ctl(rig, "reload").returncode == 0
        assert ctl_json(rig, "status")["alert_sender_tasks"] == 1
        assert len(hook_bodies(webhook, "firing")) == 1
        assert len(hook_bodies(webhook, "resolved")) == 1
        assert spool(rig)["alerts"] == []
    finally:
        webhook.stop()


def test_reload_while_a_freeze_is_in_flight(loop_volume, sandbox, venv_python, tmp_path):
    """systemd (PID 1 of the sandbox) is stopped with SIGSTOP, so the guard's FreezeUnit
    stays unanswered while two reloads (SIGHUP and `reload`, the second adding a
    migration) run; then PID 1 continues. The freeze lands once; nothing is sent twice."""
    volume = loop_volume(128)
    webhook = NotificationRecorder()
    try:
        sandbox.up({ALICE: SLEEPER, BOB: SLEEPER})
        rig = ShippedRig(sandbox, tmp_path, venv_python)
        rig.write_config(config(volume, webhook.url, "1m"))
        rig.install()
        rig.start()
        sandbox.systemctl("start", ALICE)
        pid = guard_host_pid(sandbox)

        os.kill(sandbox.pid, signal.SIGSTOP)
        try:
            ballast = make_ballast(volume, 100)
            # the guard decided the pause (its hold shows) and sent FreezeUnit ...
            wait_until(lambda: rig.metrics().get(PAUSED) == 1, 15, "the pause decision")
            # ... which systemd cannot answer now.
            rig.write_config(config(volume, webhook.url, "2m", bob=True))
            os.kill(pid, signal.SIGHUP)
            reply = raw_request(rig.host_socket, "reload")
            assert reply["ok"], reply
            status = raw_request(rig.host_socket, "status")["result"]
            assert [m["account"] for m in status["migrations"]] == ["alice", "bob"]
            alice = next(m for m in status["migrations"] if m["account"] == "alice")
            assert alice["hold"]["by"] == "guard"
            assert alice["units"][ALICE]["freezer_state"] == "running"  # not landed yet
            assert status["alert_sender_tasks"] == 1
        finally:
            os.kill(sandbox.pid, signal.SIGCONT)

        sandbox.wait_for(ALICE, "FreezerState", "frozen", timeout=30)
        wait_until(
            lambda: (
                rig.metrics().get(
                    'spaceguard_actions_total{action="freeze",reason="space",result="ok"}'
                )
                == 1
            ),
            15,
            "the freeze to be reported done",
            on_timeout=rig.journal,
        )

        def saved_migrations() -> dict[str, Any]:
            saved: Any = rig.saved_state()
            migrations: dict[str, Any] = saved["state"]["migrations"]
            return migrations

        wait_until(
            lambda: all(not m["pending"] for m in saved_migrations().values()),
            10,
            "no action pending in the saved state",
            on_timeout=lambda: json.dumps(saved_migrations(), indent=1),
        )
        assert saved_migrations()["alice"]["paused_units"] == [ALICE]
        journal = rig.journal()
        assert journal.count(f"freeze {ALICE}: D-Bus call took") == 1, journal
        metrics = rig.metrics()
        assert (
            metrics.get('spaceguard_actions_total{action="freeze",reason="space",result="error"}')
            is None
        )
        assert metrics[PAUSED] == 1

        # Space returns: one thaw, bob (never started) untouched.
        ballast.unlink()
        sandbox.wait_for(ALICE, "FreezerState", "running", timeout=30)
        wait_until(
            lambda: rig.metrics().get(PAUSED) == 0, 10, "the pause to end", on_timeout=rig.journal
        )
        journal = rig.journal()
        assert journal.count(f"thaw {ALICE}: D-Bus call took") == 1, journal
        assert f"{BOB}: D-Bus call took" not in journal
        assert guard_host_pid(sandbox) == pid
    finally:
        webhook.stop()
