"""Faults (issue 12): systemd 252's freezer bugs, measured in the sandbox, and the guard
noticing and recovering from them.

* systemd#37569: a frozen unit whose processes are SIGKILLed ends `failed` with
  FreezerState still `frozen`; ThawUnit is refused ("Unit is inactive"); a start runs it
  unfrozen while the record still says frozen; a StopUnit clears the record.
* systemd#38517: a frozen unit with its own WatchdogSec= is killed by that watchdog:
  SIGABRT while frozen, `deactivating (stop-watchdog)` and frozen until its stop timeout,
  then SIGKILL, and it ends `failed (watchdog)` with the record still `frozen`.

The guard (the real one, a Type=notify unit in the sandbox, on a real ext4 loop volume)
takes a dead unit's frozen record for what it is, resets it before it starts the unit
again, and freezes the new run for real; a unit with its own watchdog it pauses by stop.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.guardrig import GUARD_UNIT, wait_until
from tests.installed import ShippedRig
from tests.integration.test_operators import ctl, ctl_json
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import SystemdSandbox

ALICE = "writer@alice.service"
SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"
PINGER = (
    "[Service]\nType=notify\nNotifyAccess=all\nWatchdogSec=2s\nTimeoutStopSec=3s\n"
    "ExecStart=/bin/bash -c 'systemd-notify --ready; "
    "while true; do systemd-notify WATCHDOG=1; sleep 0.5; done'\n"
)


def state(sandbox: SystemdSandbox, unit: str) -> tuple[str, str, str]:
    return tuple(  # type: ignore[return-value]
        sandbox.show(unit, prop) for prop in ("ActiveState", "FreezerState", "Result")
    )


def cgroup_frozen(sandbox: SystemdSandbox, unit: str) -> bool:
    """What the kernel says (cgroup.events), not systemd's record."""
    events = (sandbox.unit_cgroup(unit) / "cgroup.events").read_text()
    return "frozen 1" in events


def kill_all(sandbox: SystemdSandbox, unit: str) -> None:
    for pid in (sandbox.unit_cgroup(unit) / "cgroup.procs").read_text().split():
        os.kill(int(pid), signal.SIGKILL)


def require_252(sandbox: SystemdSandbox) -> None:
    version = sandbox.exec("systemctl", "--version").stdout.split()[1]
    if version != "252":
        pytest.skip(f"measures systemd 252 (Debian 12); this is systemd {version}")


def test_systemd_252_freezer_bugs_as_measured(sandbox):
    sandbox.up({"a.service": SLEEPER, "wd.service": PINGER})
    require_252(sandbox)

    # systemd#37569: SIGKILL while frozen
    sandbox.systemctl("start", "a.service")
    sandbox.systemctl("freeze", "a.service")
    kill_all(sandbox, "a.service")
    sandbox.wait_for("a.service", "ActiveState", "failed", timeout=10)
    assert state(sandbox, "a.service") == ("failed", "frozen", "signal")
    thaw = sandbox.systemctl("thaw", "a.service", check=False)
    assert thaw.returncode != 0 and "Unit is inactive" in thaw.stderr
    sandbox.systemctl("stop", "a.service")
    assert state(sandbox, "a.service") == ("failed", "frozen", "signal")  # no change
    sandbox.systemctl("start", "a.service")
    assert state(sandbox, "a.service") == ("active", "frozen", "success")  # the record lies
    assert not cgroup_frozen(sandbox, "a.service")  # ... it runs
    sandbox.systemctl("thaw", "a.service")  # what clears the record of a running unit
    assert state(sandbox, "a.service")[:2] == ("active", "running")
    sandbox.systemctl("freeze", "a.service")
    kill_all(sandbox, "a.service")
    sandbox.wait_for("a.service", "ActiveState", "failed", timeout=10)
    sandbox.systemctl("reset-failed", "a.service")  # and of a dead one (polkit verb not granted)
    assert state(sandbox, "a.service")[:2] == ("inactive", "running")

    # systemd#38517: a frozen unit's own watchdog fires
    sandbox.systemctl("start", "wd.service")
    sandbox.systemctl("freeze", "wd.service")
    sandbox.wait_for("wd.service", "SubState", "stop-watchdog", timeout=10)
    assert state(sandbox, "wd.service") == ("deactivating", "frozen", "watchdog")
    sandbox.wait_for("wd.service", "ActiveState", "failed", timeout=20)
    assert state(sandbox, "wd.service") == ("failed", "frozen", "watchdog")
    journal = sandbox.journal("wd.service")
    assert "Watchdog timeout (limit 2s)!" in journal
    assert "with signal SIGABRT" in journal and "with signal SIGKILL" in journal


