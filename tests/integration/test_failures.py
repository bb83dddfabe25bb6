"""Scenario 1 end to end with real rclone: a migration unit copies from a local WebDAV remote
(`rclone serve webdav`, itself a unit) into a loop volume; the guard, a Type=notify unit,
detects failures, stops, verifies, writes incidents and retries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.guardrig import GuardRig, free_port, wait_until
from tests.installed import ShippedRig
from tests.integration.test_operators import migration_status
from tests.integration.test_space_guard import make_ballast
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

    def config(self, extra: str = "", pause_below: str = "16MiB") -> str:
        retries = "" if "max_retries" in extra else "max_retries = 2"
        return f"""
            [volumes.space]
            path = "{self.volume.mountpoint}"
            pause_below = "{pause_below}"
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


def failure_incidents(rig: GuardRig) -> list[dict[str, object]]:
    """Incidents about a failure (a disk_full one documents a pause, not a failure)."""
    return [
        incident
        for incident in incidents(rig)
        if incident["class"] != "disk_full" or "paused" not in str(incident["outcome"])
    ]


def boot(
    sandbox: SystemdSandbox,
    rig: GuardRig,
    migration: Migration,
    config_extra: str = "",
    rate: str = "2M",
    migration_unit: str | None = None,
    extra_units: dict[str, str] | None = None,
    pause_below: str = "16MiB",
) -> None:
    sandbox.up(
        {
            REMOTE: migration.remote_unit(),
            UNIT: migration_unit or migration.migration_unit(rate),
            **(extra_units or {}),
        }
    )
    rig.write_config(migration.config(config_extra, pause_below))
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
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    verify = f'verify_command = ["{rclone}", "--config", "{migration.conf}", "lsd", "m365-alice:"]'
    boot(sandbox, rig, migration, verify)
    sandbox.systemctl("start", UNIT)
    wait_until(lambda: copied_files(migration) >= 2, 30, "some files to be copied")
    sandbox.systemctl("stop", REMOTE)  # the remote dies mid-copy
    # the failure's incident (a disk-full pause, if the small volume filled on the way, writes
    # an incident of its own: class disk_full, no partial-migration report)
    # (written at once, then again with the partial-migration report when its scan of the
    # destination is done: the completed one has "files")
    found = wait_until(
        lambda: [
            i for i in incidents(rig) if i["class"] != "disk_full" and "files" in i["partial"]
        ],
        60,
        "the failure's incident, with its partial-migration report",
        on_timeout=rig.journal,
    )
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
    rig = ShippedRig(sandbox, tmp_path, venv_python)
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

    # The guard's decision, not a wait: the failure is left for an operator, no retry planned.
    def failure() -> dict[str, object]:
        return migration_status(rig, "alice")["failure"] or {}  # type: ignore[return-value]

    wait_until(
        lambda: failure().get("phase") == "needs-operator",
        30,
        "the failure to be left for an operator",
        on_timeout=rig.journal,
    )
    assert failure()["next_retry_at"] is None, failure()
    assert migration_status(rig, "alice")["state"] == "failed"
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
    rig = ShippedRig(sandbox, tmp_path, venv_python)
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
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, migration_unit=unit)
    sandbox.systemctl("start", UNIT)
    lines_key = 'spaceguard_log_lines_total{account="alice"}'

    def read_all() -> bool:
        return rig.metrics().get(lines_key, 0) == len(truth.read_text().splitlines())

    wait_until(lambda: truth.exists() and len(truth.read_text().splitlines()) >= 5, 30, "log lines")
    migration.log.rename(tmp_path / "m365-migrate-alice.log.1")  # rename-and-create rotation
    wait_until(lambda: migration.log.exists(), 10, "the logger to create a new file")
    wait_until(read_all, 10, "the guard to catch up after the rename")
    shutil.copy(migration.log, tmp_path / "m365-migrate-alice.log.2")  # copytruncate
    with migration.log.open("r+") as handle:
        handle.truncate(0)
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=60)
    wait_until(
        read_all,
        10,
        "the guard to read every line",
        on_timeout=lambda: (
            f"guard {rig.metrics().get(lines_key)} vs {len(truth.read_text().splitlines())} written"
        ),
    )

    def marker(text: str) -> None:
        """One more line, in the log and in the truth: once the guard has counted it, it has
        read everything a reload or restart would have made it read again."""
        line = time.strftime("%Y/%m/%d %H:%M:%S") + f" INFO  : test marker: {text}\n"
        for path in (truth, migration.log):
            with path.open("a") as handle:
                handle.write(line)

    # A reload reads nothing twice: it goes on from where it was.
    sandbox.systemctl("reload", "spaceguard.service")
    wait_until(
        lambda: "configuration reloaded" in rig.journal(), 10, "the reload", on_timeout=rig.journal
    )
    marker("after the reload")
    wait_until(
        lambda: rig.metrics().get(lines_key, 0) >= len(truth.read_text().splitlines()),
        10,
        "the guard to read the line written after the reload",
    )
    assert read_all(), (
        f"a reload re-read log lines: {rig.metrics().get(lines_key)} read, "
        f"{len(truth.read_text().splitlines())} written\n" + rig.journal()[-2500:]
    )
    # A restart reads nothing twice: the saved position is at the end.
    rig.stop()
    rig.start()
    marker("after the restart")
    wait_until(
        lambda: rig.metrics().get(lines_key, 0) >= 1,
        10,
        "the restarted guard to read the line written after its start",
    )
    assert rig.metrics()[lines_key] == 1  # counters restart; no old line re-read
    assert not incidents(rig)


