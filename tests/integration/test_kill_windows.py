"""Faults (issue 12): the guard SIGKILLed at each step of a freeze, a stop, a failure's
incident and a retry, then restarted by systemd (Restart=on-failure), with nothing lost.

The real guard as shipped (ShippedRig) in a real systemd sandbox on a real ext4 loop
volume. A call "in flight" is made by stopping the sandbox's systemd (SIGSTOP of its
PID 1, as test_fault_reload does): the guard has decided and sent the call, systemd has
not answered; the guard is SIGKILLed then, and systemd continues. The other windows are
found by the journal line the guard writes at that step. After each restart the test
checks: the migration is paused with a reason shown (a hold), not resumed while the
volume is low, the state and incidents are kept (none lost, none duplicated), the log
position is kept (a marker line is the only line the new process reads), and the
migration completes once space is back.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.guardrig import GUARD_UNIT, GuardRig, read_status, wait_until, writer_unit
from tests.installed import ShippedRig
from tests.integration.test_failures import incidents
from tests.integration.test_fault_reload import guard_host_pid
from tests.integration.test_operators import migration_status
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import LoopVolume, SystemdSandbox

MIB = 1024 * 1024
UNIT = "writer@alice.service"
RESUME = "writer-resume@alice.service"
PAUSED = 'spaceguard_migration_paused{account="alice",unit="' + UNIT + '"}'
LINES = 'spaceguard_log_lines_total{account="alice"}'


def config(volume: LoopVolume, log: Path, pause: str) -> str:
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
        resume_unit = "{RESUME}"
        volume = "space"
        pause = "{pause}"
        log = "{log}"
        max_retries = 2
        retry_backoff = "2s"
        """


def kill_and_wait_restart(
    sandbox: SystemdSandbox, rig: GuardRig, during: Callable[[], None] | None = None
) -> None:
    """SIGKILL the guard's main process; with `during`, systemd is stopped around it (the
    call the guard sent stays unanswered) and `during` runs before the kill."""
    old = rig.main_pid()
    host = guard_host_pid(sandbox)
    if during is None:
        os.kill(host, signal.SIGKILL)
    else:
        os.kill(sandbox.pid, signal.SIGSTOP)
        try:
            during()
            os.kill(host, signal.SIGKILL)
        finally:
            os.kill(sandbox.pid, signal.SIGCONT)
    wait_until(
        lambda: (
            rig.main_pid() not in (0, old) and sandbox.show(GUARD_UNIT, "ActiveState") == "active"
        ),
        30,
        "systemd to restart the killed guard",
        on_timeout=rig.journal,
    )


def lines_read(rig: GuardRig) -> float:
    return rig.metrics().get(LINES, 0.0)


def marker_is_the_only_line_reread(rig: GuardRig, log: Path) -> None:
    """The log position survived: the new process reads the marker and nothing before it."""
    with log.open("a") as handle:
        handle.write("2026/12/01 00:00:00 INFO  : kill-window marker\n")
    wait_until(lambda: lines_read(rig) >= 1, 15, "the marker line to be read")
    assert lines_read(rig) == 1, rig.journal()


def position_saved(rig: GuardRig, log: Path) -> None:
    """Wait until the saved state holds the log's position at its end (it is saved about
    once a second: a kill before that re-reads the lines since, by design)."""

    def saved() -> bool:
        positions: Any = rig.saved_state().get("log_positions", {})
        return bool(positions.get("alice", {}).get("offset") == log.stat().st_size)

    wait_until(saved, 15, "the log position to be saved", on_timeout=rig.journal)


def hold_of(rig: GuardRig) -> Any:
    return migration_status(rig, "alice")["hold"]


def start_writer(
    sandbox: SystemdSandbox, rig: GuardRig, volume: LoopVolume, tmp: Path, python: str, log: Path
) -> Path:
    status = tmp / "writer.status"
    (volume.mountpoint / "alice").mkdir()
    sandbox.up(
        {
            UNIT: writer_unit(python, volume.mountpoint / "alice", "40M", status, rate="2M"),
            RESUME: writer_unit(
                python, volume.mountpoint / "alice", "40M", status, resume=True, rate="2M"
            ),
        }
    )
    rig.install()
    rig.start()
    log.write_text("2026/12/01 00:00:00 INFO  : first line\n")
    wait_until(lambda: lines_read(rig) >= 1, 15, "the first log line to be read")
    sandbox.systemctl("start", UNIT)
    sandbox.wait_for(UNIT, "ActiveState", "active", timeout=10)
    return status


