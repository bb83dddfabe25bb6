#!/usr/bin/env python3
"""Scenario 3 figures: how fast the guard freezes a writer at full disk speed, whether the
writer ever hits ENOSPC, and what the guard costs when idle.

    sudo .venv/bin/python bench/space_reaction.py [--trials 20] [--idle-seconds 30] [--as-shipped]

--as-shipped runs the guard as the package ships it: User=spaceguard with every hardening
line, freezing through spaceguard-freezer (systemd 252 lets only root freeze); without it
the guard runs as root and freezes directly (tests/guardrig.py).

Real parts only: a sandboxed systemd, the guard as a Type=notify unit, a 1 GiB ext4 loop
volume mounted with nodelalloc (a small ext4 with delayed allocation throttles a fast
writer near full, which would hide a slow guard), and an unthrottled writer unit.

Reaction time = from the moment free space (f_bavail) first drops below pause_below to the
moment the writer's cgroup reports `frozen 1`, both seen by a watcher thread here polling
every 0.5 ms. Measured with `predict = "0s"` (pure threshold reaction), then the ENOSPC
trials are repeated with the default prediction on. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guardrig import GuardRig, read_status, wait_until, writer_unit
from tests.installed import FREEZER, ShippedRig, shipped_workdir
from tests.sandbox import LoopVolume, SystemdSandbox

MIB = 1024 * 1024
RIG: type[GuardRig] = GuardRig  # ShippedRig with --as-shipped
HEADROOM = 32 * MIB


class Watcher(threading.Thread):
    """Records when free space first crosses the threshold and when the cgroup froze."""

    def __init__(self, mountpoint: Path, events: Path) -> None:
        super().__init__(daemon=True)
        self.mountpoint, self.events = str(mountpoint), events
        self.crossed: float | None = None
        self.frozen: float | None = None
        self.min_avail = 1 << 62
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set() and self.frozen is None:
            now = time.monotonic()
            st = os.statvfs(self.mountpoint)
            avail = st.f_bavail * st.f_frsize
            self.min_avail = min(self.min_avail, avail)
            if self.crossed is None and avail < HEADROOM:
                self.crossed = now
            try:
                if "frozen 1" in self.events.read_text():
                    self.frozen = time.monotonic()
            except OSError:
                pass
            time.sleep(0.0005)  # finer polling would steal the CPU the guard needs


def host_pid(sandbox: SystemdSandbox, unit: str) -> int:
    procs = (sandbox.unit_cgroup(unit) / "cgroup.procs").read_text().split()
    return int(procs[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_trials(
    python: str,
    trials: int,
    predict: str,
    work: Path,
    calls: list[float],
    before_trials: Callable[[GuardRig], None] | None = None,
    after_trials: Callable[[], None] | None = None,
    helper_calls: list[float] | None = None,
) -> tuple[list[float], int, int, list[int]]:
    """Returns (reaction times in ms, trials that hit ENOSPC, predictive pauses, min avail);
    appends the guard's own FreezeUnit call durations (ms) to `calls`."""
    volume = LoopVolume(work / "vol", 1024, options=["nodelalloc"]).mount()
    sandbox = SystemdSandbox(work / "sandbox")
    reactions: list[float] = []
    enospc = 0
    early = 0
    min_avails: list[int] = []
    try:
        (volume.mountpoint / "data").mkdir()
        status = work / "writer.status"
        sandbox.up(
            {"writer@bench.service": writer_unit(python, volume.mountpoint / "data", "2G", status)}
        )
        rig = RIG(sandbox, work, python, watchdog_sec=10, log_level="info")
        rig.write_config(f"""
            [volumes.bench]
            path = "{volume.mountpoint}"
            pause_below = "{HEADROOM}"
            resume_above = "{HEADROOM * 4}"
            resume_after = "200ms"
            predict = "{predict}"
            [[migrations]]
            account = "bench"
            unit = "writer@bench.service"
            volume = "bench"
            """)
        rig.install()
        rig.start()
        if before_trials is not None:
            before_trials(rig)
        never_frozen_shown = False
        for trial in range(trials):
            status.unlink(missing_ok=True)
            sandbox.systemctl("start", "writer@bench.service")
            events = sandbox.unit_cgroup("writer@bench.service") / "cgroup.events"
            watcher = Watcher(volume.mountpoint, events)
            watcher.start()
            watcher.join(60)
            watcher.stop_flag.set()
            words = [word for word, _ in read_status(status)]
            hit = "ENOSPC" in words
            enospc += hit
            min_avails.append(watcher.min_avail)
            if watcher.frozen is None:
                print(f"  trial {trial + 1}: never frozen (status {words})")
                if not never_frozen_shown:  # why, once: the guard's (and the helper's) word
                    never_frozen_shown = True
                    for unit in ("spaceguard.service", FREEZER):
                        tail = sandbox.journal(unit).splitlines()[-12:]
                        print("\n".join(f"    {unit}: {line}" for line in tail))
            elif watcher.crossed is None:
                early += 1  # frozen before free space ever crossed the threshold
            else:
                reactions.append((watcher.frozen - watcher.crossed) * 1000)
            sandbox.systemctl("stop", "writer@bench.service")
            for path in (volume.mountpoint / "data").iterdir():
                path.unlink()
            wait_until(
                lambda: rig.metrics().get('spaceguard_volume_low{volume="bench"}') == 0,
                30,
                "the guard to see the space back",
            )
        if after_trials is not None:
            after_trials()
        calls.extend(
            float(line.rsplit("took ", 1)[1].split()[0])
            for line in rig.journal().splitlines()
            if line.startswith("freeze ") and "D-Bus call took" in line
        )
        helper = "freezing through the helper" in rig.journal()
        print("  (freezes went through the helper)" if helper else "  (the guard froze directly)")
        if isinstance(rig, ShippedRig):
            (helper_calls if helper_calls is not None else []).extend(
                float(line.rsplit("done in ", 1)[1].split()[0])
                for line in sandbox.journal(FREEZER).splitlines()
                if line.startswith("freezer: freeze ") and "done in" in line
            )
        rig.stop()
        if isinstance(rig, ShippedRig):
            rig.cleanup()
    finally:
        sandbox.down()
        volume.umount()
    return reactions, enospc, early, min_avails


