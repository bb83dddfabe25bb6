"""Fault (issue 12): a volume on a network file system that stops answering.

A real FUSE file system (tests/fusefs.py) is one of the guard's volumes; it stops
answering statfs/stat, as a hung NFS or sshfs mount does. The real guard, a Type=notify
unit as shipped (user spaceguard, every hardening line, its 10 s watchdog) in the
sandbox systemd, marks that volume unavailable and
freezes its migration, keeps freezing and thawing the migration of its other (ext4 loop)
volume, keeps pinging the watchdog, and recovers when the file system answers again.
"""

from __future__ import annotations

from tests.fusefs import FUSE_STATFS, HangingFuse, missing_for_fuse
from tests.guardrig import GUARD_UNIT, GuardRig, wait_until
from tests.installed import ShippedRig
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import require

ALICE = "writer@alice.service"
BOB = "sleeper@bob.service"
SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"
NET_UP = 'spaceguard_volume_up{volume="net"}'
UNAVAILABLE_BOB = (
    'spaceguard_migration_pause_info{account="bob",by="guard",reason="unavailable",unit="'
    + BOB
    + '"}'
)


def watchdog_pinged(rig: GuardRig) -> int:
    """systemd's record of the guard's latest WATCHDOG=1 (µs, monotonic; 0: none yet)."""
    return int(rig.sandbox.show(GUARD_UNIT, "WatchdogTimestampMonotonic") or 0)


def test_a_hung_fuse_volume_is_unavailable_and_the_guard_goes_on(
    loop_volume, sandbox, venv_python, tmp_path
):
    missing = missing_for_fuse()
    require(not missing, "cannot mount FUSE: " + "; ".join(missing))
    volume = loop_volume(256, options=["nodelalloc"])
    fuse = HangingFuse(tmp_path / "net")
    try:
        fuse.mount()  # before the sandbox boots: mount propagation into it is private
    except OSError as error:
        require(False, f"FUSE did not mount: {error}")
    try:
        sandbox.up({ALICE: SLEEPER, BOB: SLEEPER})
        rig = ShippedRig(sandbox, tmp_path, venv_python)  # WatchdogSec=10s, as shipped
        rig.write_config(f"""
            [volumes.space]
            path = "{volume.mountpoint}"
            pause_below = "32MiB"
            resume_above = "64MiB"
            resume_after = "1s"
            predict = "0s"

            [volumes.net]
            path = "{fuse.mountpoint}"
            pause_below = "5%"
            resume_above = "10%"
            resume_after = "1s"

            [[migrations]]
            account = "alice"
            unit = "{ALICE}"
            volume = "space"

            [[migrations]]
            account = "bob"
            unit = "{BOB}"
            volume = "net"
            """)
        rig.install()
        rig.start()
        pid = rig.main_pid()
        sandbox.systemctl("start", ALICE, BOB)
        wait_until(lambda: rig.metrics().get(NET_UP) == 1, 10, "the FUSE volume sampled")

        fuse.hang()
        sandbox.wait_for(BOB, "FreezerState", "frozen", timeout=20)
        metrics = rig.metrics()
        assert metrics[NET_UP] == 0
        assert metrics[UNAVAILABLE_BOB] == 1
        assert fuse.held(FUSE_STATFS) >= 1
        journal = rig.journal()
        assert "does not answer (statvfs waiting for" in journal
        wait_until(lambda: "net: UNAVAILABLE" in rig.status_text(), 5, "STATUS= to say so")

        # The watchdog is still earned: systemd records pings after the hang was seen.
        pinged = watchdog_pinged(rig)
        wait_until(lambda: watchdog_pinged(rig) > pinged, 20, "a WATCHDOG=1 after the hang")

        # The other volume is guarded as before: it runs low, alice is frozen; space comes
        # back, alice is thawed, all while statvfs of the FUSE volume hangs.
        ballast = make_ballast(volume, 200)
        sandbox.wait_for(ALICE, "FreezerState", "frozen", timeout=20)
        ballast.unlink()
        sandbox.wait_for(ALICE, "FreezerState", "running", timeout=20)
        assert fuse.held(FUSE_STATFS) >= 1, "the FUSE must still be hung here"
        assert sandbox.show(BOB, "FreezerState") == "frozen"
        pinged = watchdog_pinged(rig)
        wait_until(lambda: watchdog_pinged(rig) > pinged, 20, "another WATCHDOG=1")
        assert rig.main_pid() == pid, "the guard must not have been restarted"
        assert sandbox.show(GUARD_UNIT, "NRestarts") == "0"

        # The file system answers again: the volume is back, bob is thawed after the hold.
        fuse.answer()
        wait_until(lambda: rig.metrics().get(NET_UP) == 1, 10, "the FUSE volume back")
        sandbox.wait_for(BOB, "FreezerState", "running", timeout=20)
        journal = rig.journal()
        assert "answers again after" in journal
        assert "withholding the watchdog ping" not in journal
        assert rig.main_pid() == pid
    finally:
        fuse.umount()
