"""Issue 9, Fleet: two guards, one Prometheus, one Alertmanager, with real components only.

* two real guards as shipped (tests.installed.ShippedRig), each in its own real systemd
  sandbox, each guarding a migration named alice (the same account on purpose: only the
  `instance` label tells the two apart) on its own real ext4 loop volume;
* ONE real Prometheus scraping both as `job_name: spaceguard` (two targets, so two
  `instance` labels) and evaluating the shipped rules (a copy with `for:` set to 1s,
  tests.e2e.test_alerting_e2e.rules_with_short_for), alerting to
* ONE real Alertmanager whose route groups by instance and sends each guard's alerts to
  its own webhook receiver (route matchers on `instance`), as packaging/README-alerting.md
  ("A fleet of guards") recommends.

What it shows: guard A pauses its migration (its volume runs low), guard B does not; the
rule's SpaceguardMigrationPausedForSpace carries A's instance and reaches A's webhook only,
and B's webhook stays quiet (checked after A's notification arrived, and after Alertmanager
flushed every group twice since). The guards also push their own alerts there, labelled
with their instance by `[alerts.labels]`: A's push reaches A's webhook only. Every panel
expression of the shipped Grafana dashboard, evaluated through Prometheus's
/api/v1/query with `$instance` set to one guard, returns that guard's series only; with an
unknown instance it returns nothing.

Under CI=true a missing Prometheus or Alertmanager fails the test; elsewhere it skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_alerting_e2e import (
    RULE,
    RULES,
    Prometheus,
    am_alerts,
    require_binaries,
    rules_with_short_for,
)
from tests.guardrig import read_status, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, SandboxError, SystemdSandbox, require
from tests.unit.test_alertmanager_real import Alertmanager, NotificationRecorder
from tests.unit.test_grafana_dashboard import GRAFANA_SUBSTITUTES, all_panels, load_dashboard

pytestmark = pytest.mark.e2e

WRITER = "writer@alice.service"


def guard_config(volume: LoopVolume, alertmanager_url: str, instance: str) -> str:
    """The guard pushes its own alerts to the shared Alertmanager too, saying which guard
    it is with [alerts.labels] (the same instance Prometheus gives its scrape target)."""
    return f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "2s"
        predict = "10m"

        [[migrations]]
        account = "alice"
        unit = "{WRITER}"
        volume = "space"
        pause = "freeze"

        [alerts]
        max_backoff = "1s"
        labels = {{ instance = "{instance}" }}

        [[alerts.receivers]]
        name = "am"
        kind = "alertmanager"
        url = "{alertmanager_url}"
        timeout = "2s"
        """


def fleet_alertmanager_config(hooks: dict[str, str]) -> str:
    """Group by instance; each instance's alerts to its own receiver (matchers)."""
    routes = "".join(
        f"""    - matchers: ['instance="{instance}"']
      receiver: {name(instance)}
"""
        for instance in hooks
    )
    receivers = "".join(
        f"""  - name: {name(instance)}
    webhook_configs:
      - url: {url}
        send_resolved: true
"""
        for instance, url in hooks.items()
    )
    return f"""
route:
  receiver: nobody
  group_by: [instance, alertname]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
  routes:
{routes}receivers:
  - name: nobody
{receivers}"""


def name(instance: str) -> str:
    return "guard-" + re.sub(r"\W", "-", instance)


def notified(recorder: NotificationRecorder, alertname: str) -> list[dict[str, Any]]:
    """Alerts named ``alertname`` in the notifications ``recorder`` received."""
    return [
        alert
        for notification in list(recorder.notifications)
        for alert in notification["alerts"]
        if alert["labels"].get("alertname") == alertname
    ]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target of the shipped dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def substituted(expression: str, instance_regex: str) -> str:
    """What Grafana sends: ``$instance`` set to one guard, the rest as the unit test does."""
    expression = expression.replace("$instance", instance_regex)
    for variable, value in GRAFANA_SUBSTITUTES.items():
        expression = expression.replace(variable, value)
    return expression


def promql_regex(instance: str) -> str:
    """The regex matching exactly ``instance``, escaped for a PromQL string (as Grafana
    formats a regex variable)."""
    return re.escape(instance).replace("\\", "\\\\")


