"""AlertSender against a real HTTP server on 127.0.0.1 (http.server in a thread).

The server records every request and can answer an error status, hold requests, or be
down (its port closed), so delivery, retries, the durable spool and restarts are all
exercised over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from spaceguard import alerts
from spaceguard.alerts import AlertReceiver, AlertSender, GuardAlert, ReceiverStats
from spaceguard.atomicfile import BackgroundWriter

START = 1_763_900_000.0
RESEND_S = 0.1
WAIT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: Any


class RecordingServer:
    """An HTTP receiver that records requests; switchable to errors, holding, or down."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.status = 200
        self.hold: threading.Event | None = None
        self.port = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with recorder._lock:
                    recorder.requests.append(
                        RecordedRequest(self.path, dict(self.headers.items()), body)
                    )
                    status, hold = recorder.status, recorder.hold
                if hold is not None:
                    hold.wait(WAIT_TIMEOUT_S)
                answer = b"{}" if status < 400 else b"receiver says no"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        # Same port after a restart, like a receiver coming back.
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recorded(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    def alert_bodies(self) -> list[dict[str, Any]]:
        """Every alert received: the items of Alertmanager lists, or webhook bodies."""
        result = []
        for request in self.recorded():
            result.extend(request.body if isinstance(request.body, list) else [request.body])
        return result


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    receiver = RecordingServer()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def down_server() -> Iterator[RecordingServer]:
    """A receiver whose port is known but closed (start() brings it up)."""
    receiver = RecordingServer()
    receiver.start()
    receiver.stop()
    yield receiver
    receiver.stop()


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def am_receiver(server: RecordingServer, **overrides: Any) -> AlertReceiver:
    settings: dict[str, Any] = {"name": "am", "kind": "alertmanager", "url": server.url}
    settings["timeout_s"] = 2.0
    settings.update(overrides)
    return AlertReceiver(**settings)


def webhook_receiver(server: RecordingServer, **overrides: Any) -> AlertReceiver:
    settings: dict[str, Any] = {"name": "hook", "kind": "webhook", "url": server.url + "/hook"}
    settings["timeout_s"] = 2.0
    settings.update(overrides)
    return AlertReceiver(**settings)


def make_sender(receivers: list[AlertReceiver], spool_dir: Path, **overrides: Any) -> AlertSender:
    settings: dict[str, Any] = {
        "resend_interval_s": 30.0,
        "max_backoff_s": 0.1,
        "initial_backoff_s": 0.02,
    }
    settings.update(overrides)
    return AlertSender(receivers, spool_dir, **settings)


def paused_alert(account: str = "alice", starts_at: float = START) -> GuardAlert:
    return GuardAlert(
        key=f"paused/{account}",
        name="SpaceguardMigrationPaused",
        labels={
            "account": account,
            "unit": f"m365-migrate@{account}.service",
            "severity": "warning",
        },
        annotations={"summary": f"Migration {account} paused", "description": "df -h /space"},
        starts_at=starts_at,
    )


def rfc3339(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_sender_until(
    sender: AlertSender, condition: Callable[[], bool], timeout_s: float = WAIT_TIMEOUT_S
) -> None:
    """Runs the sender until ``condition`` holds, then cancels it (as the daemon would)."""

    async def scenario() -> None:
        task = asyncio.create_task(sender.run())
        try:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert not task.done(), task.exception()
                assert time.monotonic() < deadline, "condition not reached in time"
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def run_sender_for(sender: AlertSender, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    run_sender_until(sender, lambda: time.monotonic() >= deadline, timeout_s=seconds + 5)


def sent_everything(sender: AlertSender, probe: str = "probe") -> None:
    """A positive sign that the sender has sent all it had to: fire one more alert (account
    ``probe``) and run until every receiver has it. Each receiver sends what is pending
    oldest first, so anything still owed went out before the probe, or with it."""
    sender.fire(paused_alert(probe))
    run_sender_until(sender, all_delivered(sender))


def without_probe(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alert bodies (Alertmanager items or webhook bodies) other than the probes'."""
    return [body for body in bodies if not body["labels"]["account"].startswith("probe")]


def all_delivered(sender: AlertSender) -> Callable[[], bool]:
    """Condition: nothing undelivered. Waiting on the sender, not on the server, matters: a
    request the server has recorded may not have been answered to the sender yet."""
    return lambda: all(stats.spooled == 0 for stats in sender.stats().values())


def spool_document(spool_dir: Path, receiver: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((spool_dir / f"{receiver}.json").read_text())
    return document


def spooled_keys(spool_dir: Path, receiver: str) -> list[str]:
    document = spool_document(spool_dir, receiver)
    return [entry["key"] for entry in document["alerts"] if entry["pending"]]


# --- delivery ------------------------------------------------------------------------------


def test_fire_delivers_alertmanager_v2_json(server: RecordingServer, tmp_path: Path) -> None:
    clock = FakeClock()
    sender = make_sender(
        [am_receiver(server)], tmp_path, clock=clock, generator_url="http://guard:9839/"
    )
    sender.fire(paused_alert())
    run_sender_until(sender, all_delivered(sender))

    (request,) = server.recorded()
    assert request.path == "/api/v2/alerts"
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers
    assert request.body == [
        {
            "labels": {
                "alertname": "SpaceguardMigrationPaused",
                "account": "alice",
                "unit": "m365-migrate@alice.service",
                "severity": "warning",
            },
            "annotations": {"summary": "Migration alice paused", "description": "df -h /space"},
            "startsAt": rfc3339(START),
            # Firing: valid for 4 resend intervals, as Prometheus does.
            "endsAt": rfc3339(START + 4 * 30.0),
            "generatorURL": "http://guard:9839/",
        }
    ]
    assert sender.stats() == {
        "am": ReceiverStats(sent_ok=1, sent_error=0, spooled=0, oldest_spooled_age=0.0)
    }
    # Still known (to be re-sent and resolved), but nothing undelivered.
    assert spooled_keys(tmp_path, "am") == []
    assert [entry["key"] for entry in spool_document(tmp_path, "am")["alerts"]] == ["paused/alice"]


def test_resolve_sends_real_ends_at_then_forgets(server: RecordingServer, tmp_path: Path) -> None:
    sender = make_sender([am_receiver(server)], tmp_path, resend_interval_s=RESEND_S)
    sender.fire(paused_alert())
    run_sender_until(sender, lambda: len(server.recorded()) >= 1)

    sender.resolve("paused/alice", ends_at=START + 600)
    assert sender.firing_alerts() == {}
    run_sender_until(sender, all_delivered(sender))
    resolved = server.alert_bodies()[-1]
    assert resolved["startsAt"] == rfc3339(START)
    assert resolved["endsAt"] == rfc3339(START + 600)
    assert spool_document(tmp_path, "am")["alerts"] == []

    # Forgotten: no more re-sends, and resolving again is a no-op. Shown while bob fires:
    # once bob has been re-sent twice, a remembered alice would have been re-sent too.
    count = len(server.recorded())
    sender.resolve("paused/alice", ends_at=START + 700)
    sender.fire(paused_alert("bob"))
    run_sender_until(sender, lambda: len(server.recorded()) >= count + 3)
    later = [alert for request in server.recorded()[count:] for alert in request.body]
    assert {alert["labels"]["account"] for alert in later} == {"bob"}


def test_firing_alert_is_resent_to_alertmanager_only(
    server: RecordingServer, tmp_path: Path
) -> None:
    readings: list[float] = []

    def clock() -> float:  # a wall clock that moves 1 s per reading, and remembers them
        readings.append(START + len(readings))
        return readings[-1]

    sender = make_sender(
        [am_receiver(server), webhook_receiver(server)],
        tmp_path,
        resend_interval_s=RESEND_S,
        clock=clock,
    )
    sender.fire(paused_alert())
    run_sender_until(
        sender, lambda: sum(r.path == "/api/v2/alerts" for r in server.recorded()) >= 4
    )

    am_sends = [r for r in server.recorded() if r.path == "/api/v2/alerts"]
    ends = [datetime.fromisoformat(r.body[0]["endsAt"]).timestamp() for r in am_sends]
    assert all(r.body[0]["startsAt"] == rfc3339(START) for r in am_sends)
    # Each re-send pushes endsAt forward, and it is always 4 intervals ahead of the send
    # (of the clock reading taken for it).
    assert ends == sorted(ends) and ends[-1] > ends[0]
    for end in ends:
        assert any(abs(end - 4 * RESEND_S - reading) < 1e-5 for reading in readings), end
    webhook_sends = [r for r in server.recorded() if r.path == "/hook"]
    assert len(webhook_sends) == 1


def test_resends_of_several_alerts_share_requests(server: RecordingServer, tmp_path: Path) -> None:
    sender = make_sender([am_receiver(server)], tmp_path, resend_interval_s=0.4)
    sender.fire(paused_alert("alice"))
    run_sender_until(sender, all_delivered(sender))
    time.sleep(0.25)  # alice is now past half her re-send interval
    sender.fire(paused_alert("bob"))
    run_sender_until(sender, lambda: len(server.recorded()) >= 4)

    accounts = [sorted(a["labels"]["account"] for a in r.body) for r in server.recorded()]
    assert accounts[0] == ["alice"]
    # bob's first send took alice along; from then on they travel together.
    assert accounts[1:] == [["alice", "bob"]] * (len(accounts) - 1)


def test_extra_labels_go_on_every_push_and_the_alerts_own_win(
    server: RecordingServer, tmp_path: Path
) -> None:
    hook = webhook_receiver(server)
    am = am_receiver(server)
    sender = make_sender(
        [am, hook], tmp_path, extra_labels={"instance": "guard-a:9839", "unit": "not-this"}
    )
    sender.fire(paused_alert())
    run_sender_until(sender, all_delivered(sender))
    pushed = {r.path: r.body for r in server.recorded()}
    expected = {
        "alertname": "SpaceguardMigrationPaused",
        "account": "alice",
        "unit": "m365-migrate@alice.service",  # the alert's own label, not the extra one
        "severity": "warning",
        "instance": "guard-a:9839",
    }
    assert pushed["/api/v2/alerts"][0]["labels"] == expected
    assert pushed["/hook"]["labels"] == expected


def test_webhook_body_and_bearer_token(server: RecordingServer, tmp_path: Path) -> None:
    receiver = webhook_receiver(server, bearer_token="s3cret-token")
    assert "s3cret" not in repr(receiver)
    sender = make_sender([receiver], tmp_path, generator_url="http://guard:9839/")
    sender.fire(paused_alert())
    sender.resolve("paused/alice", ends_at=START + 60)
    run_sender_until(sender, all_delivered(sender))

    firing, resolved = server.recorded()
    assert firing.path == "/hook"
    assert firing.headers["Authorization"] == "Bearer s3cret-token"
    assert firing.headers["Content-Type"] == "application/json"
    labels = {
        "alertname": "SpaceguardMigrationPaused",
        "account": "alice",
        "unit": "m365-migrate@alice.service",
        "severity": "warning",
    }
    common = {
        "version": "1",
        "source": "spaceguard",
        "key": "paused/alice",
        "alertname": "SpaceguardMigrationPaused",
        "labels": labels,
        "annotations": {"summary": "Migration alice paused", "description": "df -h /space"},
        "startsAt": rfc3339(START),
        "generatorURL": "http://guard:9839/",
    }
    # Fired and resolved before delivery: a webhook still gets both changes, in order.
    assert firing.body == {**common, "status": "firing", "endsAt": None}
    assert resolved.body == {**common, "status": "resolved", "endsAt": rfc3339(START + 60)}
    sent_everything(sender)
    assert len(without_probe(server.alert_bodies())) == 2


def test_alertmanager_basic_auth(server: RecordingServer, tmp_path: Path) -> None:
    sender = make_sender([am_receiver(server, basic_auth=("spaceguard", "pa:ss"))], tmp_path)
    sender.fire(paused_alert())
    run_sender_until(sender, lambda: len(server.recorded()) >= 1)
    expected = "Basic " + base64.b64encode(b"spaceguard:pa:ss").decode()
    assert server.recorded()[0].headers["Authorization"] == expected


def test_alertmanager_gets_only_the_newest_state_of_an_undelivered_alert(
    down_server: RecordingServer, tmp_path: Path
) -> None:
    sender = make_sender([am_receiver(down_server)], tmp_path)
    sender.fire(paused_alert())
    sender.resolve("paused/alice", ends_at=START + 60)
    assert sender.stats()["am"].spooled == 1
    down_server.start()
    run_sender_until(sender, all_delivered(sender))
    sent_everything(sender)

    alice = without_probe(down_server.alert_bodies())
    assert [a["endsAt"] for a in alice] == [rfc3339(START + 60)]


def test_recording_the_same_state_twice_sends_it_once(
    server: RecordingServer, tmp_path: Path
) -> None:
    sender = make_sender([webhook_receiver(server)], tmp_path)
    sender.fire(paused_alert())
    sender.fire(paused_alert())
    run_sender_until(sender, all_delivered(sender))
    sender.fire(paused_alert())  # e.g. the daemon re-firing what it knows after a restart

    # A changed firing state is a state change: sent once more. (Sent oldest first: a
    # second send of the unchanged state would have come before it.)
    updated = GuardAlert(**{**paused_alert().__dict__, "annotations": {"summary": "still"}})
    sender.fire(updated)
    run_sender_until(sender, lambda: len(server.recorded()) >= 2)
    assert server.recorded()[1].body["annotations"] == {"summary": "still"}
    assert len(server.recorded()) == 2


def test_webhook_receives_state_changes_oldest_first(
    down_server: RecordingServer, tmp_path: Path
) -> None:
    clock = FakeClock()
    sender = make_sender([webhook_receiver(down_server)], tmp_path, clock=clock)
    for account in ("carol", "alice", "bob"):
        sender.fire(paused_alert(account))
        clock.now += 1
    sender.resolve("paused/carol")
    down_server.start()
    run_sender_until(sender, lambda: len(down_server.recorded()) >= 4)
    order = [(b["key"], b["status"]) for b in down_server.alert_bodies()]
    assert order == [
        ("paused/carol", "firing"),
        ("paused/alice", "firing"),
        ("paused/bob", "firing"),
        ("paused/carol", "resolved"),
    ]


def test_state_recorded_during_a_request_stays_pending(
    server: RecordingServer, tmp_path: Path
) -> None:
    sender = make_sender([am_receiver(server)], tmp_path)
    server.hold = threading.Event()
    sender.fire(paused_alert())

    async def scenario() -> None:
        task = asyncio.create_task(sender.run())
        try:
            while not server.recorded():
                await asyncio.sleep(0.01)
            # The firing state is on the wire; it resolves before the receiver answers.
            sender.resolve("paused/alice", ends_at=START + 5)
            assert server.hold is not None
            server.hold.set()
            while len(server.recorded()) < 2:
                await asyncio.sleep(0.01)
            while sender.stats()["am"].spooled:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(scenario(), WAIT_TIMEOUT_S))
    first, second = server.alert_bodies()
    assert first["endsAt"] != rfc3339(START + 5)
    assert second["endsAt"] == rfc3339(START + 5)
    assert spool_document(tmp_path, "am")["alerts"] == []


# --- failures, spool, restarts ---------------------------------------------------------------


def test_receiver_down_spools_on_disk_and_in_stats(
    down_server: RecordingServer, tmp_path: Path
) -> None:
    clock = FakeClock()
    sender = make_sender([am_receiver(down_server)], tmp_path, clock=clock)
    sender.fire(paused_alert())
    # On disk before any delivery attempt: fire() returns only once it is spooled.
    assert spooled_keys(tmp_path, "am") == ["paused/alice"]

    run_sender_until(sender, lambda: sender.stats()["am"].sent_error >= 3)
    clock.now += 42
    stats = sender.stats()["am"]
    assert stats.sent_ok == 0
    assert stats.spooled == 1
    assert stats.oldest_spooled_age == pytest.approx(42)
    assert spooled_keys(tmp_path, "am") == ["paused/alice"]


def test_server_errors_are_retried_until_accepted(
    server: RecordingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.status = 500
    sender = make_sender([webhook_receiver(server)], tmp_path)
    sender.fire(paused_alert())

    def receiver_recovers() -> bool:
        server.status = 200
        return True

    with caplog.at_level(logging.WARNING, logger="spaceguard.alerts"):
        # One run, so that no request is cut short (and left uncounted) by a cancellation.
        run_sender_until(
            sender,
            lambda: (
                sender.stats()["hook"].sent_error >= 3
                and receiver_recovers()
                and all_delivered(sender)()
            ),
        )
    assert "HTTP 500" in caplog.text and "receiver says no" in caplog.text

    stats = sender.stats()["hook"]
    assert stats.sent_ok == 1
    assert stats.sent_error == len(server.recorded()) - 1
    assert {r.body["key"] for r in server.recorded()} == {"paused/alice"}


def test_unexpected_error_is_logged_and_retried(
    server: RecordingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_post = alerts.post_json
    calls = 0

    def buggy_then_fine(receiver: AlertReceiver, body: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        real_post(receiver, body)

    monkeypatch.setattr(alerts, "post_json", buggy_then_fine)
    sender = make_sender([webhook_receiver(server)], tmp_path)
    sender.fire(paused_alert())
    with caplog.at_level(logging.ERROR, logger="spaceguard.alerts"):
        run_sender_until(sender, all_delivered(sender))
    assert "unexpected delivery error" in caplog.text and "a bug" in caplog.text
    assert sender.stats()["hook"] == ReceiverStats(1, 1, 0, 0.0)


def test_restart_delivers_the_spool_exactly_once(
    down_server: RecordingServer, tmp_path: Path
) -> None:
    receivers = [webhook_receiver(down_server), am_receiver(down_server)]
    first_guard = make_sender(receivers, tmp_path)
    first_guard.fire(paused_alert())
    run_sender_until(first_guard, lambda: first_guard.stats()["hook"].sent_error >= 2)
    # The guard restarts while the receivers are down.

    second_guard = make_sender(receivers, tmp_path)
    assert {name: s.spooled for name, s in second_guard.stats().items()} == {"hook": 1, "am": 1}
    assert set(second_guard.firing_alerts()) == {"paused/alice"}
    down_server.start()
    run_sender_until(second_guard, all_delivered(second_guard))
    sent_everything(second_guard)

    hook_bodies = without_probe([r.body for r in down_server.recorded() if r.path == "/hook"])
    assert [(b["key"], b["status"]) for b in hook_bodies] == [("paused/alice", "firing")]
    am_alerts = without_probe(
        [a for r in down_server.recorded() if r.path == "/api/v2/alerts" for a in r.body]
    )
    assert [a["labels"]["account"] for a in am_alerts] == ["alice"]

    # A third start delivers nothing again; resolving after the restart still works.
    third_guard = make_sender(receivers, tmp_path, resend_interval_s=30.0)
    third_guard.resolve("paused/alice", ends_at=START + 99)
    run_sender_until(third_guard, all_delivered(third_guard))
    sent_everything(third_guard, "probe-2")
    bodies = without_probe(down_server.alert_bodies())
    assert len(bodies) == 4
    assert all(b["endsAt"] == rfc3339(START + 99) for b in bodies[2:])


def test_corrupt_spool_is_set_aside(
    server: RecordingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "am.json").write_text('{"format": "spaceguard-alert-spool", "vers')
    (tmp_path / ".am.json.abc123.tmp").write_text("half-written")
    with caplog.at_level(logging.ERROR, logger="spaceguard.alerts"):
        sender = make_sender([am_receiver(server)], tmp_path)
    set_aside = list(tmp_path.glob("am.json.corrupt-*"))
    assert len(set_aside) == 1
    assert set_aside[0].read_text().startswith('{"format"')
    assert "corrupt" in caplog.text
    assert not (tmp_path / ".am.json.abc123.tmp").exists()
    assert sender.stats()["am"].spooled == 0

    sender.fire(paused_alert())
    run_sender_until(sender, lambda: len(server.recorded()) >= 1)
    assert spool_document(tmp_path, "am")["receiver"] == "am"


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '{"format": "spaceguard-alert-spool", "version": 99, "receiver": "am", "alerts": []}',
        '{"format": "spaceguard-alert-spool", "version": 1, "receiver": "other", "alerts": []}',
        '{"format": "spaceguard-alert-spool", "version": 1, "receiver": "am",'
        ' "alerts": [{"key": "k", "pending": [{"alert": {"key": "k", "name": "N",'
        ' "labels": {"bad-label": "x"}, "annotations": {}, "starts_at": 1, "ends_at": null},'
        ' "enqueued_at": 1}], "delivered_firing": null}]}',
    ],
)
def test_spool_that_is_valid_json_but_not_a_spool_is_set_aside(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / "am.json").write_text(content)
    make_sender([AlertReceiver("am", "alertmanager", "http://127.0.0.1:9")], tmp_path)
    assert len(list(tmp_path.glob("am.json.corrupt-*"))) == 1


def test_spool_write_failure_keeps_the_alert_and_retries(
    server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = alerts.write_atomic
    disk_full = True

    def failing_write(path: Path, data: bytes) -> None:
        if disk_full:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(alerts, "write_atomic", failing_write)
    monkeypatch.setattr(alerts, "SPOOL_WRITE_RETRY_S", 0.02)
    server.status = 500
    sender = make_sender([am_receiver(server)], tmp_path)
    sender.fire(paused_alert())  # must not raise
    assert not (tmp_path / "am.json").exists()
    assert sender.stats()["am"].spooled == 1

    disk_full = False
    run_sender_until(sender, lambda: (tmp_path / "am.json").exists())
    assert spooled_keys(tmp_path, "am") == ["paused/alice"]


def test_a_new_receiver_is_sent_what_is_firing(server: RecordingServer, tmp_path: Path) -> None:
    old_hook = webhook_receiver(server)
    first = make_sender([old_hook], tmp_path)
    first.fire(paused_alert("alice"))
    first.fire(paused_alert("bob"))
    first.resolve("paused/bob")
    run_sender_until(first, all_delivered(first))

    new_hook = webhook_receiver(server, name="new-hook", url=server.url + "/new")
    second = make_sender([old_hook, new_hook], tmp_path)
    run_sender_until(second, all_delivered(second))
    sent_everything(second)
    new_bodies = without_probe([r.body for r in server.recorded() if r.path == "/new"])
    assert [(b["key"], b["status"]) for b in new_bodies] == [("paused/alice", "firing")]
    assert len(without_probe(server.alert_bodies())) == 4


def test_orphan_spool_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "removed-receiver.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="spaceguard.alerts"):
        AlertSender([], tmp_path)
    assert "removed-receiver.json" in caplog.text


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(tmp_path: Path) -> None:
    sender = AlertSender([], tmp_path, max_backoff_s=300.0, initial_backoff_s=1.0)
    for failures, full_delay in [(1, 1.0), (2, 2.0), (5, 16.0), (9, 256.0), (10, 300.0)]:
        delays = [sender._backoff_delay(failures) for _ in range(200)]
        assert all(full_delay / 2 <= d <= full_delay for d in delays), failures
        assert max(delays) - min(delays) > full_delay / 10  # jittered
    assert sender._backoff_delay(10_000) <= 300.0


def test_run_without_receivers_idles_until_cancelled(tmp_path: Path) -> None:
    sender = AlertSender([], tmp_path)
    sender.fire(paused_alert())
    sender.resolve("paused/unknown")
    assert sender.stats() == {}
    run_sender_for(sender, 0.05)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"key": ""},
        {"name": ""},
        {"labels": {"bad-name": "x"}},
        {"labels": {"alertname": "X"}},
        {"annotations": {"summary": 3}},
        {"ends_at": START - 1},
        {"starts_at": float("nan")},
    ],
)
def test_invalid_alerts_are_rejected_before_queueing(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GuardAlert(**{**paused_alert().__dict__, **change})


def test_alert_is_immune_to_later_changes_of_the_callers_dicts() -> None:
    labels = {"account": "alice"}
    alert = GuardAlert("k", "N", labels, {}, START)
    labels["account"] = "mallory"
    assert alert.labels == {"account": "alice"}


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "../etc"},
        {"name": ".hidden"},
        {"kind": "email"},
        {"url": "ftp://host/"},
        {"url": "localhost:9093"},
        {"bearer_token": "t", "basic_auth": ("u", "p")},
        {"timeout_s": 0},
    ],
)
def test_invalid_receivers_are_rejected(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AlertReceiver(**{"name": "am", "kind": "alertmanager", "url": "http://h:9093", **settings})


def test_duplicate_receiver_names_are_rejected(tmp_path: Path) -> None:
    receiver = AlertReceiver("am", "alertmanager", "http://127.0.0.1:9093")
    with pytest.raises(ValueError):
        AlertSender([receiver, receiver], tmp_path)


def test_an_http_proxy_in_the_environment_is_not_used(
    server: RecordingServer,
    down_server: RecordingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Debian's build environment sets a dead proxy; so do many production hosts, for the
    # internet. A local Alertmanager must still get its alerts.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, down_server.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    sender = make_sender([am_receiver(server)], tmp_path)
    sender.fire(paused_alert())
    run_sender_until(sender, all_delivered(sender))
    (request,) = server.recorded()
    assert request.path == "/api/v2/alerts"


def test_a_receiver_with_a_proxy_sends_through_it(server: RecordingServer, tmp_path: Path) -> None:
    proxy = RecordingServer()  # records the proxied request: its path is the absolute URL
    proxy.start()
    try:
        receiver = am_receiver(server, url="http://alertmanager.invalid:9093", proxy=proxy.url)
        sender = make_sender([receiver], tmp_path)
        sender.fire(paused_alert())
        run_sender_until(sender, all_delivered(sender))
        (request,) = proxy.recorded()
        assert request.path == "http://alertmanager.invalid:9093/api/v2/alerts"
        assert server.recorded() == []
    finally:
        proxy.stop()


# --- spool writes off the loop (the guard's BackgroundWriter) --------------------------------


def test_with_a_spool_writer_fire_never_waits_for_the_disk(
    server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk (here: a spool write that blocks until released) holds up neither fire()
    nor delivery; the spool reaches the disk once the disk answers, with the latest state."""
    release, entered = threading.Event(), threading.Event()
    real_write = alerts.write_atomic

    def slow_write(path: Path, data: bytes) -> None:
        entered.set()
        assert release.wait(WAIT_TIMEOUT_S)
        real_write(path, data)

    monkeypatch.setattr(alerts, "write_atomic", slow_write)
    writer = BackgroundWriter("alert spool writer")
    sender = make_sender([am_receiver(server)], tmp_path, spool_writer=writer)
    sender.fire(paused_alert("alice"))
    assert entered.wait(WAIT_TIMEOUT_S)  # the writer thread is stuck in the "fsync"
    for account in ("bob", "carol"):
        sender.fire(paused_alert(account))  # returns at once: handed over, coalesced
    assert writer.health().pending == 1
    run_sender_until(sender, all_delivered(sender))  # delivered from memory meanwhile
    assert {b["labels"]["account"] for b in server.alert_bodies()} == {"alice", "bob", "carol"}
    release.set()
    assert writer.flush(WAIT_TIMEOUT_S)
    document = spool_document(tmp_path, "am")
    assert sorted(entry["key"] for entry in document["alerts"]) == [
        "paused/alice",
        "paused/bob",
        "paused/carol",
    ]
    writer.close()


def test_an_unwritable_spool_directory_still_delivers_from_memory(
    server: RecordingServer, tmp_path: Path
) -> None:
    """The state dir cannot hold the spool (here a file sits where the directory goes:
    every mkdir fails, for root too): the sender starts anyway, delivers, and the writer
    reports the failure, which is what storehealth turns into an alert."""
    (tmp_path / "alerts").write_text("not a directory")
    writer = BackgroundWriter("alert spool writer", initial_backoff=0.01, max_backoff=0.01)
    sender = make_sender([webhook_receiver(server)], tmp_path / "alerts", spool_writer=writer)
    sender.fire(paused_alert())
    run_sender_until(sender, all_delivered(sender))
    assert [b["key"] for b in server.alert_bodies()] == ["paused/alice"]
    assert not writer.flush(WAIT_TIMEOUT_S)
    health = writer.health()
    assert not health.writable and "File exists" in health.last_error
    (tmp_path / "alerts").unlink()  # fixed: the next retry writes the latest spool
    assert writer.flush(WAIT_TIMEOUT_S)
    (entry,) = spool_document(tmp_path / "alerts", "hook")["alerts"]
    assert entry["key"] == "paused/alice" and entry["pending"] == []  # delivered, remembered
    writer.close()
