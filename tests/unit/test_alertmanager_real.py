"""AlertSender against the real Alertmanager from Debian's prometheus-alertmanager package.

Alertmanager runs as a subprocess on 127.0.0.1 (clustering off, storage in a temporary
directory) and routes every alert to a webhook receiver: a local http.server recording
the notifications, i.e. what people would be told. Under CI=true a missing Alertmanager
binary fails these tests; elsewhere it only skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from spaceguard.alerts import AlertReceiver, AlertSender, GuardAlert

from tests.sandbox import require, terminate

pytestmark = pytest.mark.e2e

ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
RESEND_S = 0.5
STARTUP_TIMEOUT_S = 20.0
WAIT_TIMEOUT_S = 20.0


def alertmanager_binary() -> str:
    for name in ALERTMANAGER_BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    require(False, "Alertmanager not found (Debian package prometheus-alertmanager provides it)")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NotificationRecorder:
    """The webhook receiver Alertmanager notifies: records each notification's JSON."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                notification = json.loads(self.rfile.read(length))
                with recorder._lock:
                    recorder.notifications.append(notification)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/notify"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def alerts_notified(self, alertname: str, status: str) -> list[dict[str, Any]]:
        """Every alert named ``alertname`` that a notification announced with ``status``."""
        with self._lock:
            notifications = list(self.notifications)
        return [
            alert
            for notification in notifications
            for alert in notification["alerts"]
            if alert["labels"].get("alertname") == alertname and alert["status"] == status
        ]


