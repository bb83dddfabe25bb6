#!/usr/bin/env python3
"""Does anything grow with time or input? (issue 12: bound everything, and show it.)

    python3 bench/soak.py policy [--hours 24] [--migrations 10]
    python3 bench/soak.py real [--minutes 5]     # --minutes 60: the hour the issue asks

* policy: a 24-hour accelerated soak of the pure policy: `policy.decide` driven with a
  fake clock the way the daemon drives it, against a simulated systemd that carries out
  every action at once: a volume sample and a Tick every second, the volume low for five
  minutes every hour (freezes, stops, thaws, resumes), a migration failing every ten
  minutes (stops, verifies, incidents, retries, give-ups an operator retries), log batches
  with progress and failure lines every few seconds, operator pauses and resumes, runs
  ending and started again, and a reload (through `initial_state`, as the daemon does)
  every two hours. Prints the size of the durable state (len of json.dumps of
  `state.durable()`) and Python memory (tracemalloc) after the first hour and at the end.
* real: the real guard as shipped (tests.installed.ShippedRig) in the systemd sandbox on a
  loop volume, with churn: units failing and retried, their logs written and rotated,
  SIGHUP reloads, control clients (status) and metric scrapes; prints the guard's RSS
  (VmRSS) and open fds (/proc/PID/fd) at the start and the end. Needs root.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))
sys.path.insert(0, str(ROOT))

from spaceguard.config import Config, parse  # noqa: E402
from spaceguard.model import (  # noqa: E402
    ActionDone,
    BusChanged,
    FailureClass,
    GuardState,
    LogEvidence,
    LogParsed,
    OperatorRequest,
    RunVerify,
    Tick,
    UnitAction,
    UnitChanged,
    UnitView,
    VolumeSampled,
)
from spaceguard.policy import decide, initial_state  # noqa: E402
from spaceguard.state import durable  # noqa: E402

GIB = 1024**3
SIZE = 1000 * GIB
T0 = 1_800_000_000.0


def soak_config(migrations: int) -> Config:
    document: dict[str, Any] = {
        "volumes": {
            "space": {
                "path": "/space",
                "pause_below": "5%",
                "resume_above": "10%",
                "resume_after": "1m",
                "predict": "0s",
            }
        },
        "migrations": [
            {
                "account": f"user{i}",
                "unit": f"m365-migrate@user{i}.service",
                "resume_unit": f"m365-migrate-resume@user{i}.service",
                "volume": "space",
                "pause": "stop" if i % 3 == 0 else "freeze",
                "max_retries": 2,
                "retry_backoff": "30s",
                "verify_command": ["/bin/true"],
            }
            for i in range(migrations)
        ],
    }
    return parse(Path("/etc/spaceguard/soak.toml"), document)


class Soak:
    """The policy, a fake clock and a systemd that carries out every action at once."""

    def __init__(self, config: Config, seed: int = 1) -> None:
        self.config = config
        self.state: GuardState = initial_state(config)
        self.now = T0
        self.rng = random.Random(seed)
        self.views: dict[str, UnitView] = {}
        self.events = 0
        for migration in config.migrations:
            self.views[migration.unit] = UnitView("active", "running", started_at=T0)
            self.views[migration.resume_unit] = UnitView("inactive", "dead", result="success")
        self.feed(BusChanged(True))
        for unit, view in list(self.views.items()):
            self.feed(UnitChanged(unit, view))

    def feed(self, event: Any) -> None:
        queue = [event]
        while queue:
            self.events += 1
            self.state, actions = decide(self.config, self.state, queue.pop(0), self.now)
            for action in actions:
                queue += self.carry_out(action)

    def carry_out(self, action: Any) -> list[Any]:
        if isinstance(action, RunVerify):
            return [ActionDone(action, True)]
        if not isinstance(action, UnitAction):
            return []  # incidents, alerts, replies, log lines: the adapters' business
        view = self.views.get(action.unit, UnitView("inactive", "dead"))
        if action.kind == "freeze":
            view = replace(view, freezer_state="frozen")
        elif action.kind == "thaw":
            view = replace(view, freezer_state="running")
        elif action.kind == "stop":
            view = UnitView("inactive", "dead", result="success", started_at=view.started_at)
        else:
            view = UnitView("active", "running", started_at=self.now)
        self.views[action.unit] = view
        return [ActionDone(action, True), UnitChanged(action.unit, view)]

    def set_unit(self, unit: str, view: UnitView) -> None:
        self.views[unit] = view
        self.feed(UnitChanged(unit, view))

    def second(self, t: int) -> None:
        self.now = T0 + t
        low = (t % 3600) < 300  # five minutes low every hour
        avail = int(SIZE * (0.03 if low else 0.5))
        self.feed(VolumeSampled("space", avail, SIZE, 10**6, 2 * 10**6, 0.0))
        self.feed(Tick())
        migrations = self.config.migrations
        if t % 3 == 0:  # a log batch: progress
            m = migrations[self.rng.randrange(len(migrations))]
            self.feed(LogParsed(m.account, progressed=True, transferred_bytes=t * 1000))
        if t % 600 == 300:  # a failure, with its log line first
            m = migrations[(t // 600) % len(migrations)]
            for unit in (m.unit, m.resume_unit):
                if self.views[unit].active_state == "active":
                    line = f"ERROR : doc-{t}.bin: Failed to copy: 429 Too Many Requests"
                    evidence = LogEvidence(FailureClass.TRANSIENT, "too_many_requests", line, t)
                    self.feed(LogParsed(m.account, failures=(evidence,)))
                    self.set_unit(
                        unit,
                        UnitView(
                            "failed",
                            "failed",
                            result="exit-code",
                            exec_code="exited",
                            exec_status=5,
                            started_at=self.views[unit].started_at,
                        ),
                    )
                    break
        if t % 1800 == 900:  # an operator pause, resumed five minutes later
            m = migrations[(t // 1800) % len(migrations)]
            self.feed(OperatorRequest(f"p{t}", "pause", m.account, "soak"))
        if t % 1800 == 1200:
            m = migrations[((t - 300) // 1800) % len(migrations)]
            self.feed(OperatorRequest(f"r{t}", "resume", m.account))
        if t % 900 == 450:  # a run ends well; a person starts the next one
            m = migrations[(t // 900) % len(migrations)]
            if self.views[m.unit].active_state == "active":
                self.set_unit(m.unit, UnitView("inactive", "dead", result="success"))
        if t % 900 == 600:
            m = migrations[((t - 150) // 900) % len(migrations)]
            if self.views[m.unit].active_state != "active" and self.views[m.unit].result:
                self.set_unit(m.unit, UnitView("active", "running", started_at=self.now))
        if t % 3600 == 1500:  # an operator retries what gave up
            for m in migrations:
                state = self.state.migrations.get(m.account)
                if state is not None and state.failure is not None:
                    self.feed(OperatorRequest(f"x{t}", "retry", m.account))
        if t % 7200 == 7199:  # a reload
            self.state = initial_state(self.config, self.state)


def durable_size(state: GuardState) -> int:
    return len(json.dumps(durable(state)))


def run_policy(hours: float, migrations: int) -> None:
    soak = Soak(soak_config(migrations))
    tracemalloc.start()
    seconds = int(hours * 3600)
    figures: list[tuple[str, int, int, int]] = []
    started = time.monotonic()
    for t in range(seconds):
        soak.second(t)
        if (t + 1) % 3600 == 0:
            current, _ = tracemalloc.get_traced_memory()
            figures.append((f"{(t + 1) / 3600:.0f} h", durable_size(soak.state), current, t))
    elapsed = time.monotonic() - started
    tracemalloc.stop()
    print(f"policy soak: {hours:g} h of events for {migrations} migrations, {soak.events} events")
    print(f"  (ran in {elapsed:.0f} s of wall time)")
    states = soak.state.migrations.values()
    print(
        f"  incidents documented: {soak.state.incident_seq}; "
        f"retries now: {sum(m.retries for m in states)}"
    )
    hourly = [(size, memory) for _, size, memory, _ in figures]
    for label, size, memory, _ in figures:
        if label in ("1 h", "6 h", "12 h", "18 h", figures[-1][0]):
            kib = memory / 1024
            print(f"  after {label:>5}: durable state {size:6d} bytes, traced {kib:6.1f} KiB")
    if hourly:
        # what is in the state at a given hour depends on what is in progress then (a
        # failure carries its steps): the hourly range shows whether anything accumulates
        first, rest = hourly[: len(hourly) // 2], hourly[len(hourly) // 2 :]
        for name, part in (("first half", first), ("second half", rest)):
            if part:
                print(
                    f"  {name}, hourly: durable state {min(p[0] for p in part)}-"
                    f"{max(p[0] for p in part)} bytes, traced "
                    f"{min(p[1] for p in part) / 1024:.1f}-{max(p[1] for p in part) / 1024:.1f} KiB"
                )


# -- the real guard -------------------------------------------------------------------------


def host_pid(sandbox: Any) -> int:
    from tests.integration.test_fault_reload import guard_host_pid

    return int(guard_host_pid(sandbox))


def rss_and_fds(pid: int) -> tuple[int, int]:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


FAILING = """#!/bin/sh
# a migration stand-in: logs a few lines, then fails (exit 5) or succeeds at random
for i in 1 2 3 4 5; do
    echo "$(date '+%Y/%m/%d %H:%M:%S') INFO  : doc-$i.bin: Copied (new)" >> {log}
    sleep 1
