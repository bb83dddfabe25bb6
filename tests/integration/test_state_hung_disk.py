"""The state writer behind a disk that stops answering, for real: the state directory is a
FUSE file system (tests/fusefs.py) that holds every request without answering, as a hung
NFS or sshfs mount does. (This kernel has no dm-delay, so there is no slow block device;
a hung one is the worst case of slow.) The writer thread is stuck in the kernel; the real
guard (3 s watchdog) keeps freezing and thawing a migration on its ext4 volume, keeps
earning the watchdog, keeps one state copy waiting (the newest), and after 10 s reports
the hung write: metrics and STATUS=. (This FUSE file system implements no file creation:
the very first writes fail with ENOSYS, which is reported too; the retries then hang.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fusefs import HangingFuse, missing_for_fuse
from tests.guardrig import GuardRig, wait_until
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import require

SLEEPER = "sleeper@bob.service"
PENDING = 'spaceguard_state_writes_pending{store="state"}'
WRITABLE = 'spaceguard_state_writable{store="state"}'


def test_the_guard_guards_on_while_its_state_disk_hangs(
    loop_volume: Any, sandbox: Any, venv_python: str, tmp_path: Path
) -> None:
    missing = missing_for_fuse()
    require(not missing, "cannot mount FUSE: " + "; ".join(missing))
    volume = loop_volume(128, name="space")
    fuse = HangingFuse(tmp_path / "state")
    try:
        fuse.mount()  # before the sandbox boots: mount propagation into it is private
    except OSError as error:
        require(False, f"FUSE did not mount: {error}")
    try:
        sandbox.up({SLEEPER: "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"})
        rig = GuardRig(sandbox, tmp_path, venv_python)  # WatchdogSec=3s
        rig.state_dir = fuse.mountpoint
        rig.write_config(f"""
            [volumes.space]
            path = "{volume.mountpoint}"
            pause_below = "32MiB"
            resume_above = "64MiB"
            resume_after = "1s"
            predict = "0s"

            [[migrations]]
            account = "bob"
            unit = "{SLEEPER}"
            volume = "space"
            """)
        rig.install()
        rig.start()
        pid = rig.main_pid()
        sandbox.systemctl("start", SLEEPER)

        fuse.hang()  # from now on the state directory answers nothing
        for _ in range(2):  # freeze, thaw, freeze, thaw: each a state change to save
            ballast = make_ballast(volume, 110)
            sandbox.wait_for(SLEEPER, "FreezerState", "frozen", timeout=20)
            ballast.unlink()
            sandbox.wait_for(SLEEPER, "FreezerState", "running", timeout=20)
        wait_until(lambda: fuse.held() >= 1, 10, "the writer to be stuck in the kernel")
        metrics = rig.metrics()
        assert metrics[PENDING] == 1  # coalesced behind the hung write: the newest only
        wait_until(
            lambda: rig.metrics()[WRITABLE] == 0,
            30,
            "the hung write to be reported",
            on_timeout=rig.journal,
        )
        wait_until(lambda: "the disk hangs" in rig.status_text(), 10, "STATUS= to say so")
        ballast = make_ballast(volume, 110)  # and it still guards
        sandbox.wait_for(SLEEPER, "FreezerState", "frozen", timeout=20)
        assert rig.main_pid() == pid, "the watchdog never fired: the loop never waited"
    finally:
        fuse.umount()  # aborts the held requests: the writer thread gets ENOTCONN