def idle_cost(python: str, seconds: float, work: Path) -> tuple[float, float]:
    """CPU (% of one core) and RSS (MiB) of an idle guard: 2 volumes, 10 migrations."""
    # Sparse 100 GiB images: a real /space is large, and far from its thresholds the guard
    # samples once a second (a small, nearly full volume is sampled much faster, by design).
    volumes = [LoopVolume(work / f"idle{i}", 100 * 1024).mount() for i in range(2)]
    sandbox = SystemdSandbox(work / "idle-sandbox")
    try:
        units = {
            f"sleeper@m{i}.service": "[Service]\nExecStart=/bin/sleep infinity\n" for i in range(10)
        }
        sandbox.up(units)
        rig = RIG(sandbox, work / "idle-rig", python, watchdog_sec=10, log_level="info")
        rig.workdir.mkdir()
        migrations = "".join(
            f"""
            [[migrations]]
            account = "m{i}"
            unit = "sleeper@m{i}.service"
            volume = "v{i % 2}"
            """
            for i in range(10)
        )
        volume_tables = "".join(
            f"""
            [volumes.v{i}]
            path = "{volume.mountpoint}"
            pause_below = "5%"
            resume_above = "10%"
            """
            for i, volume in enumerate(volumes)
        )
        rig.write_config(volume_tables + migrations)
        rig.install()
        for unit in units:
            sandbox.systemctl("start", unit)
        rig.start()
        time.sleep(3)  # let start-up work settle
        pid = host_pid(sandbox, "spaceguard.service")
        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(pid) - before
        elapsed = time.monotonic() - started
        rss = rss_mib(pid)
        rig.stop()
        if isinstance(rig, ShippedRig):
            rig.cleanup()
        return 100 * used / elapsed, rss
    finally:
        sandbox.down()
        for volume in volumes:
            volume.umount()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--as-shipped", action="store_true", help="unprivileged, via the helper")
    args = parser.parse_args()
    python = sys.executable
    global RIG
    base = None
    if args.as_shipped:
        RIG, base = ShippedRig, shipped_workdir("bench-")
    with tempfile.TemporaryDirectory(prefix="spaceguard-bench-", dir=base) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # the shipped guard (user spaceguard) must reach the volume
        (work / "a").mkdir()
        (work / "b").mkdir()
        (work / "c").mkdir()
        print(
            f"reaction: {args.trials} trials, 1 GiB ext4 (nodelalloc), unthrottled writer, "
            f"pause_below = 32 MiB, predict off"
        )
        calls: list[float] = []
        helper_calls: list[float] = []  # the helper's own FreezeUnit calls, --as-shipped
        reactions, enospc, early, avails = run_trials(
            python, args.trials, "0s", work / "a", calls, helper_calls=helper_calls
        )
        if reactions:
            print(
                f"  threshold crossing -> unit frozen: median {statistics.median(reactions):.1f} "
                f"ms, worst {max(reactions):.1f} ms, best {min(reactions):.1f} ms "
                f"({len(reactions)} measured)"
            )
        print(
            f"  trials with ENOSPC: {enospc} of {args.trials}; frozen before crossing: "
            f"{early}; least free space seen: {min(avails) / MIB:.1f} MiB"
        )
        if calls:
            print(
                f"  of which the FreezeUnit call (guard's decision -> systemd replies frozen):"
                f" median {statistics.median(calls):.1f} ms, worst {max(calls):.1f} ms"
            )
        if helper_calls:
            print(
                f"  of which the helper's own FreezeUnit call: median "
                f"{statistics.median(helper_calls):.1f} ms, worst {max(helper_calls):.1f} ms"
            )
            if len(helper_calls) == len(calls):  # the same freezes, in the same order
                hops = [guard - helper for guard, helper in zip(calls, helper_calls, strict=True)]
                print(
                    f"  the hop guard -> helper -> guard (per freeze): median "
                    f"{statistics.median(hops):.2f} ms, worst {max(hops):.2f} ms"
                )
        print(f"ENOSPC check: {args.trials} trials with predict = 10m (the default)")
        calls_p: list[float] = []
        reactions_p, enospc_p, early_p, avails_p = run_trials(
            python, args.trials, "10m", work / "b", calls_p
        )
        print(
            f"  trials with ENOSPC: {enospc_p} of {args.trials}; frozen before the "
            f"threshold was crossed: {early_p}; least free space seen: "
            f"{min(avails_p) / MIB:.1f} MiB"
        )
        if reactions_p:
            print(
                f"  crossed before frozen in {len(reactions_p)} trials: median "
                f"{statistics.median(reactions_p):.1f} ms"
            )
        cpu, rss = idle_cost(python, args.idle_seconds, work / "c")
        print(
            f"idle guard (2 volumes, 10 migrations, {args.idle_seconds:.0f} s): "
            f"CPU {cpu:.3f} % of one core, RSS {rss:.1f} MiB"
        )
    if base is not None:
        base.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
