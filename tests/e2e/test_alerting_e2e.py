"""Issue 5 end to end: alerting that reaches people, with real components only.

* the real guard, a Type=notify unit in a real systemd sandbox, guarding a real writer
  (the migration stand-in) that fills a real 256 MiB ext4 loop volume;
* the real Alertmanager (Debian `prometheus-alertmanager`) receiving the guard's pushes and
  Prometheus's alerts, and notifying a local webhook (what people would be told);
* the real Prometheus (Debian `prometheus`) scraping the guard every second as
  `job_name: spaceguard` and evaluating the shipped rules every second, alerting to that
  Alertmanager. The shipped `for:` durations are minutes: Prometheus loads a copy of
  packaging/prometheus/spaceguard-rules.yml with every `for:` set to 1s (a text
  substitution, :func:`rules_with_short_for`); nothing else is changed;
* the guard's own generic webhook receiver, a local http.server recording JSON bodies.

Everything listens on 127.0.0.1 on free ports (the sandbox shares the host's network).
Every process started here is stopped at teardown, also when the test fails. Under
CI=true a missing Prometheus or Alertmanager binary fails the test; elsewhere it skips.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.guardrig import GuardRig, free_port, read_status, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, require, terminate

# The real-Alertmanager helpers of the AlertSender tests: one process that can be stopped
# and started again on the same port and storage, routing every alert (group_by alertname
# and account, group_wait 0s, group_interval 1s, repeat_interval 1h: a second notification
# would be a duplicate) to a webhook recorder; the recorder keeps every JSON body.
from tests.unit.test_alertmanager_real import Alertmanager, NotificationRecorder

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "packaging" / "prometheus" / "spaceguard-rules.yml"
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
STARTUP_TIMEOUT_S = 30.0

MIB = 1024 * 1024
WRITER = "writer@alice.service"
GUARD = "spaceguard.service"
PUSHED = "SpaceguardMigrationPaused"  # the guard's own alert (policy.py)
RULE = "SpaceguardMigrationPausedForSpace"  # the shipped Prometheus rule
RESEND_S = 2.0
RESUME_AFTER_S = 2.0


# --------------------------------------------------------------------------- components


def require_binaries() -> None:
    require(
        shutil.which("prometheus") is not None,
        "Prometheus not found (Debian package prometheus provides it)",
    )
    require(
        any(shutil.which(name) for name in ALERTMANAGER_BINARIES),
        "Alertmanager not found (Debian package prometheus-alertmanager provides it)",
    )


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def rules_with_short_for(source: Path, target: Path, duration: str = "1s") -> int:
    """Copy the shipped rules with every ``for:`` set to ``duration``; return how many.

    The shipped `for:` durations are minutes, which an end-to-end test cannot wait for.
    Only those values change: expressions, labels and annotations stay as shipped.
    """
    text, count = re.subn(
        r"^(\s+for:[ \t]*)\S+[ \t]*$", rf"\g<1>{duration}", source.read_text(), flags=re.MULTILINE
    )
    target.write_text(text)
    return count


class Prometheus:
    """The real Prometheus: scrapes one target as `job_name: spaceguard` every second,
    evaluates ``rules`` every second, alerts to one Alertmanager."""

    def __init__(self, workdir: Path, scrape_target: str, rules: Path, alertmanager: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.storage = workdir / "data"
        self.log = workdir / "prometheus.log"
        self.config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: spaceguard
    static_configs:
      - targets: ["{scrape_target}"]
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["{alertmanager}"]
""")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as ready,
            ):
                if ready.status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus not ready:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        """GET /api/v1/alerts: the rules' pending and firing alerts."""
        listed = get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        return [a for a in listed if a["labels"].get("alertname") == alertname]

    def query(self, expr: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"query": expr})
        result: list[dict[str, Any]] = get_json(f"{self.url}/api/v1/query?{query}")["data"][
            "result"
        ]
        return result


@pytest.fixture
def am_notifications() -> Iterator[NotificationRecorder]:
    """Alertmanager's webhook receiver: what people are told."""
    require_binaries()
    recorder = NotificationRecorder()
    try:
        yield recorder
    finally:
        recorder.stop()


@pytest.fixture
def guard_webhook() -> Iterator[NotificationRecorder]:
    """The guard's own generic webhook receiver: every JSON body POSTed to it."""
    recorder = NotificationRecorder()
    try:
        yield recorder
    finally:
        recorder.stop()