def label_sets(series: list[dict[str, Any]]) -> list[tuple[tuple[str, str], ...]]:
    return sorted(tuple(sorted(s["metric"].items())) for s in series)


@pytest.fixture
def sandbox_b(tmp_path: Path, loop_volume: Any, request: pytest.FixtureRequest) -> SystemdSandbox:
    """The second guard's sandbox (the ``sandbox`` fixture is the first); after
    ``loop_volume`` so that it goes down before the volumes are unmounted."""
    second = SystemdSandbox(tmp_path / "sandbox-b")
    request.addfinalizer(second.down)
    return second


@pytest.fixture
def hooks() -> Iterator[tuple[NotificationRecorder, NotificationRecorder]]:
    """Alertmanager's two webhook receivers, one per guard."""
    require_binaries()
    a, b = NotificationRecorder(), NotificationRecorder()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_two_guards_alert_and_chart_per_instance(
    loop_volume, sandbox, sandbox_b, venv_python, tmp_path, hooks
):
    require_binaries()
    hook_a, hook_b = hooks
    # volumes before any sandbox boots (mount propagation is private)
    volume_a = loop_volume(256, name="vol-a", options=["nodelalloc"])
    volume_b = loop_volume(256, name="vol-b", options=["nodelalloc"])
    make_ballast(volume_a, 140)
    status_a = tmp_path / "writer-a.status"
    (volume_a.mountpoint / "alice").mkdir()
    (volume_b.mountpoint / "alice").mkdir()

    workdir = tmp_path / "alertmanager"
    workdir.mkdir()
    manager = Alertmanager(workdir, hook_a.url)
    rigs = {}
    for key, box, volume in (("a", sandbox, volume_a), ("b", sandbox_b, volume_b)):
        workdir = tmp_path / f"guard-{key}"
        workdir.mkdir()
        workdir.chmod(0o755)
        rig = ShippedRig(box, workdir, venv_python)
        rig.write_config(guard_config(volume, manager.url, f"127.0.0.1:{rig.metrics_port}"))
        rigs[key] = rig
    sandbox.up({WRITER: writer_unit(venv_python, volume_a.mountpoint / "alice", "120M", status_a)})
    error = None
    try:
        sandbox_b.up()
    except SandboxError as exc:
        error = str(exc)
    # as the sandbox fixture does: fail under CI, skip elsewhere (outside `except`)
    require(error is None, f"cannot boot the second sandbox: {error}")
    for rig in rigs.values():
        rig.install()
        rig.start()
    instance_a = f"127.0.0.1:{rigs['a'].metrics_port}"
    instance_b = f"127.0.0.1:{rigs['b'].metrics_port}"

    manager.config.write_text(
        fleet_alertmanager_config({instance_a: hook_a.url, instance_b: hook_b.url})
    )
    rules = tmp_path / "spaceguard-rules.yml"
    assert rules_with_short_for(RULES, rules) > 0
    prom = Prometheus(tmp_path / "prometheus", instance_a, rules, f"127.0.0.1:{manager.port}")
    prom.config.write_text(
        prom.config.read_text().replace(
            f'targets: ["{instance_a}"]', f'targets: ["{instance_a}", "{instance_b}"]'
        )
    )
    try:
        manager.start()
        prom.start()
        _fleet(prom, manager, rigs, sandbox, status_a, instance_a, instance_b, hook_a, hook_b)
    finally:
        prom.stop()
        manager.stop()


