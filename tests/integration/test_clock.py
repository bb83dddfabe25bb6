"""The wall clock steps under a real guard (libfaketime from Debian steps the guard process's
CLOCK_REALTIME; its monotonic clocks stay true, as on a host whose NTP steps the time):
every interval the guard measures keeps its length."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.guardrig import GUARD_UNIT, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, SystemdSandbox, require

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def step_clock(offset_file: Path, seconds: int) -> None:
    # libfaketime's relative offset ("+3600", "-3600"), re-read on every clock read
    offset_file.write_text(f"{seconds:+d}\n")


def faketime_dropin(sandbox: SystemdSandbox, offset_file: Path) -> None:
    """Fault injection, not configuration: the guard's clock is stepped from outside."""
    require(LIBFAKETIME.exists(), f"{LIBFAKETIME} not found (Debian package libfaketime)")
    step_clock(offset_file, 0)
    dropin = sandbox.units_dir / f"{GUARD_UNIT}.d" / "zz-faketime.conf"
    dropin.write_text(
        textwrap.dedent(f"""\
        [Service]
        Environment=LD_PRELOAD={LIBFAKETIME}
        Environment=FAKETIME_TIMESTAMP_FILE={offset_file}
        Environment=FAKETIME_NO_CACHE=1
        Environment=DONT_FAKE_MONOTONIC=1
        """)
    )
    sandbox.daemon_reload()


def progress_unit(log: Path) -> str:
    """A migration stand-in that logs rclone-like progress every half second."""
    script = log.with_suffix(".sh")
    script.write_text(
        "#!/bin/sh\nn=0\nwhile :; do n=$((n+1)); "
        f"echo \"$(date '+%Y/%m/%d %H:%M:%S') INFO  : f$n: Copied (new)\" >> {log}; "
        "sleep 0.5; done\n"
    )
    script.chmod(0o755)
    return f"[Service]\nType=simple\nExecStart={script}\n"


def test_a_forward_step_beyond_stall_after_stops_nothing(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume: LoopVolume = loop_volume(64)
    log = tmp_path / "alice.log"
    offset = tmp_path / "faketime"
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "1MiB"
        resume_above = "2MiB"

        [[migrations]]
        account = "alice"
        unit = "progress@alice.service"
        volume = "space"
        log = "{log}"
        stall_after = "20s"
        """)
    sandbox.up({"progress@alice.service": progress_unit(log)})
    rig.install()
    faketime_dropin(sandbox, offset)
    sandbox.systemctl("start", "progress@alice.service")
    rig.start()
    lines = 'spaceguard_log_lines_total{account="alice"}'
    wait_until(
        lambda: rig.metrics().get(lines, 0) > 2,
        20,
        "the guard to read progress",
        on_timeout=lambda: (
            rig.metrics_text() + rig.journal() + sandbox.journal("progress@alice.service")
        ),
    )

    step_clock(offset, 3600)
    wait_until(
        lambda: "the system clock stepped by +36" in rig.journal(), 20, "the guard to see the step"
    )
    # positive sign that ticks ran after the step: more progress read, then check
    seen = rig.metrics()[lines]
    wait_until(lambda: rig.metrics()[lines] > seen + 4, 20, "more progress after the step")
    assert "no progress for" not in rig.journal()
    assert sandbox.show("progress@alice.service", "ActiveState") == "active"
    assert (
        rig.metrics()['spaceguard_migration_stalled{account="alice",unit="progress@alice.service"}']
        == 0
    )


def test_a_backward_step_keeps_the_hold_down_its_length(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume: LoopVolume = loop_volume(256, options=["nodelalloc"])
    ballast = make_ballast(volume, 200)
    offset = tmp_path / "faketime"
    status = tmp_path / "writer.status"
    (volume.mountpoint / "alice").mkdir()
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "2s"

        [[migrations]]
        account = "alice"
        unit = "writer@alice.service"
        volume = "space"
        """)
    sandbox.up(
        {
            "writer@alice.service": writer_unit(
                venv_python, volume.mountpoint / "alice", "40M", status
            )
        }
    )
    rig.install()
    faketime_dropin(sandbox, offset)
    rig.start()
    sandbox.systemctl("start", "writer@alice.service")
    sandbox.wait_for("writer@alice.service", "FreezerState", "frozen", timeout=30)

    ballast.unlink()  # space is back: the 2 s hold-down starts
    wait_until(
        lambda: (
            "recovered" not in rig.journal()
            and rig.metrics().get('spaceguard_volume_avail_bytes{volume="space"}', 0) > 64 * 2**20
        ),
        20,
        "the guard to see space",
    )
    step_clock(offset, -3600)
    # an hour back on the wall clock; 2 s of hold-down still mean 2 s
    sandbox.wait_for("writer@alice.service", "FreezerState", "running", timeout=30)
    assert "the system clock stepped by -36" in rig.journal()