@pytest.fixture
def alertmanager(tmp_path: Path, am_notifications: NotificationRecorder) -> Iterator[Alertmanager]:
    """The real Alertmanager, not started yet: ``start()``, ``stop()``, ``start()``..."""
    require_binaries()
    workdir = tmp_path / "alertmanager"
    workdir.mkdir()
    manager = Alertmanager(workdir, am_notifications.url)
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str, str], Prometheus]]:
    """``prometheus(scrape_target, alertmanager)`` starts the real Prometheus with the
    shipped rules (``for:`` shortened to 1s); stopped at teardown."""
    require_binaries()
    rules = tmp_path / "spaceguard-rules.yml"
    alerts = len(re.findall(r"^\s+- alert:", RULES.read_text(), flags=re.MULTILINE))
    assert rules_with_short_for(RULES, rules) == alerts > 0, "every alert has a `for:`"
    started: list[Prometheus] = []

    def start(scrape_target: str, alertmanager: str) -> Prometheus:
        server = Prometheus(tmp_path / "prometheus", scrape_target, rules, alertmanager)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


# --------------------------------------------------------------------------- helpers


def guard_config(volume: LoopVolume, alertmanager_url: str, webhook_url: str) -> str:
    return f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "{RESUME_AFTER_S:g}s"
        predict = "10m"

        [[migrations]]
        account = "alice"
        unit = "{WRITER}"
        volume = "space"
        pause = "freeze"

        [alerts]
        resend_interval = "{RESEND_S:g}s"
        max_backoff = "1s"

        [[alerts.receivers]]
        name = "am"
        kind = "alertmanager"
        url = "{alertmanager_url}"
        timeout = "2s"

        [[alerts.receivers]]
        name = "hook"
        kind = "webhook"
        url = "{webhook_url}"
        timeout = "2s"
        """


def unix(rfc3339: str) -> float:
    """Alertmanager writes RFC 3339 with up to nanoseconds, the guard with microseconds."""
    head, _, fraction = rfc3339.removesuffix("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (fraction or "0"))


def am_alerts(alertmanager: Alertmanager, alertname: str) -> list[dict[str, Any]]:
    """Alertmanager's active alerts named ``alertname`` (a resolved alert is not listed)."""
    query = urllib.parse.urlencode({"active": "true", "filter": f'alertname="{alertname}"'})
    listed: list[dict[str, Any]] = get_json(f"{alertmanager.url}/api/v2/alerts?{query}")
    return [a for a in listed if a["labels"].get("alertname") == alertname]