def _fleet(
    prom: Prometheus,
    manager: Alertmanager,
    rigs: dict[str, ShippedRig],
    sandbox: SystemdSandbox,
    status_a: Path,
    instance_a: str,
    instance_b: str,
    hook_a: NotificationRecorder,
    hook_b: NotificationRecorder,
) -> None:
    def diagnostics() -> str:
        return (
            f"--- guard A journal ---\n{rigs['a'].journal()[-3000:]}\n"
            f"--- guard B journal ---\n{rigs['b'].journal()[-3000:]}\n"
            f"--- alertmanager ---\n{manager.log.read_text()[-2000:]}\n"
            f"--- prometheus ---\n{prom.log_tail(2000)}"
        )

    wait_until(
        lambda: (
            {
                s["metric"]["instance"]
                for s in prom.query(
                    'up{job="spaceguard"} == 1 and on(instance) spaceguard_build_info'
                )
            }
            == {instance_a, instance_b}
        ),
        20,
        "Prometheus to scrape both guards",
        interval=0.2,
        on_timeout=diagnostics,
    )

    # --- guard A's volume runs low: A freezes its migration; B has nothing to do ----------
    sandbox.systemctl("start", WRITER)
    sandbox.wait_for(WRITER, "FreezerState", "frozen", timeout=30)
    assert "ENOSPC" not in [word for word, _ in read_status(status_a)]

    (rule,) = wait_until(
        lambda: [a for a in prom.alerts(RULE) if a["state"] == "firing"],
        20,
        f"Prometheus's {RULE} to fire",
        interval=0.2,
        on_timeout=diagnostics,
    )
    assert (rule["labels"]["instance"], rule["labels"]["account"]) == (instance_a, "alice")
    (at_a,) = wait_until(
        lambda: notified(hook_a, RULE),
        15,
        f"{RULE} at guard A's webhook",
        interval=0.2,
        on_timeout=diagnostics,
    )
    assert at_a["labels"]["instance"] == instance_a
    assert at_a["labels"]["job"] == "spaceguard"
    assert at_a["status"] == "firing"
    # A's notification arrived (a positive sign); now let Alertmanager flush every group
    # twice more, so anything meant for B would have been sent by now.
    flushes = manager.flushes()
    wait_until(
        lambda: manager.flushed_every_group_twice_since(flushes),
        20,
        "Alertmanager to flush its groups twice after A's notification",
        on_timeout=diagnostics,
    )
    assert notified(hook_b, RULE) == [], "guard A's alert reached guard B's receiver"
    # the guard's own push carries its instance ([alerts.labels]): routed the same way
    (pushed,) = notified(hook_a, "SpaceguardMigrationPaused")
    assert (pushed["labels"]["instance"], pushed["labels"]["account"]) == (instance_a, "alice")
    assert notified(hook_b, "SpaceguardMigrationPaused") == []
    assert [a["labels"]["instance"] for a in am_alerts(manager, RULE)] == [instance_a]
    assert [a["labels"]["instance"] for a in prom.alerts(RULE)] == [instance_a]
    assert all(
        alert["labels"].get("instance") == instance_a
        for notification in hook_a.notifications
        for alert in notification["alerts"]
    )
    assert all(
        alert["labels"].get("instance") == instance_b
        for notification in hook_b.notifications
        for alert in notification["alerts"]
    )

    # --- the shipped dashboard, per instance -----------------------------------------------
    both_shown: set[str] = set()
    checked = 0
    for title, expression in dashboard_expressions():
        assert "$instance" in expression, f"{title}: {expression} ignores the Guard variable"
        every = prom.query(substituted(expression, ".*"))
        per = {
            instance: prom.query(substituted(expression, promql_regex(instance)))
            for instance in (instance_a, instance_b)
        }
        unknown = prom.query(substituted(expression, promql_regex("127.0.0.1:1")))
        assert unknown == [], f"{title}: {expression} shows other guards' series: {unknown}"
        for instance, series in per.items():
            wrong = [s for s in series if s["metric"].get("instance", instance) != instance]
            assert wrong == [], f"{title}: {expression} for {instance} returned {wrong}"
        if all("instance" in s["metric"] for s in every):
            # each guard's series separately: together exactly what "All" shows
            assert label_sets(every) == label_sets(per[instance_a] + per[instance_b]), (
                title,
                expression,
            )
            if per[instance_a] and per[instance_b]:
                both_shown.add(title)
        checked += 1
    assert checked == len(dashboard_expressions())
    # the panels every guard fills from its first scrape show both guards, separately
    assert {
        "Volume state",
        "Available to the migrations",
        "Current state",
        "Paused",
        "D-Bus to systemd",
        "Version",
    } <= both_shown, both_shown
    # the pause is A's only, on the dashboard too
    paused = prom.query(
        substituted(
            'spaceguard_migration_pause_info{instance=~"$instance",account=~"$account"} == 1',
            ".*",
        )
    )
    assert [s["metric"]["instance"] for s in paused] == [instance_a]
    print(
        f"\nfleet e2e: {checked} dashboard expressions checked per instance; "
        f"{len(both_shown)} panels showed both guards separately"
    )
