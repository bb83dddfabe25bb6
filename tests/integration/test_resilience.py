"""The guard keeps running, says what is wrong and acts again once it can: a system bus that
goes away and comes back, a volume that is unmounted under it."""

from __future__ import annotations

from tests.guardrig import read_status, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_space_guard import make_ballast

WRITER = "writer@alice.service"
SLEEPER = "sleeper@bob.service"
PAUSED_BOB = 'spaceguard_migration_paused{account="bob",unit="' + SLEEPER + '"}'


def config(mountpoint: str, resume_after: str = "1s") -> str:
    return f"""
        [volumes.space]
        path = "{mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "{resume_after}"
        predict = "0s"

        [[migrations]]
        account = "alice"
        unit = "{WRITER}"
        volume = "space"

        [[migrations]]
        account = "bob"
        unit = "{SLEEPER}"
        volume = "space"
        """


def test_bus_goes_away_and_comes_back(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = make_ballast(volume, 140)
    (volume.mountpoint / "alice").mkdir()
    status = tmp_path / "writer.status"
    sandbox.up(
        {
            WRITER: writer_unit(venv_python, volume.mountpoint / "alice", "120M", status),
            SLEEPER: "[Service]\nExecStart=/bin/sleep infinity\n",
        }
    )
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(str(volume.mountpoint)))
    rig.install()
    rig.start()
    pid = rig.main_pid()

    sandbox.systemctl("stop", "dbus.socket", "dbus.service")
    wait_until(
        lambda: rig.metrics()["spaceguard_dbus_connected"] == 0,
        10,
        "the guard to notice the bus is gone",
        on_timeout=rig.journal,
    )
    wait_until(lambda: "D-Bus DISCONNECTED" in rig.status_text(), 10, "STATUS= to say so")
    # The volume fills while the guard cannot act (systemctl reaches PID 1 without the bus).
    sandbox.systemctl("start", WRITER)
    wait_until(
        lambda: rig.metrics()['spaceguard_volume_low{volume="space"}'] == 1,
        30,
        "the volume to run low",
    )
    assert sandbox.show(WRITER, "FreezerState") == "running"

    sandbox.systemctl("start", "dbus.socket", "dbus.service")
    # ... and as soon as the bus is back, the guard acts on what it decided meanwhile.
    sandbox.wait_for(WRITER, "FreezerState", "frozen", timeout=30)
    assert rig.metrics()["spaceguard_dbus_connected"] == 1
    assert rig.main_pid() == pid, "the guard must ride out a bus restart, not crash"
    journal = rig.journal()
    assert "D-Bus connection lost" in journal and "D-Bus connection restored" in journal

    ballast.unlink()
    sandbox.wait_for(WRITER, "FreezerState", "running", timeout=30)
    sandbox.wait_for(WRITER, "ActiveState", "inactive", timeout=60)
    assert [word for word, _ in read_status(status)][-1] == "DONE"


def test_a_vanished_mount_pauses_and_recovers(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(128)
    sandbox.up(
        {
            WRITER: "[Service]\nExecStart=/bin/sleep infinity\n",
            SLEEPER: "[Service]\nExecStart=/bin/sleep infinity\n",
        }
    )
    # A host's systemd makes / shared, so a service's mount namespace sees later mounts and
    # unmounts; the sandbox booted as a container (private), so do what the host does.
    sandbox.exec("mount", "--make-rshared", "/", check=True)
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(str(volume.mountpoint)))
    rig.install()
    rig.start()
    pid = rig.main_pid()
    sandbox.systemctl("start", SLEEPER)

    # Unmounted inside the sandbox (the host keeps its mount, for the fixture's teardown).
    sandbox.exec("umount", "-l", str(volume.mountpoint), check=True)
    sandbox.wait_for(SLEEPER, "FreezerState", "frozen", timeout=10)
    metrics = rig.metrics()
    assert metrics['spaceguard_volume_up{volume="space"}'] == 0
    assert metrics[PAUSED_BOB] == 1
    assert (
        metrics[
            'spaceguard_migration_pause_info{account="bob",by="guard",'
            'reason="unavailable",unit="' + SLEEPER + '"}'
        ]
        == 1
    )
    wait_until(lambda: "UNAVAILABLE" in rig.status_text(), 5, "STATUS= to say so")
    assert "is not a mount point" in rig.journal()
    assert rig.main_pid() == pid

    sandbox.exec("mount", "-o", "loop", str(volume.image), str(volume.mountpoint), check=True)
    sandbox.wait_for(SLEEPER, "FreezerState", "running", timeout=15)
    assert rig.metrics()['spaceguard_volume_up{volume="space"}'] == 1
    assert rig.main_pid() == pid