def pushed(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The guard's pushes carry no `job` label; alerts from Prometheus's rules do."""
    return [a for a in alerts if "job" not in a["labels"]]


def hook_bodies(webhook: NotificationRecorder, status: str | None = None) -> list[dict[str, Any]]:
    """Bodies the guard POSTed to its webhook about alice's pause (with ``status``)."""
    return [
        b
        for b in list(webhook.notifications)
        if b.get("key") == "paused/alice"
        and b.get("alertname") == PUSHED
        and status in (None, b.get("status"))
    ]


def am_notified(
    recorder: NotificationRecorder, starts_at: float, status: str, since: int = 0
) -> list[dict[str, Any]]:
    """Alertmanager's notifications (from index ``since`` on) announcing the guard's pause
    alert that started at ``starts_at`` with ``status``: one entry per notification, so a
    duplicate notification shows as a second entry."""
    return [
        notification
        for notification in list(recorder.notifications)[since:]
        if any(
            alert["labels"].get("alertname") == PUSHED
            and "job" not in alert["labels"]
            and alert["status"] == status
            and abs(unix(alert["startsAt"]) - starts_at) < 0.01
            for alert in notification["alerts"]
        )
    ]


def metric(rig: GuardRig, name: str, default: float = -1.0) -> float:
    return rig.metrics().get(name, default)


SPOOLED_AM = 'spaceguard_alerts_spooled{receiver="am"}'
SPOOLED_HOOK = 'spaceguard_alerts_spooled{receiver="hook"}'
SENT_AM_ERROR = 'spaceguard_alerts_sent_total{receiver="am",result="error"}'
SENT_AM_OK = 'spaceguard_alerts_sent_total{receiver="am",result="ok"}'


# --------------------------------------------------------------------------- the test


def test_pause_alerts_reach_people_both_ways_and_survive_an_outage(
    loop_volume,
    sandbox,
    venv_python,
    tmp_path,
    alertmanager,
    am_notifications,
    guard_webhook,
    prometheus,
):
    began = time.monotonic()
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = make_ballast(volume, 140)
    status = tmp_path / "writer.status"
    (volume.mountpoint / "alice").mkdir()
    alertmanager.start()
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(guard_config(volume, alertmanager.url, guard_webhook.url))
    sandbox.up({WRITER: writer_unit(venv_python, volume.mountpoint / "alice", "120M", status)})
    rig.install()
    rig.start()
    prom = prometheus(f"127.0.0.1:{rig.metrics_port}", f"127.0.0.1:{alertmanager.port}")

    def diagnostics() -> str:
        return (
            f"--- guard journal ---\n{rig.journal()[-5000:]}\n"
            f"--- alertmanager ---\n{alertmanager.log.read_text()[-2000:]}\n"
            f"--- prometheus ---\n{prom.log_tail(2000)}"
        )

    wait_until(
        lambda: [s for s in prom.query('up{job="spaceguard"}') if s["value"][1] == "1"],
        15,
        "Prometheus to scrape the guard",
        interval=0.2,
        on_timeout=diagnostics,
    )

    # --- 1. fill: the guard freezes the migration and says so along both paths ----------
    sandbox.systemctl("start", WRITER)
    sandbox.wait_for(WRITER, "FreezerState", "frozen", timeout=30)
    assert "ENOSPC" not in [word for word, _ in read_status(status)]
    frozen_at = time.monotonic()

    # (a) the guard's own push: in Alertmanager's API, and at the guard's webhook
    (active,) = wait_until(
        lambda: pushed(am_alerts(alertmanager, PUSHED)),
        10,
        "the pushed pause alert in Alertmanager",
        on_timeout=diagnostics,
    )
    labels = active["labels"]
    assert {k: labels[k] for k in ("account", "unit", "volume", "by", "severity")} == {
        "account": "alice",
        "unit": WRITER,
        "volume": "space",
        "by": "guard",
        "severity": "warning",
    }
    assert labels["reason"] in {"space", "predicted"}, labels
    assert active["status"]["state"] == "active"
    assert active["annotations"]["summary"] == "Migration alice paused: space is low"
    first_start = unix(active["startsAt"])
    (fired,) = wait_until(
        lambda: hook_bodies(guard_webhook, "firing"),
        10,
        "the firing body at the guard's webhook",
        on_timeout=diagnostics,
    )
    assert (fired["version"], fired["source"], fired["endsAt"]) == ("1", "spaceguard", None)
    assert fired["labels"] == labels
    assert abs(unix(fired["startsAt"]) - first_start) < 0.01
    wait_until(
        lambda: am_notified(am_notifications, first_start, "firing"),
        10,
        "Alertmanager to notify the pushed alert",
        on_timeout=diagnostics,
    )
    pushed_in = time.monotonic() - frozen_at

    # (b) Prometheus: the shipped rule fires on the scraped metrics and reaches Alertmanager
    (rule,) = wait_until(
        lambda: [a for a in prom.alerts(RULE) if a["state"] == "firing"],
        20,
        f"Prometheus's {RULE} to fire",
        interval=0.2,
        on_timeout=diagnostics,
    )
    assert (rule["labels"]["account"], rule["labels"]["unit"]) == ("alice", WRITER)
    assert (rule["labels"]["job"], rule["labels"]["by"]) == ("spaceguard", "guard")
    assert rule["labels"]["severity"] == "warning"
    assert "Runbook scenario 3" in rule["annotations"]["description"]
    (from_rule,) = wait_until(
        lambda: [
            a for a in am_alerts(alertmanager, RULE) if a["labels"].get("job") == "spaceguard"
        ],
        10,
        f"{RULE} from Prometheus in Alertmanager",
        on_timeout=diagnostics,
    )
    assert from_rule["labels"]["account"] == "alice"
    rule_in = time.monotonic() - frozen_at
    assert sandbox.show(WRITER, "FreezerState") == "frozen"

    # --- free space: the guard thaws after the hold-down and resolves its alert ----------
    ballast.unlink()
    sandbox.wait_for(WRITER, "FreezerState", "running", timeout=30)
    # thawed at the end of the hold-down, as the guard says (its length: tests/unit)
    journal = rig.journal()
    recovered = journal.find("volume space recovered: ")
    assert recovered != -1, journal
    assert f"free for {RESUME_AFTER_S:g}s" in journal[recovered:].splitlines()[0], journal
    assert recovered < journal.find(f"thaw {WRITER} done"), journal
    wait_until(
        lambda: not pushed(am_alerts(alertmanager, PUSHED)),
        10,
        "the pushed alert to leave Alertmanager's active alerts",
        on_timeout=diagnostics,
    )
    (resolved,) = wait_until(
        lambda: hook_bodies(guard_webhook, "resolved"),
        10,
        "the resolved body at the guard's webhook",
        on_timeout=diagnostics,
    )
    assert resolved["startsAt"] == fired["startsAt"] and resolved["labels"] == labels
    assert unix(resolved["endsAt"]) >= unix(resolved["startsAt"])
    wait_until(
        lambda: am_notified(am_notifications, first_start, "resolved"),
        10,
        "Alertmanager to notify the resolution",
        on_timeout=diagnostics,
    )
    sandbox.wait_for(WRITER, "ActiveState", "inactive", timeout=60)
    assert [word for word, _ in read_status(status)][-1] == "DONE"
    wait_until(
        lambda: not prom.alerts(RULE),
        10,
        f"{RULE} to clear in Prometheus",
        interval=0.2,
        on_timeout=diagnostics,
    )
    # Re-sent every RESEND_S while firing, announced once; each state at the webhook once.
    assert len(am_notified(am_notifications, first_start, "firing")) == 1
    assert [b["status"] for b in hook_bodies(guard_webhook)] == ["firing", "resolved"]

    # --- 2. outage: Alertmanager is down while the guard pauses again; guard restarted ---
    alertmanager.stop()
    outage_began = time.monotonic()
    notifications_before = len(am_notifications.notifications)
    # The migration goes on with more data (continuing its file) and fills the volume again.
    sandbox.add_unit(
        WRITER, writer_unit(venv_python, volume.mountpoint / "alice", "1G", status, resume=True)
    )
    sandbox.daemon_reload()
    sandbox.systemctl("start", WRITER)
    sandbox.wait_for(WRITER, "FreezerState", "frozen", timeout=30)
    (second,) = wait_until(
        lambda: hook_bodies(guard_webhook, "firing")[1:],
        10,
        "the second pause at the guard's webhook",
        on_timeout=diagnostics,
    )
    second_start = unix(second["startsAt"])
    assert second_start > unix(resolved["endsAt"])
    wait_until(
        lambda: metric(rig, SPOOLED_AM) == 1 and metric(rig, SENT_AM_ERROR) >= 1,
        10,
        "the alert spooled for the unreachable Alertmanager",
        on_timeout=diagnostics,
    )

    old_pid = rig.main_pid()
    sandbox.systemctl("restart", GUARD, timeout=60)
    assert rig.main_pid() not in (0, old_pid)
    assert sandbox.show(WRITER, "FreezerState") == "frozen"
    assert metric(rig, SPOOLED_AM) == 1, "the spool did not survive the guard's restart"
    assert metric(rig, SPOOLED_HOOK) == 0
    # The new guard process tries the spooled alert itself (and fails: still down).
    wait_until(
        lambda: metric(rig, SENT_AM_ERROR) >= 1,
        10,
        "the restarted guard to retry the spooled alert",
        on_timeout=diagnostics,
    )
    assert metric(rig, SPOOLED_AM) == 1

    alertmanager.start()  # same port, same storage (its notification log)
    restarted = time.monotonic()
    (back,) = wait_until(
        lambda: pushed(am_alerts(alertmanager, PUSHED)),
        15,
        "the spooled alert in Alertmanager after its restart",
        on_timeout=diagnostics,
    )
    assert abs(unix(back["startsAt"]) - second_start) < 0.01
    assert (back["labels"]["account"], back["labels"]["unit"]) == ("alice", WRITER)
    wait_until(
        lambda: am_notified(am_notifications, second_start, "firing", notifications_before),
        10,
        "Alertmanager to notify the alert spooled during its outage",
        on_timeout=diagnostics,
    )
    wait_until(
        lambda: metric(rig, SPOOLED_AM) == 0, 10, "the spool to drain", on_timeout=diagnostics
    )
    delivered_in = time.monotonic() - restarted
    # After two more re-sends (every RESEND_S, de-duplicated by Alertmanager), and two flushes
    # of every Alertmanager group since, the alert must still be announced exactly once.
    sent_ok = metric(rig, SENT_AM_OK, 0)
    wait_until(
        lambda: metric(rig, SENT_AM_OK) >= sent_ok + 2,
        30,
        "two re-sends accepted by Alertmanager",
        on_timeout=diagnostics,
    )
    flushes = alertmanager.flushes()
    wait_until(
        lambda: alertmanager.flushed_every_group_twice_since(flushes),
        30,
        "Alertmanager to flush its groups after the re-sends",
        on_timeout=diagnostics,
    )
    assert len(am_notified(am_notifications, second_start, "firing", notifications_before)) == 1
    assert len(pushed(am_alerts(alertmanager, PUSHED))) == 1
    assert [b for b in hook_bodies(guard_webhook) if b["startsAt"] == second["startsAt"]] == [
        second
    ]
    assert [b["status"] for b in hook_bodies(guard_webhook)] == ["firing", "resolved", "firing"]
    metrics = rig.metrics()
    assert metrics[SPOOLED_AM] == 0 and metrics[SPOOLED_HOOK] == 0
    assert metrics[SENT_AM_OK] >= 1
    assert sandbox.show(WRITER, "FreezerState") == "frozen"
    print(
        f"\nalerting e2e: pushed alert notified {pushed_in:.1f}s after the freeze, rule "
        f"alert in Alertmanager after {rule_in:.1f}s; outage {restarted - outage_began:.1f}s, "
        f"spool drained {delivered_in:.1f}s after Alertmanager's restart; "
        f"total {time.monotonic() - began:.1f}s"
    )