def test_stall_detected(loop_volume, sandbox, venv_python, tmp_path, rclone):
    volume = loop_volume(64)
    migration = Migration(tmp_path, rclone, volume, files=30)
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, 'stall_after = "4s"\nmax_retries = 0', rate="512k")
    sandbox.systemctl("start", UNIT)
    wait_until(lambda: copied_files(migration) >= 1, 30, "copying to start")
    # rclone frozen from outside: its process stops, the unit stays active
    sandbox.systemctl("kill", "-s", "STOP", UNIT)
    found = wait_until(lambda: incidents(rig), 30, "a stall incident", on_timeout=rig.journal)
    incident = found[0]
    assert incident["trigger"] == "stall"
    # the guard's own account of it: no progress for at least stall_after
    stalled_for = re.fullmatch(r"no progress for (\d+)s \(stall_after 4s\)", incident["detail"])
    assert stalled_for is not None and int(stalled_for[1]) >= 4, incident["detail"]
    assert "gave up" in incident["outcome"]
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=30)


@pytest.mark.parametrize(
    ("rclone_flags", "rclone_says"),
    [
        # rclone writes until the kernel says ENOSPC
        ("--local-no-preallocate", "no space left on device"),
        # rclone's default: it preallocates, and refuses a file bigger than the free space
        ("", "preallocate: file too big for remaining disk space"),
    ],
    ids=["enospc", "preallocate"],
)
def test_destination_full_is_paused_not_failed(
    loop_volume, sandbox, venv_python, tmp_path, rclone, rclone_flags, rclone_says
):
    """Real rclone runs out of space on the destination and says so: the guard pauses the
    migration for it (scenario 3), fails nothing, and the copy completes once space is back."""
    volume = loop_volume(96, options=["nodelalloc"])
    migration = Migration(tmp_path, rclone, volume, files=12, size=2 * MIB)
    # About 6 MiB free for a 24 MiB copy, and no threshold to pause it before: pause_below 0
    # leaves rclone's own report as the only sign.
    ballast = make_ballast(volume, volume.usable_bytes // MIB - 6)
    unit = textwrap.dedent(f"""\
        [Service]
        ExecStart={migration.copy_command("8M")} {rclone_flags} --log-file {migration.log}
        """)
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    boot(sandbox, rig, migration, migration_unit=unit, pause_below="0")
    sandbox.systemctl("start", UNIT)
    paused = (
        'spaceguard_migration_pause_info{account="alice",by="guard",reason="disk_full",'
        f'unit="{UNIT}"}}'
    )
    wait_until(
        lambda: rig.metrics().get(paused) == 1,
        60,
        "the guard to pause alice for the full disk",
        on_timeout=lambda: rig.journal() + migration.log.read_text()[-3000:],
    )
    assert rclone_says in migration.log.read_text()
    wait_until(
        lambda: "paused: alice (guard: disk_full)" in rig.status_text(), 10, "STATUS= to say so"
    )
    metrics = rig.metrics()
    assert metrics['spaceguard_volume_low{volume="space"}'] == 1
    for failure_class in ("transient", "unrecoverable"):
        labels = f'account="alice",class="{failure_class}",unit="{UNIT}"'
        assert metrics["spaceguard_migration_failed{" + labels + "}"] == 0
    assert not failure_incidents(rig)

    ballast.unlink()  # an operator frees space
    wait_until(
        lambda: copied_files(migration) == 12 and sandbox.show(UNIT, "ActiveState") == "inactive",
        90,
        "the migration to finish",
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
    assert not failure_incidents(rig)
    assert "migration failed" not in rig.journal()
    assert rig.metrics()[f'spaceguard_migration_paused{{account="alice",unit="{UNIT}"}}'] == 0