class Alertmanager:
    """One Alertmanager process; stop() and start() again keep its port and storage."""

    def __init__(self, workdir: Path, webhook_url: str) -> None:
        self.binary = alertmanager_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = workdir / "alertmanager-data"
        self.config = workdir / "alertmanager.yml"
        self.log = workdir / "alertmanager.log"
        # group_wait 0s / group_interval 1s: notifications within a second, so the tests
        # stay short; repeat_interval 1h: any second notification would be a duplicate.
        self.config.write_text(
            f"""
route:
  receiver: recorder
  group_by: [alertname, account]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: recorder
    webhook_configs:
      - url: {webhook_url}
        send_resolved: true
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.path={self.storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"Alertmanager exited:\n{self.log.read_text()}")
            ready_url = f"{self.url}/-/ready"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(ready_url, timeout=1) as ready,
            ):
                if ready.status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"Alertmanager not ready:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None

    def active_alerts(self, alertname: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: Alertmanager lists active alerts, not resolved ones."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            listed: list[dict[str, Any]] = json.loads(response.read())
        return [alert for alert in listed if alert["labels"].get("alertname") == alertname]

    def metrics(self) -> dict[str, float]:
        """Alertmanager's own /metrics: {'name{labels}': value}."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def flushes(self) -> float:
        """How many times a group went through the notification pipeline: every flush asks
        the notification log whether it notified already (alertmanager_nflog_queries_total),
        notification or not."""
        return self.metrics()["alertmanager_nflog_queries_total"]

    def flushed_every_group_twice_since(self, flushes: float) -> bool:
        """Positive sign that Alertmanager considered notifying again, twice for each group
        (groups share group_interval), since ``flushes`` was read."""
        metrics = self.metrics()
        groups = metrics["alertmanager_dispatcher_aggregation_groups"]
        return metrics["alertmanager_nflog_queries_total"] >= flushes + 2 * max(groups, 1)


@pytest.fixture
def recorder() -> Iterator[NotificationRecorder]:
    receiver = NotificationRecorder()
    yield receiver
    receiver.stop()


@pytest.fixture
def alertmanager(tmp_path: Path, recorder: NotificationRecorder) -> Iterator[Alertmanager]:
    manager = Alertmanager(tmp_path, recorder.url)
    try:
        yield manager
    finally:
        manager.stop()


def paused_alert(account: str, starts_at: float) -> GuardAlert:
    return GuardAlert(
        key=f"paused/{account}",
        name="SpaceguardMigrationPaused",
        labels={
            "account": account,
            "unit": f"m365-migrate@{account}.service",
            "severity": "warning",
        },
        annotations={
            "summary": f"Migration {account} paused: /space is low",
            "description": "Free space: df -h /space; du -sh /space/* | sort -h",
        },
        starts_at=starts_at,
    )


def sender_for(alertmanager: Alertmanager, spool_dir: Path) -> AlertSender:
    receiver = AlertReceiver("am", "alertmanager", alertmanager.url, timeout_s=2.0)
    return AlertSender(
        [receiver], spool_dir, resend_interval_s=RESEND_S, max_backoff_s=0.5, initial_backoff_s=0.1
    )


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def resent_and_flushed(sender: AlertSender, alertmanager: Alertmanager) -> None:
    """Wait until Alertmanager accepted two more sends of ``sender`` (its re-sends), then
    flushed every group twice: any duplicate notification would have gone out by then."""
    sent = sender.stats()["am"].sent_ok
    await eventually(lambda: sender.stats()["am"].sent_ok >= sent + 2, "two re-sends accepted")
    flushes = await asyncio.to_thread(alertmanager.flushes)
    await eventually(
        lambda: alertmanager.flushed_every_group_twice_since(flushes),
        "Alertmanager to flush its groups after the re-sends",
    )


def run_with_sender(sender: AlertSender, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        task = asyncio.create_task(sender.run())
        try:
            await scenario()
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_pushed_alert_is_active_in_alertmanager_then_resolved(
    alertmanager: Alertmanager, recorder: NotificationRecorder, tmp_path: Path
) -> None:
    alertmanager.start()
    sender = sender_for(alertmanager, tmp_path / "spool")
    starts_at = round(time.time()) - 30.0
    name = "SpaceguardMigrationPaused"

    async def scenario() -> None:
        sender.fire(paused_alert("alice", starts_at))
        await eventually(lambda: len(alertmanager.active_alerts(name)) == 1, "alert in the API")
        (active,) = alertmanager.active_alerts(name)
        assert active["labels"] == {
            "alertname": name,
            "account": "alice",
            "unit": "m365-migrate@alice.service",
            "severity": "warning",
        }
        assert active["annotations"]["summary"] == "Migration alice paused: /space is low"
        assert active["status"]["state"] == "active"
        assert active["startsAt"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(starts_at)))
        await eventually(lambda: bool(recorder.alerts_notified(name, "firing")), "notification")
        # Re-sent every RESEND_S: Alertmanager keeps one alert and notifies once. Checked
        # after two re-sends were accepted and Alertmanager flushed its groups twice since.
        await resent_and_flushed(sender, alertmanager)
        assert len(alertmanager.active_alerts(name)) == 1
        assert len(recorder.alerts_notified(name, "firing")) == 1

        sender.resolve("paused/alice", ends_at=time.time())
        await eventually(lambda: alertmanager.active_alerts(name) == [], "alert resolved in API")
        await eventually(
            lambda: bool(recorder.alerts_notified(name, "resolved")), "resolved notification"
        )
        (resolved,) = recorder.alerts_notified(name, "resolved")
        assert resolved["labels"]["account"] == "alice"
        assert resolved["endsAt"] > resolved["startsAt"]

    run_with_sender(sender, scenario)
    assert sender.stats()["am"].spooled == 0
    assert sender.firing_alerts() == {}


def test_alert_fired_during_an_outage_arrives_once_after_a_guard_restart(
    alertmanager: Alertmanager, recorder: NotificationRecorder, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    name = "SpaceguardMigrationPaused"
    alertmanager.start()
    alertmanager.stop()  # Alertmanager goes down (its port stays known)

    first_guard = sender_for(alertmanager, spool_dir)

    async def fire_during_outage() -> None:
        first_guard.fire(paused_alert("bob", time.time()))
        await eventually(lambda: first_guard.stats()["am"].sent_error >= 2, "failed attempts")

    run_with_sender(first_guard, fire_during_outage)
    assert first_guard.stats()["am"].spooled == 1

    # The guard restarts (a new sender on the same spool), then Alertmanager comes back.
    second_guard = sender_for(alertmanager, spool_dir)
    assert second_guard.stats()["am"].spooled == 1
    alertmanager.start()

    async def deliver_after_restart() -> None:
        await eventually(lambda: len(alertmanager.active_alerts(name)) == 1, "alert in the API")
        await eventually(lambda: bool(recorder.alerts_notified(name, "firing")), "notification")
        # Several re-sends and group flushes later there is still exactly one.
        await resent_and_flushed(second_guard, alertmanager)

    run_with_sender(second_guard, deliver_after_restart)
    notified = recorder.alerts_notified(name, "firing")
    assert [alert["labels"]["account"] for alert in notified] == ["bob"]
    assert [alert["labels"]["account"] for alert in alertmanager.active_alerts(name)] == ["bob"]
    stats = second_guard.stats()["am"]
    assert stats.spooled == 0 and stats.sent_ok >= 1
