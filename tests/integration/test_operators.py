"""Operators in control, against the real guard running as a unit in the sandbox systemd:
every spaceguardctl verb, SO_PEERCRED refusals, crash recovery with saved state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.guardrig import REPO, GuardRig, read_status, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, SystemdSandbox, readable_package_dir, require

UNIT = "writer@alice.service"
SLEEPER = "sleeper@bob.service"


def python_for(uid: int) -> str:
    """A python3 another uid can run (ours may live under /root, as pyenv's does)."""
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [*drop, candidate, "-c", "import json"], capture_output=True, cwd="/", check=False
        )
        if probe.returncode == 0:
            return candidate
    require(False, f"no python3 that uid {uid} can run")
    raise AssertionError("unreachable")


def ctl(rig: GuardRig, *args: str, as_uid: int | None = None) -> subprocess.CompletedProcess[str]:
    python = sys.executable
    prefix: list[str] = []
    if as_uid is not None:
        require(shutil.which("setpriv") is not None, "setpriv is missing (util-linux)")
        prefix = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"]
        python = python_for(as_uid)
    command = [*prefix, python, "-m", "spaceguard.ctl", "--socket", str(rig.host_socket), *args]
    package = REPO / "daemon" if as_uid is None else readable_package_dir()
    env = dict(os.environ, PYTHONPATH=str(package), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, env=env, check=False, cwd="/"
    )


