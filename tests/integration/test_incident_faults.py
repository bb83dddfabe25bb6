"""An incident the disk refuses, under the real guard: the incidents directory is locked
(chmod 000: the guard runs as root without any capability, so the mode binds it) or the
state volume (a tiny ext4 loop volume) is full when a migration fails. The guard records
the incident in memory: `spaceguardctl show` and `incidents` find it at once, the failure
alert that names it says it is not on disk yet, the metrics and an alert say the incidents
cannot be written; once the fault clears the incident file is written whole (log context,
partial report), and the alert is resolved."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guardrig import wait_until
from tests.integration.test_state_faults import Hook, boot, fill
from tests.integration.test_usage import ctl

SLEEPER = "sleeper@bob.service"  # the migration of test_state_faults.config
WRITABLE = 'spaceguard_state_writable{store="incidents"}'


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()
    yield receiver
    receiver.close()


@pytest.mark.parametrize("fault", ["no-access", "full"])
def test_an_incident_the_disk_refuses_is_kept_shown_and_written_later(
    fault: str, loop_volume: Any, sandbox: Any, venv_python: str, tmp_path: Path, hook: Hook
) -> None:
    rig, _state_volume, _volume = boot(loop_volume, sandbox, venv_python, tmp_path, hook)
    # bob's run fails by itself: exit status 1 is unrecoverable (no retry, an incident)
    sandbox.add_unit(SLEEPER, "[Service]\nExecStart=/bin/sh -c 'sleep 1; exit 1'\n")
    sandbox.daemon_reload()
    rig.start()
    incidents = rig.state_dir / "incidents"
    incidents.mkdir(exist_ok=True)
    if fault == "no-access":
        os.chmod(incidents, 0o000)
        clear = lambda: os.chmod(incidents, 0o750)  # noqa: E731
    else:
        clear = fill(rig.state_dir).unlink
    try:
        sandbox.systemctl("start", SLEEPER)
        wait_until(
            lambda: rig.metrics()[WRITABLE] == 0,
            30,
            "the metrics to say the incident cannot be written",
            on_timeout=rig.journal,
        )
        listed = ctl(rig, "--json", "incidents")
        assert listed.returncode == 0, listed.stderr
        (summary,) = json.loads(listed.stdout)
        incident_id = summary["id"]
        shown = ctl(rig, "show", incident_id)
        assert shown.returncode == 0, shown.stderr
        assert "exit" in shown.stdout and incident_id in shown.stdout
        failed = wait_until(
            lambda: [b for b in hook.bodies if b["key"] == "failed/bob"],
            20,
            "the failure alert",
            on_timeout=rig.journal,
        )
        description = failed[0]["annotations"]["description"]  # type: ignore[index]
        assert "not on disk yet" in description and incident_id in description
        wait_until(
            lambda: hook.states("incidents-unwritable") == ["firing"],
            20,
            "the incidents-unwritable alert",
        )
        assert "INCIDENTS NOT WRITTEN" in rig.status_text()
        # the writer's own report (the daemon's "recorded in memory only" depends on whether
        # the writer had tried yet when the incident was recorded: a race)
        assert f"cannot write {incident_id}" in rig.journal()
        assert not (fault == "full" and (incidents / f"{incident_id}.json").exists()), (
            "nothing on disk yet"
        )
    finally:
        clear()
    path = incidents / f"{incident_id}.json"
    wait_until(path.exists, 30, "the incident file, once the disk takes it", on_timeout=rig.journal)
    wait_until(
        lambda: hook.states("incidents-unwritable") == ["firing", "resolved"],
        30,
        "the alert to resolve",
    )
    record = json.loads(path.read_text())
    assert record["id"] == incident_id and record["account"] == "bob"
    assert record["partial"]["note"] == "no destination configured"  # the completed report
    assert (incidents / f"{incident_id}.txt").read_text().startswith(f"Incident {incident_id}")
    assert rig.metrics()[WRITABLE] == 1
    acked = ctl(rig, "ack", incident_id)
    assert acked.returncode == 0, acked.stderr
    wait_until(lambda: json.loads(path.read_text())["acked_by"] != "", 10, "the ack on disk")