def fill_below_pause(volume: LoopVolume) -> Path:
    """Leave ~20 MiB: below pause_below (32 MiB), the writer at 2 MiB/s has 10 s of room."""
    return make_ballast(volume, max(1, volume.usable_bytes // MIB - 20))


def test_killed_with_a_freeze_in_flight_then_after_it_landed(
    loop_volume, sandbox, venv_python, tmp_path
):
    volume = loop_volume(256, options=["nodelalloc"])
    log = tmp_path / "alice.log"
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(volume, log, "freeze"))
    status = start_writer(sandbox, rig, volume, tmp_path, venv_python, log)
    ballast: list[Path] = []

    def freeze_sent() -> None:
        ballast.append(fill_below_pause(volume))
        # (a) the guard decided the pause (its hold shows) and sent FreezeUnit, unanswered
        wait_until(lambda: rig.metrics().get(PAUSED) == 1, 15, "the pause decision")

    kill_and_wait_restart(sandbox, rig, freeze_sent)
    sandbox.wait_for(UNIT, "FreezerState", "frozen", timeout=30)
    wait_until(lambda: hold_of(rig) is not None, 15, "the restarted guard to show the hold")
    assert hold_of(rig)["by"] in ("guard", "unknown"), hold_of(rig)
    marker_is_the_only_line_reread(rig, log)

    # (b) frozen and the state written: killed again
    wait_until(
        lambda: rig.saved_state()["state"]["migrations"]["alice"]["paused_units"] == [UNIT],
        15,
        "the frozen unit in the saved state",
    )
    position_saved(rig, log)
    kill_and_wait_restart(sandbox, rig)
    wait_until(lambda: hold_of(rig) is not None, 15, "the hold after the second restart")
    marker_is_the_only_line_reread(rig, log)
    # still low, the restarted guard has sampled it, and the unit stays frozen
    wait_until(
        lambda: rig.metrics().get('spaceguard_volume_low{volume="space"}') == 1, 15, "low seen"
    )
    assert sandbox.show(UNIT, "FreezerState") == "frozen"
    assert rig.metrics()[PAUSED] == 1

    ballast[0].unlink()
    sandbox.wait_for(UNIT, "FreezerState", "running", timeout=30)
    wait_until(
        lambda: any(w == "DONE" for w, _ in read_status(status)),
        60,
        "the migration to finish",
        on_timeout=rig.journal,
    )
    assert sandbox.show(UNIT, "Result") == "success"
    assert [size for word, size in read_status(status) if word == "DONE"] == [40 * MIB]


def test_killed_with_a_stop_in_flight(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(256, options=["nodelalloc"])
    log = tmp_path / "alice.log"
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(volume, log, "stop"))
    status = start_writer(sandbox, rig, volume, tmp_path, venv_python, log)
    ballast: list[Path] = []

    def stop_sent() -> None:
        ballast.append(fill_below_pause(volume))
        wait_until(lambda: rig.metrics().get(PAUSED) == 1, 15, "the pause decision")

    # (c) StopUnit sent, unanswered
    kill_and_wait_restart(sandbox, rig, stop_sent)
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=30)
    wait_until(lambda: hold_of(rig) is not None, 15, "the restarted guard to show the hold")
    assert hold_of(rig)["by"] in ("guard", "unknown"), hold_of(rig)
    marker_is_the_only_line_reread(rig, log)
    wait_until(
        lambda: rig.metrics().get('spaceguard_volume_low{volume="space"}') == 1, 15, "low seen"
    )
    assert sandbox.show(RESUME, "ActiveState") == "inactive", "resumed while low"
    assert incidents(rig) == [] or all(i["class"] == "disk_full" for i in incidents(rig))

    ballast[0].unlink()
    wait_until(
        lambda: any(w == "DONE" for w, _ in read_status(status)),
        60,
        "the resume unit to finish the copy",
        on_timeout=rig.journal,
    )
    assert "TERM" in [w for w, _ in read_status(status)]


FAILING = textwrap.dedent("""\
    #!/bin/sh
    # a migration stand-in: logs, fails transiently (exit 5) on its first run only
    echo "$(date '+%Y/%m/%d %H:%M:%S') INFO  : run $(cat {runs} 2>/dev/null)" >> {log}
    if [ ! -e {runs} ]; then
        echo 1 > {runs}
        echo "$(date '+%Y/%m/%d %H:%M:%S') ERROR : doc.bin: connection reset" >> {log}
        exit 5
    fi
    sleep 1
    echo DONE > {done}
    """)


def test_killed_around_an_incident_and_a_retry_start(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(64)
    log = tmp_path / "alice.log"
    script = tmp_path / "migrate.sh"
    runs, done = tmp_path / "runs", tmp_path / "done"
    script.write_text(FAILING.format(runs=runs, log=log, done=done))
    script.chmod(0o755)
    unit = f"[Service]\nType=exec\nExecStart={script}\n"
    sandbox.up({UNIT: unit, RESUME: unit})
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(config(volume, log, "freeze").replace('"2s"', '"4s"'))
    rig.install()
    rig.start()
    log.write_text("2026/12/01 00:00:00 INFO  : first line\n")
    wait_until(lambda: lines_read(rig) >= 1, 15, "the first log line to be read")

    # (d) the failure seen: killed right after the stop/verify steps, once the incident
    # is recorded in the journal (before or while its file is completed)
    sandbox.systemctl("start", UNIT)
    wait_until(
        lambda: "incident recorded" in rig.journal(), 30, "the incident", on_timeout=rig.journal
    )
    kill_and_wait_restart(sandbox, rig)
    found = wait_until(lambda: incidents(rig), 15, "the incident file after the restart")
    assert isinstance(found, list) and len(found) == 1, found
    assert found[0]["class"] == "transient" and "retry 1 of 2" in found[0]["outcome"]
    marker_is_the_only_line_reread(rig, log)

    # (e) the retry's StartUnit in flight
    def retry_sent() -> None:
        wait_until(
            lambda: "retry 1 of 2: starting" in rig.journal(),
            30,
            "the retry",
            on_timeout=rig.journal,
        )

    kill_and_wait_restart(sandbox, rig, retry_sent)
    wait_until(lambda: done.exists(), 60, "the retried migration to finish", on_timeout=rig.journal)
    wait_until(
        lambda: (
            sandbox.show(RESUME, "ActiveState") == "inactive"
            and sandbox.show(UNIT, "ActiveState") in ("inactive", "failed")
        ),
        30,
        "the units to settle",
    )
    assert runs.read_text().strip() == "1"
    wait_until(lambda: migration_status(rig, "alice").get("failure") is None, 15, "no failure left")
    assert len(incidents(rig)) == 1, "\n".join(
        [f"{i['id']} {i['class']} {i['outcome']} {i.get('trigger')}" for i in incidents(rig)]
        + [rig.journal()]
    )
    journal = rig.journal()
    assert journal.count("retry 2 of 2") == 0, journal