def ctl_json(rig: GuardRig, *args: str) -> object:
    result = ctl(rig, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def migration_status(rig: GuardRig, account: str) -> dict[str, object]:
    status = ctl_json(rig, "status")
    assert isinstance(status, dict)
    for migration in status["migrations"]:
        if migration["account"] == account:
            return migration
    raise AssertionError(f"{account} not in status")


def start_guard(
    sandbox: SystemdSandbox,
    volume: LoopVolume,
    tmp_path: Path,
    python: str,
    resume_after: str = "1s",
) -> GuardRig:
    (volume.mountpoint / "alice").mkdir(exist_ok=True)
    sandbox.up(
        {
            UNIT: writer_unit(python, volume.mountpoint / "alice", "120M", tmp_path / "w.status"),
            SLEEPER: "[Service]\nExecStart=/bin/sleep infinity\n",
        }
    )
    rig = ShippedRig(sandbox, tmp_path, python)
    rig.write_config(f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "{resume_after}"

        [[migrations]]
        account = "alice"
        unit = "{UNIT}"
        volume = "space"

        [[migrations]]
        account = "bob"
        unit = "{SLEEPER}"
        volume = "space"
        """)
    rig.install()
    rig.start()
    return rig


def test_every_verb(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(128)
    rig = start_guard(sandbox, volume, tmp_path, venv_python)
    sandbox.systemctl("start", SLEEPER)

    human = ctl(rig, "status")
    assert human.returncode == 0, human.stderr
    assert "bob" in human.stdout and SLEEPER in human.stdout and "running" in human.stdout
    assert ctl(rig, "version").returncode == 0

    paused = ctl(rig, "pause", "bob", "--reason", "disk swap tonight")
    assert paused.returncode == 0, paused.stderr
    sandbox.wait_for(SLEEPER, "FreezerState", "frozen")
    hold = migration_status(rig, "bob")["hold"]
    assert isinstance(hold, dict) and hold["by"] == "operator"
    assert "disk swap tonight" in hold["note"]
    assert "operator" in ctl(rig, "status").stdout

    # a paused migration cannot be dropped from the config: nobody would resume it
    full_config = rig.config_path.read_text()
    bob_table = full_config.index('[[migrations]]\naccount = "bob"')
    rig.config_path.write_text(full_config[:bob_table])
    dropped = ctl(rig, "reload")
    assert dropped.returncode == 1 and "'bob' is removed but still paused" in dropped.stderr
    assert sandbox.show(SLEEPER, "FreezerState") == "frozen"
    rig.config_path.write_text(full_config)

    resumed = ctl(rig, "resume", "bob")
    assert resumed.returncode == 0, resumed.stderr
    sandbox.wait_for(SLEEPER, "FreezerState", "running")
    again = ctl(rig, "resume", "bob")
    assert again.returncode == 1 and "not paused" in again.stderr

    busy = ctl(rig, "retry", "bob")
    assert busy.returncode == 1 and "already running" in busy.stderr
    unknown = ctl(rig, "pause", "nobody-here")
    assert unknown.returncode == 1 and "no migration" in unknown.stderr

    assert ctl_json(rig, "incidents") == []
    missing = ctl(rig, "show", "20990101T000000Z-bob-1")
    assert missing.returncode == 1
    assert ctl(rig, "ack", "20990101T000000Z-bob-1").returncode == 1

    reload = ctl(rig, "reload")
    assert reload.returncode == 0, reload.stderr
    check = ctl(rig, "check-config")
    assert check.returncode == 0 and "OK" in check.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[guard]\nstate_dir = 3\n")
    refused = ctl(rig, "check-config", str(bad))
    assert refused.returncode == 1 and "guard.state_dir" in refused.stderr
    usage = ctl(rig, "pause")
    assert usage.returncode == 2


def test_outsider_refused_and_logged(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(64)
    rig = start_guard(sandbox, volume, tmp_path, venv_python)
    # Open the file modes so that the guard's own SO_PEERCRED check is what refuses.
    rig.host_socket.chmod(0o666)
    for directory in rig.host_socket.parents:  # pytest's tmp dirs are 0700
        if directory == Path("/tmp"):
            break
        directory.chmod(directory.stat().st_mode | 0o001)
    denied = ctl(rig, "status", as_uid=65534)
    assert denied.returncode == 4, (denied.returncode, denied.stderr)
    assert "status needs root" in denied.stderr and "uid 65534" in denied.stderr
    change = ctl(rig, "pause", "bob", as_uid=65534)
    assert change.returncode == 4
    assert sandbox.show(SLEEPER, "FreezerState") == "running"
    journal = rig.journal()
    assert "control: refused status for uid 65534" in journal
    assert "control: refused pause for uid 65534" in journal


def test_guard_killed_while_frozen_is_restarted_and_thaws_later(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = make_ballast(volume, 140)
    rig = start_guard(sandbox, volume, tmp_path, venv_python)
    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "FreezerState", "frozen", timeout=30)
    first = rig.main_pid()
    sandbox.systemctl("kill", "-s", "KILL", "spaceguard.service")
    wait_until(
        lambda: (
            rig.main_pid() not in (0, first)
            and sandbox.show("spaceguard.service", "ActiveState") == "active"
        ),
        20,
        "systemd to restart the guard",
        on_timeout=rig.journal,
    )
    assert sandbox.show(UNIT, "FreezerState") == "frozen"
    alice = migration_status(rig, "alice")
    assert alice["state"] == "paused" and alice["hold"]["by"] == "guard"
    ballast.unlink()
    sandbox.wait_for(UNIT, "FreezerState", "running", timeout=30)
    sandbox.wait_for(UNIT, "ActiveState", "inactive", timeout=60)
    assert "ENOSPC" not in [word for word, _ in read_status(tmp_path / "w.status")]


def test_operator_hold_survives_restart_and_is_never_auto_resumed(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = make_ballast(volume, 140)
    rig = start_guard(sandbox, volume, tmp_path, venv_python)
    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "FreezerState", "frozen", timeout=30)
    # The operator takes the guard's hold over, then the guard restarts.
    assert ctl(rig, "pause", "alice", "--reason", "checking the partial copy").returncode == 0
    sandbox.systemctl("restart", "spaceguard.service")
    ballast.unlink()  # space is back, and the restarted guard says so after resume_after ...
    wait_until(
        lambda: "volume space recovered: " in rig.journal(),
        30,
        "the guard to see the volume recovered",
        on_timeout=rig.journal,
    )
    # ... and still leaves the operator's hold alone
    paused = 'spaceguard_migration_paused{account="alice",unit="' + UNIT + '"}'
    assert rig.metrics()[paused] == 1
    assert sandbox.show(UNIT, "FreezerState") == "frozen"
    assert f"thaw {UNIT}" not in rig.journal()
    alice = migration_status(rig, "alice")
    assert alice["hold"]["by"] == "operator"
    refused = ctl(rig, "retry", "alice")
    assert refused.returncode == 1
    assert ctl(rig, "resume", "alice").returncode == 0
    sandbox.wait_for(UNIT, "FreezerState", "running", timeout=10)


def test_a_thaw_by_hand_is_the_operators_decision(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(256, options=["nodelalloc"])
    make_ballast(volume, 150)
    rig = start_guard(sandbox, volume, tmp_path, venv_python)
    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "FreezerState", "frozen", timeout=30)
    rig.stop()
    sandbox.systemctl("thaw", UNIT)  # an operator, while the guard is down
    sandbox.systemctl("kill", "-s", "STOP", UNIT)  # keep it from filling the disk meanwhile
    rig.start()
    wait_until(
        lambda: "operator's decision" in rig.journal(),
        10,
        "the restarted guard to see the thaw",
        on_timeout=rig.journal,
    )
    alice = migration_status(rig, "alice")
    assert alice["hold"] is None
    sandbox.systemctl("stop", UNIT)


def test_corrupt_state_file_is_set_aside_and_reported(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(64)
    rig = start_guard(sandbox, volume, tmp_path, venv_python)
    rig.stop()
    state = rig.state_dir / "state.json"
    state.write_text('{"version": 1, "state": {"migrations": ')  # half-written
    rig.start()
    aside = list(rig.state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    status = ctl_json(rig, "status")
    assert isinstance(status, dict) and "set aside" in status["state_problem"]
    assert "set aside" in rig.journal()
    assert sandbox.show("spaceguard.service", "NRestarts") == "0"
