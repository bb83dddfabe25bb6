"""Scenario 1 end to end with real rclone: a migration unit copies from a local WebDAV remote
(`rclone serve webdav`, itself a unit) into a loop volume; the guard, a Type=notify unit,
detects failures, stops, verifies, writes incidents and retries."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.guardrig import GuardRig, free_port, wait_until
from tests.sandbox import LoopVolume, SystemdSandbox, require

MIB = 1024 * 1024
UNIT = "m365-migrate@alice.service"
REMOTE = "webdav-remote.service"


@pytest.fixture
def rclone() -> str:
    path = shutil.which("rclone")
    require(path is not None, "rclone is not installed (apt-get install rclone)")
    assert path is not None
    return path


class Migration:
    """A source tree served over WebDAV, an rclone config, and the units around them."""

    def __init__(
        self,
        tmp: Path,
        rclone: str,
        volume: LoopVolume,
        *,
        files: int = 24,
        size: int = MIB,
        password: str = "secret",
    ) -> None:
        self.tmp, self.rclone, self.volume = tmp, rclone, volume
        self.source = tmp / "onedrive"
        self.source.mkdir()
        for index in range(files):
            (self.source / f"doc-{index:03d}.bin").write_bytes(bytes([index % 251]) * size)
        self.port = free_port()
        self.conf = tmp / "rclone.conf"
        obscured = subprocess.run(
            [rclone, "obscure", password], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.conf.write_text(
            f"[m365-alice]\ntype = webdav\nurl = http://127.0.0.1:{self.port}\n"
            f"user = alice\npass = {obscured}\n"
        )
        self.destination = volume.mountpoint / "alice"
        self.log = tmp / "m365-migrate-alice.log"

    def remote_unit(self) -> str:
        return textwrap.dedent(f"""\
            [Service]
            ExecStart={self.rclone} serve webdav {self.source} \\
                --addr 127.0.0.1:{self.port} --user alice --pass secret
            """)

    def copy_command(self, rate: str) -> str:
        return (
            f"{self.rclone} --config {self.conf} copy m365-alice: {self.destination} "
            f"--bwlimit {rate} -v --stats 1s --transfers 1 --retries 1 "
            f"--low-level-retries 1 --contimeout 2s --timeout 5s"
        )

    def migration_unit(self, rate: str = "2M") -> str:
        return textwrap.dedent(f"""\
            [Service]
            ExecStart={self.copy_command(rate)} --log-file {self.log}
            """)

    def config(self, extra: str = "") -> str:
        retries = "" if "max_retries" in extra else "max_retries = 2"
        return f"""
            [volumes.space]
            path = "{self.volume.mountpoint}"
            pause_below = "16MiB"
            resume_above = "32MiB"
            resume_after = "1s"
            predict = "0s"

            [[migrations]]
            account = "alice"
            unit = "{UNIT}"
            volume = "space"
            log = "{self.log}"
            destination = "{self.destination}"
            {retries}
            retry_backoff = "1s"
            {extra}
            """


def incidents(rig: GuardRig) -> list[dict[str, object]]:
    directory = rig.state_dir / "incidents"
    if not directory.exists():
        return []
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


def boot(
    sandbox: SystemdSandbox,
    rig: GuardRig,
    migration: Migration,
    config_extra: str = "",
    rate: str = "2M",
    migration_unit: str | None = None,
    extra_units: dict[str, str] | None = None,
) -> None:
    sandbox.up(
        {
            REMOTE: migration.remote_unit(),
            UNIT: migration_unit or migration.migration_unit(rate),
            **(extra_units or {}),
        }
    )
    rig.write_config(migration.config(config_extra))
    rig.install()
    sandbox.systemctl("start", REMOTE)
    wait_until(lambda: _port_open(migration.port), 10, "the WebDAV remote to listen")
    rig.start()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def copied_files(migration: Migration) -> int:
    if not migration.destination.exists():
        return 0
    return sum(1 for path in migration.destination.iterdir() if path.is_file())


def test_remote_dies_transient_stop_incident_retry_finish(
    loop_volume, sandbox, venv_python, tmp_path, rclone
):
    volume = loop_volume(128)
    migration = Migration(tmp_path, rclone, volume)
    rig = GuardRig(sandbox, tmp_path, venv_python)
    verify = f'verify_command = ["{rclone}", "--config", "{migration.conf}", "lsd", "m365-alice:"]'
    boot(sandbox, rig, migration, verify)
    sandbox.systemctl("start", UNIT)
    wait_until(lambda: copied_files(migration) >= 2, 30, "some files to be copied")
    sandbox.systemctl("stop", REMOTE)  # the remote dies mid-copy
    found = wait_until(lambda: incidents(rig), 60, "an incident", on_timeout=rig.journal)
    incident = found[0]
    assert incident["class"] == "transient"
    assert incident["account"] == "alice"
    assert incident["verify"].startswith("failed")  # the remote is down: verification says so
    assert "retry 1 of 2" in incident["outcome"]
    assert any(
        "connection refused" in line for line in incident["matched_lines"] + incident["context"]
    )
    assert incident["partial"]["files"] >= 2
    assert (rig.state_dir / "incidents" / f"{incident['id']}.txt").exists()
    sandbox.systemctl("start", REMOTE)  # the remote is back before the retry
    wait_until(
        lambda: copied_files(migration) == 24 and sandbox.show(UNIT, "ActiveState") == "inactive",
        90,
        "the retried migration to finish",
        on_timeout=rig.journal,
    )
    assert sandbox.show(UNIT, "Result") == "success"
    check = subprocess.run(
        [rclone, "check", str(migration.source), str(migration.destination)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    metrics = rig.metrics()
    assert metrics['spaceguard_migration_retries_total{account="alice",unit="' + UNIT + '"}'] >= 1
    assert metrics['spaceguard_incidents_total{account="alice"}'] == 1
    journal = rig.journal()
    assert "retry 1 of 2: starting" in journal


def test_wrong_credentials_unrecoverable_no_retry(
    loop_volume, sandbox, venv_python, tmp_path, rclone
):
    volume = loop_volume(64)
    migration = Migration(tmp_path, rclone, volume, password="not-the-password")
    rig = GuardRig(sandbox, tmp_path, venv_python)
    # verification by a oneshot unit of the operator's (what an unprivileged guard may start)
    verify = textwrap.dedent(f"""\
        [Service]
        Type=oneshot
        ExecStart={rclone} --config {migration.conf} lsd m365-alice:
        """)
    boot(
        sandbox,
        rig,
        migration,
        'verify_unit = "m365-verify@alice.service"',
        extra_units={"m365-verify@alice.service": verify},
    )
    sandbox.systemctl("start", UNIT, check=False)
    found = wait_until(lambda: incidents(rig), 30, "an incident", on_timeout=rig.journal)
    incident = found[0]
    assert incident["verify"].startswith("failed: verification m365-verify@alice.service")
    assert "401" in sandbox.journal("m365-verify@alice.service")
    assert incident["class"] == "unrecoverable"
    assert "operator" in incident["outcome"]
    assert any("401" in line for line in incident["matched_lines"])
    time.sleep(3)  # longer than the retry backoff: nothing may restart it
    assert sandbox.show(UNIT, "ActiveState") in ("inactive", "failed")
    assert len(incidents(rig)) == 1
    assert "retry 1" not in rig.journal()
    metrics = rig.metrics()
    assert (
        metrics[
            'spaceguard_migration_failed{account="alice",class="unrecoverable",unit="' + UNIT + '"}'
        ]
        == 1
    )


def test_sigkill_detected_from_unit_state(loop_volume, sandbox, venv_python, tmp_path, rclone):
    volume = loop_volume(64)
    migration = Migration(tmp_path, rclone, volume)
    rig = GuardRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, rate="1M")
    sandbox.systemctl("start", UNIT)
    wait_until(lambda: copied_files(migration) >= 1, 30, "copying to start")
    sandbox.systemctl("kill", "-s", "KILL", UNIT)
    found = wait_until(lambda: incidents(rig), 30, "an incident", on_timeout=rig.journal)
    incident = found[0]
    assert incident["trigger"] == "unit-failed"
    assert "killed" in incident["exit_status"] and "9" in incident["exit_status"]
    assert incident["class"] == "transient"


def test_log_rotation_both_ways_loses_no_line(loop_volume, sandbox, venv_python, tmp_path, rclone):
    volume = loop_volume(64)
    migration = Migration(tmp_path, rclone, volume, files=8)
    truth = tmp_path / "truth.log"
    # A logger that reopens the path for every line, as syslog-style writers do: it follows a
    # rename rotation (next line creates a new file) and appends after a copytruncate.
    script = tmp_path / "migrate.sh"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        {migration.copy_command("1M")} 2>&1 | while IFS= read -r line; do
            printf '%s\\n' "$line" >> {truth}
            printf '%s\\n' "$line" >> {migration.log}
        done
        """)
    )
    script.chmod(0o755)
    unit = f"[Service]\nExecStart={script}\n"
    rig = GuardRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, migration_unit=unit)
    sandbox.systemctl("start", UNIT)
    lines_key = 'spaceguard_log_lines_total{account="alice"}'

    def read_all() -> bool:
        return rig.metrics().get(lines_key, 0) == len(truth.read_text().splitlines())

    wait_until(lambda: truth.exists() and len(truth.read_text().splitlines()) >= 5, 30, "log lines")
    migration.log.rename(tmp_path / "m365-migrate-alice.log.1")  # rename-and-create rotation
    wait_until(lambda: migration.log.exists(), 10, "the logger to create a new file")
    time.sleep(2)
    wait_until(read_all, 10, "the guard to catch up after the rename")
    shutil.copy(migration.log, tmp_path / "m365-migrate-alice.log.2")  # copytruncate
    with migration.log.open("r+") as handle:
        handle.truncate(0)
    time.sleep(2)
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=60)
    wait_until(
        read_all,
        10,
        "the guard to read every line",
        on_timeout=lambda: (
            f"guard {rig.metrics().get(lines_key)} vs {len(truth.read_text().splitlines())} written"
        ),
    )
    # A reload reads nothing twice: it goes on from where it was.
    sandbox.systemctl("reload", "spaceguard.service")
    time.sleep(1.5)
    assert read_all(), "a reload re-read (or lost) log lines"
    # A restart reads nothing twice: the saved position is at the end.
    rig.stop()
    rig.start()
    time.sleep(1)
    assert rig.metrics().get(lines_key, 0) == 0  # counters restart; no old line re-read
    assert not incidents(rig)