def guard_config(volume_path: Path, retry_backoff: str = "1s") -> str:
    return f"""
        [volumes.space]
        path = "{volume_path}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "1s"
        predict = "0s"

        [[migrations]]
        account = "alice"
        unit = "{ALICE}"
        volume = "space"
        pause = "freeze"
        retry_backoff = "{retry_backoff}"
        max_retries = 3
        """


def test_the_guard_resets_a_dead_units_frozen_record_and_freezes_its_next_run(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(128)
    sandbox.up({ALICE: SLEEPER})
    require_252(sandbox)
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(guard_config(volume.mountpoint))
    rig.install()
    rig.start()
    sandbox.systemctl("start", ALICE)

    ballast = make_ballast(volume, 100)
    wait_until(
        lambda: sandbox.show(ALICE, "FreezerState") == "frozen",
        20,
        "the guard to freeze alice",
        on_timeout=rig.journal,
    )
    kill_all(sandbox, ALICE)  # someone SIGKILLs the frozen migration
    sandbox.wait_for(ALICE, "ActiveState", "failed", timeout=10)
    assert state(sandbox, ALICE) == ("failed", "frozen", "signal")
    wait_until(
        lambda: "kept the record (systemd#37569)" in rig.journal(),
        10,
        "the guard to notice the stale record",
        on_timeout=rig.journal,
    )
    status = ctl_json(rig, "status")
    assert isinstance(status, dict)
    [alice] = status["migrations"]
    assert alice["units"][ALICE]["freezer_state"] == "running"  # the truth: nothing frozen
    assert alice["units"][ALICE]["active_state"] == "failed"

    # Space comes back: the guard restarts the killed run (a transient failure), after
    # resetting the record; the new run really runs.
    ballast.unlink()
    wait_until(
        lambda: state(sandbox, ALICE)[0] == "active",
        60,
        "the guard to start alice again",
        on_timeout=rig.journal,
    )
    sandbox.wait_for(ALICE, "FreezerState", "running", timeout=10)
    assert not cgroup_frozen(sandbox, ALICE)
    journal = rig.journal()
    assert f"{ALICE}: stale freezer record reset (thawed) after the start" in journal
    # the kill was a failure of the run (retried), not someone's thaw, nor an unknown pause
    assert "alice: migration failed (transient, unit-failed)" in journal
    assert "thawed by someone else" not in journal
    assert "found frozen with no record" not in journal

    # ... and the next pause freezes it for real (the kernel says frozen).
    ballast = make_ballast(volume, 100)
    wait_until(
        lambda: cgroup_frozen(sandbox, ALICE),
        20,
        "the guard to freeze the new run (the cgroup frozen)",
        on_timeout=rig.journal,
    )
    assert sandbox.show(ALICE, "FreezerState") == "frozen"
    ballast.unlink()
    sandbox.wait_for(ALICE, "FreezerState", "running", timeout=30)
    assert sandbox.show(GUARD_UNIT, "NRestarts") == "0"


def test_a_unit_with_its_own_watchdog_is_paused_by_stop_not_killed_frozen(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(128)
    sandbox.up({ALICE: PINGER})
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(guard_config(volume.mountpoint))
    rig.install()
    rig.start()
    sandbox.systemctl("start", ALICE)
    checked = ctl(rig, "check-config")
    assert checked.returncode == 0, checked.stderr
    assert "WatchdogSec=2s" in checked.stdout and "systemd#38517" in checked.stdout
    status = ctl_json(rig, "status")
    assert isinstance(status, dict)
    assert status["migrations"][0]["pause"] == "stop"
    assert any("WatchdogSec=2s" in note for note in status["diagnostics"])

    ballast = make_ballast(volume, 100)
    sandbox.wait_for(ALICE, "ActiveState", "inactive", timeout=20)
    assert state(sandbox, ALICE) == ("inactive", "running", "success")  # stopped, not killed
    paused_for = f'spaceguard_migration_paused_seconds{{account="alice",unit="{ALICE}"}}'
    wait_until(
        lambda: rig.metrics()[paused_for] > 6, 30, "the pause to outlast the watchdog (2 s) x3"
    )
    assert state(sandbox, ALICE) == ("inactive", "running", "success")
    assert "Watchdog timeout" not in sandbox.journal(ALICE)
    ballast.unlink()
    sandbox.wait_for(ALICE, "ActiveState", "active", timeout=30)
    assert f"start {ALICE}: D-Bus call took" in rig.journal()
    assert state(sandbox, ALICE) == ("active", "running", "success")
