"""The size probe (issue 14) with real parts: the guard as shipped (tests.installed: its
units, unprivileged, freezing through its helper, starting the probe through real polkitd
with the rule `spaceguard polkit-rule` writes), a real rclone migration on a real ext4
loop volume, and a real `rclone size --json` oneshot as its size_unit. The pure behaviour
is tests/unit/test_size_probe.py.

- A source bigger than what fits: the migration's unit is held before it writes while the
  probe measures it, then held for admission (frozen, its alert at a real webhook, the
  metric), and starts once space is freed; nothing lost (rclone check).
- A source that fits: released as soon as the probe has answered.
- A probe whose file is not rclone's JSON: a warning naming the file, and the migration is
  admitted provisionally (a probe never blocks a migration for good).
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.guardrig import GuardRig, wait_until
from tests.installed import ShippedRig
from tests.integration.test_planning_real import webhook_alerts
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, require
from tests.unit.test_alertmanager_real import NotificationRecorder

MIB = 1024 * 1024
UNIT = "m365-migrate@alice.service"
PROBE = "m365-size@alice.service"


@pytest.fixture
def rclone() -> str:
    path = shutil.which("rclone")
    require(path is not None, "rclone is not installed (apt-get install rclone)")
    assert path is not None
    return path


def make_source(root: Path, files: int, mib_each: int) -> int:
    """A source tree of `files` files of `mib_each` MiB (distinct content); its bytes."""
    root.mkdir(parents=True)
    block = bytes(range(256)) * 4096  # 1 MiB
    for index in range(files):
        folder = root / f"folder-{index % 3}"
        folder.mkdir(exist_ok=True)
        with (folder / f"file-{index:03d}.bin").open("wb") as handle:
            handle.write(f"file {index}\n".encode())
            for _ in range(mib_each):
                handle.write(block)
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def migration_unit(rclone: str, source: Path, destination: Path, log: Path) -> str:
    # --bwlimit: the copy lasts a few seconds once it may write (not a race with the freeze)
    return textwrap.dedent(f"""\
        [Unit]
        Description=OneDrive to /space migration for alice (local source)
        [Service]
        Type=exec
        ExecStart={rclone} --config /dev/null copy {source} {destination} -v --stats 1s \\
            --bwlimit 16M --log-file {log}
        """)


def probe_unit(command: str) -> str:
    """The operator's size probe: a oneshot that writes rclone size --json's output."""
    return textwrap.dedent(f"""\
        [Unit]
        Description=Measure alice's source for spaceguard
        [Service]
        Type=oneshot
        ExecStart=/bin/sh -c '{command}'
        TimeoutStartSec=5min
        """)


def config(
    volume: LoopVolume, log: Path, destination: Path, size_file: Path, extra: str = ""
) -> str:
    return f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "1s"
        predict = "0s"

        [[migrations]]
        account = "alice"
        unit = "{UNIT}"
        volume = "space"
        log = "{log}"
        destination = "{destination}"
        max_retries = 0
        size_unit = "{PROBE}"
        size_file = "{size_file}"
        size_timeout = "2m"
        {extra}
        """


def hold_reason(rig: GuardRig) -> str | None:
    prefix = 'spaceguard_migration_pause_info{account="alice",'
    for name, value in rig.metrics().items():
        if name.startswith(prefix) and value == 1:
            return name.split('reason="', 1)[1].split('"', 1)[0]
    return None


def written(destination: Path) -> int:
    return sum(p.stat().st_size for p in destination.rglob("*") if p.is_file())