done
if [ $(( $(od -An -N1 -tu1 /dev/urandom) % 2 )) -eq 0 ]; then
    echo "$(date '+%Y/%m/%d %H:%M:%S') ERROR : doc.bin: Failed to copy: connection reset" >> {log}
    exit 5
fi
"""


def run_real(minutes: float, migrations: int) -> None:
    import subprocess
    import tempfile

    from tests.guardrig import wait_until
    from tests.installed import BASE, ShippedRig, cleanup_rigs
    from tests.integration.test_operators import ctl
    from tests.sandbox import LoopVolume, SystemdSandbox

    BASE.mkdir(parents=True, exist_ok=True)
    BASE.chmod(0o755)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=BASE))
    work.chmod(0o755)
    volume = LoopVolume(work / "vol", 128).mount()
    sandbox = SystemdSandbox(work / "sb")
    try:
        units: dict[str, str] = {}
        body = ""
        for i in range(migrations):
            log = work / f"user{i}.log"
            script = work / f"migrate{i}.sh"
            script.write_text(FAILING.format(log=log))
            script.chmod(0o755)
            unit = f"[Service]\nType=exec\nExecStart={script}\n"
            units[f"m365-migrate@user{i}.service"] = unit
            units[f"m365-migrate-resume@user{i}.service"] = unit
            body += f"""
                [[migrations]]
                account = "user{i}"
                unit = "m365-migrate@user{i}.service"
                resume_unit = "m365-migrate-resume@user{i}.service"
                volume = "space"
                log = "{log}"
                max_retries = 1000000
                retry_backoff = "5s"
                retry_backoff_max = "5s"
                """
        # (right after [guard]:) acknowledged incidents beyond 100 are pruned; the run acks
        # what fails, as an operator would, so the incidents on disk and in memory stay bounded
        config = f"""
            acked_incidents_keep = 100

            [volumes.space]
            path = "{volume.mountpoint}"
            pause_below = "8MiB"
            resume_above = "16MiB"
            {body}
            """
        sandbox.up(units)
        rig = ShippedRig(sandbox, work, sys.executable, log_level="info")
        rig.write_config(config)
        rig.install()
        rig.start()
        for i in range(migrations):
            sandbox.systemctl("start", "--no-block", f"m365-migrate@user{i}.service")
        time.sleep(20)  # warm: every path has run once
        pid = host_pid(sandbox)
        start = rss_and_fds(pid)
        print(f"real run: {minutes:g} min, {migrations} migrations failing at random and retried")
        print(f"  start: VmRSS {start[0]} KiB, {start[1]} fds")
        began = time.monotonic()
        deadline = began + minutes * 60
        rounds = acked = 0
        next_report = began + 600
        while time.monotonic() < deadline:
            rounds += 1
            if time.monotonic() >= next_report:  # a trail, not just two points
                next_report += 600
                now_pid = host_pid(sandbox)
                rss, fds = rss_and_fds(now_pid)
                print(
                    f"  {(time.monotonic() - began) / 60:4.0f} min: VmRSS {rss} KiB, {fds} fds"
                    f" (same process: {now_pid == pid})",
                    flush=True,
                )
            for _ in range(5):
                ctl(rig, "status")
                rig.metrics()
            for i in range(migrations):  # start again what has ended (the guard's retries
                # run the resume unit: the main unit may stay "failed" meanwhile)
                unit = f"m365-migrate@user{i}.service"
                resume = f"m365-migrate-resume@user{i}.service"
                ended = ("inactive", "failed")
                if (
                    sandbox.show(unit, "ActiveState") in ended
                    and sandbox.show(resume, "ActiveState") in ended
                ):
                    sandbox.systemctl("start", "--no-block", unit)
            if rounds % 3 == 0:  # rotate a log (rename + new file)
                log = work / f"user{rounds % migrations}.log"
                if log.exists():
                    log.rename(log.with_suffix(".log.1"))
            if rounds % 10 == 0:  # an operator acknowledges the incidents
                listed = ctl(rig, "--json", "incidents")
                for incident in json.loads(listed.stdout or "[]"):
                    if not incident.get("acked_by"):
                        acked += ctl(rig, "ack", str(incident["id"])).returncode == 0
            if rounds % 5 == 0:
                rig.write_config(config)
                sandbox.systemctl("reload", "spaceguard.service")
            time.sleep(2)
        wait_until(lambda: rig.main_pid() > 0, 10, "the guard")
        end_pid = host_pid(sandbox)
        end = rss_and_fds(end_pid)
        metrics = rig.metrics()
        incidents = sum(v for k, v in metrics.items() if k.startswith("spaceguard_incidents_total"))
        retries = sum(
            v for k, v in metrics.items() if k.startswith("spaceguard_migration_retries_total")
        )
        print(f"  end:   VmRSS {end[0]} KiB, {end[1]} fds (same process: {end_pid == pid})")
        print(
            f"  churn: {rounds} rounds, {incidents:.0f} incidents ({acked} acknowledged), "
            f"{retries:.0f} retries"
        )
        shown = ctl(rig, "status")
        print("  the guard's status at the end:")
        print("    " + shown.stdout.strip().replace("\n", "\n    "))
        files = subprocess.run(
            ["du", "-sk", str(rig.state_dir)], capture_output=True, text=True, check=False
        )
        print(f"  state directory: {files.stdout.split()[0] if files.stdout else '?'} KiB")
    finally:
        sandbox.down()
        cleanup_rigs()
        volume.umount()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    policy = sub.add_parser("policy")
    policy.add_argument("--hours", type=float, default=24)
    policy.add_argument("--migrations", type=int, default=10)
    real = sub.add_parser("real")
    real.add_argument("--minutes", type=float, default=5)
    real.add_argument("--migrations", type=int, default=4)
    args = parser.parse_args()
    if args.what == "policy":
        run_policy(args.hours, args.migrations)
    else:
        run_real(args.minutes, args.migrations)


if __name__ == "__main__":
    main()
