#!/usr/bin/env python3
"""Fan-out figures: how fast the guard freezes (and thaws) every migration of a volume.

    sudo .venv/bin/python bench/fanout.py [--sizes 1,50,200] [--cycles 20] [--idle-seconds 30]
                                          [--modes slice,units]

Two ways to freeze: `slice` (the units run in bench.slice, the volume says slice =
"bench.slice": one FreezeUnit of the slice) and `units` (no slice: one FreezeUnit per
unit, at most 64 in flight).

For N = 1, 50 and 200 migration units on one volume (real systemd in a sandbox, the guard
as a Type=notify unit, a real ext4 loop volume), each cycle:

1. a filler grows a ballast file (fallocate, 4 MiB steps, about 1 GiB/s) until free space
   (f_bavail) falls below pause_below: the *crossing* is the moment right after the step
   that took it below, as statvfs says;
2. every unit's cgroup.events is watched with inotify: *all frozen* is when the last unit
   reports `frozen 1`, *first -> last* the spread between the first and the last;
3. the ballast is deleted; free space is back at once, so the *hold-down end* is that
   moment plus resume_after; *all thawed* is when the last unit reports `frozen 0`
   (resume_batch = N: every migration in one batch; the default batches by fill rate,
   and here the ballast, not the sleepers, filled the volume);
4. the guard's view (its metrics: spaceguard_unit_frozen) is compared with systemd's
   (`FreezerState` of every unit) once both have settled, after the freeze and after the
   thaw: a unit whose two states ever differ counts as a disagreement.

Then the idle cost: 10 volumes x 20 migrations, each following its own (quiet) log file:
CPU (% of one core) and RSS of the guard over --idle-seconds.

Prints figures; asserts nothing. Run as root with nothing else running: the figures are
wall-clock times on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import select
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guardrig import GuardRig, wait_until
from tests.sandbox import LoopVolume, SystemdSandbox

MIB = 1024 * 1024
PAUSE_BELOW = 128 * MIB
RESUME_ABOVE = 192 * MIB
RESUME_AFTER = 1.0
STEP = 4 * MIB
SLEEPER = "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
IN_MODIFY = 0x00000002
IN_NONBLOCK = 0o4000


class FreezeWatcher(threading.Thread):
    """Records when each unit's cgroup reports frozen 1 / frozen 0 (inotify on
    cgroup.events, which the kernel touches on every change of `frozen`)."""

    def __init__(self, events: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        self.fd = _libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, tuple[str, Path]] = {}
        for unit, path in events.items():
            wd = _libc.inotify_add_watch(self.fd, str(path).encode(), IN_MODIFY)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self.paths[wd] = (unit, path)
        self.state = {unit: self._frozen(path) for unit, path in events.items()}
        self.changes: list[tuple[float, str, bool]] = []  # (when, unit, frozen)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()

    @staticmethod
    def _frozen(path: Path) -> bool:
        try:
            return "frozen 1" in path.read_text()
        except OSError:
            return False

    def run(self) -> None:
        while not self.stop_flag.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready:
                continue
            now = time.monotonic()
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            seen: set[int] = set()
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                seen.add(wd)
            for wd in seen:
                unit, path = self.paths[wd]
                frozen = self._frozen(path)
                with self.lock:
                    if frozen != self.state[unit]:
                        self.state[unit] = frozen
                        self.changes.append((now, unit, frozen))

    def since(self, start: float, frozen: bool) -> dict[str, float]:
        """First time each unit went to `frozen` at or after `start`."""
        first: dict[str, float] = {}
        with self.lock:
            for when, unit, state in self.changes:
                if when >= start and state == frozen and unit not in first:
                    first[unit] = when
        return first

    def all_are(self, frozen: bool) -> bool:
        with self.lock:
            return all(state == frozen for state in self.state.values())

    def close(self) -> None:
        self.stop_flag.set()
        self.join(2)
        os.close(self.fd)


def fill_until_below(path: Path, mountpoint: Path) -> float:
    """Grow `path` by STEP every 4 ms until f_bavail < PAUSE_BELOW; returns the crossing."""
    with path.open("ab") as ballast:
        size = ballast.tell()
        while True:
            os.posix_fallocate(ballast.fileno(), size, STEP)
            size += STEP
            now = time.monotonic()
            st = os.statvfs(mountpoint)
            if st.f_bavail * st.f_frsize < PAUSE_BELOW:
                return now
            time.sleep(0.004)


def guard_frozen(rig: GuardRig, units: list[str]) -> dict[str, bool]:
    """The guard's view of each unit's FreezerState, from its metrics."""
    metrics = rig.metrics()
    view = {}
    for key, value in metrics.items():
        if key.startswith("spaceguard_unit_frozen{"):
            unit = key.split('unit="', 1)[1].split('"', 1)[0]
            view[unit] = value == 1
    return {unit: view.get(unit, False) for unit in units}


def systemd_frozen(sandbox: SystemdSandbox, units: list[str]) -> dict[str, bool]:
    out = sandbox.systemctl("show", "-p", "Id,FreezerState", *units).stdout
    state: dict[str, bool] = {}
    unit = ""
    for line in out.splitlines():
        if line.startswith("Id="):
            unit = line[3:]
        elif line.startswith("FreezerState="):
            state[unit] = line.split("=", 1)[1] in ("frozen", "freezing")
    return state


def fanout(
    python: str, n: int, cycles: int, work: Path, use_slice: bool = False
) -> dict[str, list[float] | int]:
    volume = LoopVolume(work / "vol", 1024, options=["nodelalloc"]).mount()
    sandbox = SystemdSandbox(work / "sandbox")
    units = [f"sleeper@m{i}.service" for i in range(n)]
    result: dict[str, list[float] | int] = {
        "all_frozen": [],
        "spread": [],
        "all_thawed": [],
        "disagreed": 0,
    }
    disagreed: set[str] = set()
    try:
        sleeper = SLEEPER + ("Slice=bench.slice\n" if use_slice else "")
        sandbox.up({unit: sleeper for unit in units} | {"bench.slice": "[Slice]\n"})
        sandbox.systemctl("start", *units)
        rig = GuardRig(sandbox, work, python, watchdog_sec=10, log_level="info")
        migrations = "".join(
            f"""
            [[migrations]]
            account = "m{i}"
            unit = "{unit}"
            volume = "bench"
            """
            for i, unit in enumerate(units)
        )
        rig.write_config(
            f"""
            [volumes.bench]
            path = "{volume.mountpoint}"
            pause_below = "{PAUSE_BELOW}"
            resume_above = "{RESUME_ABOVE}"
            resume_after = "{RESUME_AFTER:g}s"
            predict = "0s"
            # all at once: the ballast filled the volume, not the sleepers (by default the
            # guard resumes in batches sized by the rate the volume filled before the pause)
            resume_batch = {n}
            {'slice = "bench.slice"' if use_slice else ""}
            """
            + migrations
        )
        rig.install()
        rig.start()
        watcher = FreezeWatcher(
            {unit: sandbox.unit_cgroup(unit) / "cgroup.events" for unit in units}
        )
        watcher.start()
        ballast = volume.mountpoint / "ballast"

        def compare() -> None:
            ours, theirs = guard_frozen(rig, units), systemd_frozen(sandbox, units)
            disagreed.update(unit for unit in units if ours[unit] != theirs[unit])

        for _cycle in range(cycles):
            crossed = fill_until_below(ballast, volume.mountpoint)
            wait_until(lambda: watcher.all_are(True), 30, "every unit frozen")
            frozen = watcher.since(crossed, True)
            if len(frozen) == n:
                result["all_frozen"].append((max(frozen.values()) - crossed) * 1000)  # type: ignore[union-attr]
                result["spread"].append((max(frozen.values()) - min(frozen.values())) * 1000)  # type: ignore[union-attr]
            wait_until(lambda: all(guard_frozen(rig, units).values()), 30, "the guard to agree")
            compare()
            ballast.unlink()
            recovered = time.monotonic()
            st = os.statvfs(volume.mountpoint)
            if st.f_bavail * st.f_frsize < RESUME_ABOVE:
                print("  (free space not back at once after the unlink)")
            wait_until(lambda: watcher.all_are(False), 30, "every unit thawed")
            thawed = watcher.since(recovered, False)
            if len(thawed) == n:
                end = recovered + RESUME_AFTER
                result["all_thawed"].append((max(thawed.values()) - end) * 1000)  # type: ignore[union-attr]
            wait_until(
                lambda: (
                    not any(guard_frozen(rig, units).values())
                    and rig.metrics().get('spaceguard_volume_low{volume="bench"}') == 0
                ),
                30,
                "the guard to agree",
            )
            compare()
        watcher.close()
        rig.stop()
    finally:
        if os.environ.get("FANOUT_JOURNAL") and sandbox.is_up:  # for a closer look
            Path(os.environ["FANOUT_JOURNAL"]).write_text(sandbox.journal("spaceguard.service"))
        sandbox.down()
        volume.umount()
    result["disagreed"] = len(disagreed)
    return result


def idle_cost(
    python: str,
    seconds: float,
    work: Path,
    n_volumes: int = 10,
    n_migrations: int = 200,
    with_logs: bool = True,
) -> tuple[float, float]:
    """CPU (% of one core) and RSS (MiB) of an idle guard: by default 10 volumes x 20
    migrations, each with a followed log file."""
    volumes = [LoopVolume(work / f"idle{i}", 100 * 1024).mount() for i in range(n_volumes)]
    sandbox = SystemdSandbox(work / "idle-sandbox")
    logs = work / "logs"
    logs.mkdir()
    try:
        units = [f"sleeper@m{i}.service" for i in range(n_migrations)]
        sandbox.up({unit: SLEEPER for unit in units})
        if units:
            sandbox.systemctl("start", *units)
        rig = GuardRig(sandbox, work / "idle-rig", python, watchdog_sec=10, log_level="info")
        rig.workdir.mkdir()
        tables = []
        for i, volume in enumerate(volumes):
            tables.append(f"""
            [volumes.v{i}]
            path = "{volume.mountpoint}"
            pause_below = "5%"
            resume_above = "10%"
            """)
        for i, unit in enumerate(units):
            log = logs / f"m{i}.log"
            log.write_text("2026/01/01 00:00:00 INFO  : Starting copy\n")
            tables.append(f"""
            [[migrations]]
            account = "m{i}"
            unit = "{unit}"
            volume = "v{i % n_volumes}"
            {f'log = "{log}"' if with_logs else ""}
            """)
        rig.write_config("".join(tables))
        rig.install()
        rig.start()
        time.sleep(5)  # let start-up work settle
        host = int(
            (sandbox.unit_cgroup("spaceguard.service") / "cgroup.procs").read_text().split()[0]
        )
        before, started = cpu_seconds(host), time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(host) - before
        elapsed = time.monotonic() - started
        rss = rss_mib(host)
        rig.stop()
        return 100 * used / elapsed, rss
    finally:
        sandbox.down()
        for volume in volumes:
            volume.umount()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,50,200")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument(
        "--modes", default="slice,units", help="slice: volumes.X.slice; units: no slice"
    )
    parser.add_argument(
        "--idle-breakdown", action="store_true", help="also: the idle cost of parts of it"
    )
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="spaceguard-fanout-") as tmp:
        runs = [
            (int(size), mode)
            for mode in args.modes.split(",")
            for size in args.sizes.split(",")
            if size and mode
        ]
        for n, mode in runs:
            work = Path(tmp) / f"n{n}-{mode}"
            work.mkdir()
            r = fanout(python, n, args.cycles, work, use_slice=mode == "slice")
            frozen, spread, thawed = r["all_frozen"], r["spread"], r["all_thawed"]
            assert isinstance(frozen, list) and isinstance(spread, list)
            assert isinstance(thawed, list)
            how = "one FreezeUnit of their slice" if mode == "slice" else "one FreezeUnit each"
            print(f"N = {n} units, {args.cycles} cycles, {how}:")
            if frozen:
                print(
                    f"  crossing -> all frozen: median {statistics.median(frozen):.1f} ms, "
                    f"worst {max(frozen):.1f} ms; first -> last frozen: median "
                    f"{statistics.median(spread):.1f} ms, worst {max(spread):.1f} ms"
                )
            if thawed:
                print(
                    f"  hold-down end -> all thawed: median {statistics.median(thawed):.0f} ms, "
                    f"worst {max(thawed):.0f} ms"
                )
            print(f"  units whose state ever disagreed with the guard's view: {r['disagreed']}")
        if args.idle_seconds > 0:
            work = Path(tmp) / "idle"
            work.mkdir()
            cpu, rss = idle_cost(python, args.idle_seconds, work)
            print(
                f"idle guard (10 volumes x 20 migrations, 200 followed logs, "
                f"{args.idle_seconds:.0f} s): CPU {cpu:.3f} % of one core, RSS {rss:.1f} MiB"
            )
        if args.idle_breakdown:
            for volumes, migrations, logs in ((10, 0, False), (1, 200, True), (10, 200, False)):
                work = Path(tmp) / f"idle-{volumes}-{migrations}-{logs}"
                work.mkdir()
                cpu, rss = idle_cost(python, args.idle_seconds, work, volumes, migrations, logs)
                print(
                    f"  {volumes} volumes, {migrations} migrations, "
                    f"{migrations if logs else 0} logs: CPU {cpu:.3f} %, RSS {rss:.1f} MiB"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