def rclone_check(rclone: str, source: Path, destination: Path) -> None:
    check = subprocess.run(
        [rclone, "--config", "/dev/null", "check", str(source), str(destination)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-3000:]


def notified(webhook: NotificationRecorder) -> list[dict[str, Any]]:
    return [body for body in list(webhook.notifications) if body.get("status") == "firing"]


def boot(
    sandbox: Any,
    rig: ShippedRig,
    rclone: str,
    source: Path,
    destination: Path,
    log: Path,
    probe_command: str,
) -> None:
    sandbox.up(
        {UNIT: migration_unit(rclone, source, destination, log), PROBE: probe_unit(probe_command)}
    )
    rig.install()
    rig.start()


def test_a_measured_source_that_cannot_fit_is_held_and_starts_once_space_is_freed(
    loop_volume, sandbox, venv_python, tmp_path, rclone
):
    volume = loop_volume(256, options=["nodelalloc"])
    # about 100 MiB free: 68 MiB above pause_below, the source's 120 MiB cannot fit
    ballast = make_ballast(volume, volume.usable_bytes // MIB - 100)
    source = tmp_path / "onedrive"
    size = make_source(source, files=12, mib_each=10)
    destination = volume.mountpoint / "alice"
    log = tmp_path / "m365-migrate-alice.log"
    size_file = tmp_path / "alice.size.json"
    webhook = NotificationRecorder()
    try:
        rig = ShippedRig(sandbox, tmp_path, venv_python)
        rig.write_config(config(volume, log, destination, size_file) + webhook_alerts(webhook.url))
        boot(
            sandbox,
            rig,
            rclone,
            source,
            destination,
            log,
            f"{rclone} --config /dev/null size --json {source} > {size_file}",
        )

        sandbox.systemctl("start", UNIT)
        wait_until(
            lambda: hold_reason(rig) == "admission",
            60,
            "the admission hold",
            on_timeout=rig.journal,
        )
        assert sandbox.show(UNIT, "FreezerState") == "frozen"
        journal = rig.journal()
        # measured first, while held (frozen) before it writes
        assert "alice: held before it writes: measuring what it has to copy" in journal
        assert "freeze m365-migrate@alice.service done (sizing)" in journal, journal
        assert f"alice: size probe: 120.0 MiB to copy ({size} bytes, {PROBE})" in journal
        assert sandbox.show(PROBE, "Result") == "success"
        # then held for admission, with the numbers
        assert "alice: held before it writes: alice needs 120.0 MiB more" in journal, journal
        assert written(destination) < 16 * MIB, written(destination)
        alert = wait_until(
            lambda: [
                b for b in notified(webhook) if b["alertname"] == "SpaceguardMigrationNotAdmitted"
            ],
            30,
            "the not-admitted alert at the webhook",
            on_timeout=rig.journal,
        )[0]
        assert alert["labels"]["reason"] == "admission", alert
        assert "alice needs 120.0 MiB more" in alert["annotations"]["description"], alert
        probes = 'spaceguard_actions_total{action="size",reason="admission",result="ok"}'
        assert rig.metrics().get(probes) == 1

        ballast.unlink()
        sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=120)
        assert sandbox.show(UNIT, "Result") == "success", sandbox.journal(UNIT)
        rclone_check(rclone, source, destination)
        journal = rig.journal()
        assert "alice: it fits now: releasing its hold" in journal
        assert "thaw m365-migrate@alice.service done (released)" in journal
        assert rig.metrics().get(probes) == 1  # one probe for the run
    finally:
        webhook.stop()


def test_a_measured_source_that_fits_is_released_after_the_probe(
    loop_volume, sandbox, venv_python, tmp_path, rclone
):
    volume = loop_volume(256, options=["nodelalloc"])
    source = tmp_path / "onedrive"
    make_source(source, files=6, mib_each=4)
    destination = volume.mountpoint / "alice"
    log = tmp_path / "m365-migrate-alice.log"
    size_file = tmp_path / "alice.size.json"
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(volume, log, destination, size_file))
    boot(
        sandbox,
        rig,
        rclone,
        source,
        destination,
        log,
        f"{rclone} --config /dev/null size --json {source} > {size_file}",
    )

    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=120)
    assert sandbox.show(UNIT, "Result") == "success", sandbox.journal(UNIT)
    rclone_check(rclone, source, destination)
    journal = wait_until(
        lambda: "alice: it fits now: releasing its hold" in rig.journal() and rig.journal(),
        30,
        "the release after the probe",
        on_timeout=rig.journal,
    )
    assert "alice: held before it writes: measuring what it has to copy" in journal
    assert "alice: size probe: 24.0 MiB to copy" in journal, journal
    assert "freeze m365-migrate@alice.service done (sizing)" in journal, journal
    assert "thaw m365-migrate@alice.service done (released)" in journal
    assert journal.index("size probe: 24.0 MiB") < journal.index("it fits now")
    assert "needs" not in journal.split("size probe: 24.0 MiB", 1)[1]  # never an admission hold
    assert hold_reason(rig) is None


def test_a_probe_whose_file_is_not_rclones_json_admits_provisionally(
    loop_volume, sandbox, venv_python, tmp_path, rclone
):
    volume = loop_volume(256, options=["nodelalloc"])
    source = tmp_path / "onedrive"
    make_source(source, files=3, mib_each=4)
    destination = volume.mountpoint / "alice"
    log = tmp_path / "m365-migrate-alice.log"
    size_file = tmp_path / "alice.size.json"
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(volume, log, destination, size_file))
    boot(sandbox, rig, rclone, source, destination, log, f"echo Total size: 12 MiB > {size_file}")

    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=120)
    assert sandbox.show(UNIT, "Result") == "success", sandbox.journal(UNIT)
    rclone_check(rclone, source, destination)
    journal = wait_until(
        lambda: "admitted provisionally" in rig.journal() and rig.journal(),
        30,
        "the provisional admission",
        on_timeout=rig.journal,
    )
    assert f"alice: size probe failed: {size_file}: not JSON" in journal, journal
    assert "thaw m365-migrate@alice.service done (released)" in journal
    errors = 'spaceguard_actions_total{action="size",reason="admission",result="error"}'
    assert rig.metrics().get(errors) == 1