def test_stall_detected(loop_volume, sandbox, venv_python, tmp_path, rclone):
    volume = loop_volume(64)
    migration = Migration(tmp_path, rclone, volume, files=30)
    rig = GuardRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, 'stall_after = "4s"\nmax_retries = 0', rate="512k")
    sandbox.systemctl("start", UNIT)
    wait_until(lambda: copied_files(migration) >= 1, 30, "copying to start")
    # rclone frozen from outside: its process stops, the unit stays active
    sandbox.systemctl("kill", "-s", "STOP", UNIT)
    stopped_at = time.monotonic()
    found = wait_until(lambda: incidents(rig), 30, "a stall incident", on_timeout=rig.journal)
    assert time.monotonic() - stopped_at >= 3
    incident = found[0]
    assert incident["trigger"] == "stall"
    assert "gave up" in incident["outcome"]
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=30)


def test_destination_full_is_paused_not_failed(loop_volume, sandbox, venv_python, tmp_path, rclone):
    volume = loop_volume(96, options=["nodelalloc"])
    ballast = volume.mountpoint / "ballast"
    ballast.write_bytes(b"\0" * (40 * MIB))
    migration = Migration(tmp_path, rclone, volume, files=40)
    rig = GuardRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, rate="8M")
    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "FreezerState", "frozen", timeout=60)
    ballast.unlink()
    sandbox.wait_for(UNIT, "FreezerState", "running", timeout=30)
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=90)
    assert sandbox.show(UNIT, "Result") == "success"
    assert copied_files(migration) == 40
    assert not incidents(rig)
    assert "no space left" not in migration.log.read_text().lower()
