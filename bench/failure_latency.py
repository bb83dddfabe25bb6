#!/usr/bin/env python3
"""Scenario 1 figures: from an unrecoverable error line written to a migration's log to the
migration's unit being stopped (its cgroup empty), and the guard's CPU while logs are quiet.

    sudo .venv/bin/python bench/failure_latency.py [--trials 20] [--quiet-seconds 20]

Real parts: the guard as a unit in a sandboxed systemd, following real log files with
inotify; the migration units are long-running processes; after each trial
`spaceguardctl retry` starts the migration again. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from space_reaction import cpu_seconds, host_pid

from tests.guardrig import REPO, GuardRig, wait_until
from tests.sandbox import LoopVolume, SystemdSandbox

# rclone's 401 on the remote itself (run-level: the whole run cannot go on). Only lines of
# the current run act, so each is dated when it is written.
ERROR_LINE = (
    "{now} ERROR : webdav root '': error reading source root directory: "
    "couldn't list files: Unauthorized: 401 Unauthorized\n"
)
INFO_LINE = "2026/11/25 12:00:00 INFO  : Documents/notes.txt: Copied (new)\n"


def stamp() -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S")


def stop_latencies(
    sandbox: SystemdSandbox, rig: GuardRig, account: str, unit: str, log: Path, trials: int
) -> list[float]:
    """Write a run-level error line `trials` times; each time, milliseconds until the
    unit's cgroup is empty; after each, `spaceguardctl retry` starts the migration again."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
    incidents = f'spaceguard_incidents_total{{account="{account}"}}'
    first = rig.metrics().get(incidents, 0)
    latencies: list[float] = []
    for _ in range(trials):
        sandbox.wait_for(unit, "ActiveState", "active", timeout=30)
        events = sandbox.unit_cgroup(unit) / "cgroup.events"
        with log.open("a") as handle:
            line = ERROR_LINE.format(now=stamp())
            written = time.monotonic()
            handle.write(line)
            handle.flush()
        while True:
            try:
                if "populated 1" not in events.read_text():
                    break
            except FileNotFoundError:
                break  # systemd removed the stopped unit's cgroup
            time.sleep(0.0002)
        latencies.append((time.monotonic() - written) * 1000)
        wait_until(
            lambda: rig.metrics().get(incidents, 0) >= first + len(latencies),
            30,
            "the incident",
        )
        subprocess.run(
            [sys.executable, "-m", "spaceguard.ctl", "--socket", str(rig.host_socket),
             "retry", account],
            check=True,
            capture_output=True,
            env=env,
        )  # fmt: skip
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--quiet-seconds", type=float, default=20)
    parser.add_argument("--logs", type=int, default=10, help="migrations (log files) watched")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="spaceguard-bench-") as tmp:
        work = Path(tmp)
        # large and sparse, so that the volume sampler idles (1 sample/s) and what is
        # measured while quiet is the log following
        volume = LoopVolume(work / "vol", 100 * 1024).mount()
        sandbox = SystemdSandbox(work / "sandbox")
        try:
            units = {
                f"m365-migrate@m{i}.service": "[Service]\nExecStart=/bin/sleep infinity\n"
                for i in range(args.logs)
            }
            sandbox.up(units)
            logs = [work / f"m{i}.log" for i in range(args.logs)]
            for log in logs:
                log.write_text(INFO_LINE)
            rig = GuardRig(sandbox, work, python, watchdog_sec=10, log_level="info")
            rig.write_config(
                f"""
                [volumes.space]
                path = "{volume.mountpoint}"
                pause_below = "1MiB"
                resume_above = "2MiB"
                """
                + "".join(
                    f"""
                [[migrations]]
                account = "m{i}"
                unit = "m365-migrate@m{i}.service"
                volume = "space"
                log = "{logs[i]}"
                """
                    for i in range(args.logs)
                )
            )
            rig.install()
            for unit in units:
                sandbox.systemctl("start", unit)
            rig.start()

            time.sleep(3)
            pid = host_pid(sandbox, "spaceguard.service")
            before, started = cpu_seconds(pid), time.monotonic()
            time.sleep(args.quiet_seconds)
            quiet_cpu = 100 * (cpu_seconds(pid) - before) / (time.monotonic() - started)

            latencies = stop_latencies(
                sandbox, rig, "m0", "m365-migrate@m0.service", logs[0], args.trials
            )
            rig.stop()
        finally:
            sandbox.down()
            volume.umount()
    print(
        f"error line written -> migration unit stopped (cgroup empty), {args.trials} trials: "
        f"median {statistics.median(latencies):.1f} ms, worst {max(latencies):.1f} ms, "
        f"best {min(latencies):.1f} ms"
    )
    print(
        f"guard CPU while {args.logs} followed logs are quiet ({args.quiet_seconds:.0f} s): "
        f"{quiet_cpu:.3f} % of one core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
