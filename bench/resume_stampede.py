#!/usr/bin/env python3
"""Resume without a stampede (issue 14): 10 rate-limited writers fill a loop volume to its
pause threshold, the guard freezes them, then space is given back. Prints, per setting of
resume_batch: time from the space coming back to the last writer thawed, the least free
space seen during the resume (until every writer finished), and the pause/resume cycles per
writer (goal: one freeze, one thaw each).

    sudo .venv/bin/python bench/resume_stampede.py [--writers 10] [--rate 4M] [--size 30M]
                                                  [--give-back MIB] [--batches 0,10]

resume_batch 0 is the default (batches sized from the rate the writers filled the volume
at, one every resume_step); 10 resumes all at once, for comparison. Real parts only, the
guard as shipped (tests.installed.ShippedRig): a sandboxed systemd, a 512 MiB ext4 loop
volume (nodelalloc), writer units (tests/integration/writer.py). predict = "0s": the pause
is the threshold's, not the prediction's. A watcher thread here polls free space
(statvfs) and each writer's cgroup.events every 2 ms; cycles are counted both from the
guard's journal ("freeze/thaw UNIT done") and from the cgroups' frozen 0/1 transitions.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guardrig import read_status, wait_until, writer_unit
from tests.installed import ShippedRig, shipped_workdir
from tests.sandbox import LoopVolume, SystemdSandbox

MIB = 1024 * 1024
PAUSE_MIB = 32
DONE_LINE = re.compile(r"\S+: (freeze|thaw) (\S+) done \(")


class Watcher(threading.Thread):
    """Free space and each unit's cgroup freezer state, every 2 ms."""

    def __init__(self, volume: LoopVolume, events: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        self.volume, self.events = volume, events
        self.frozen = dict.fromkeys(events, False)
        self.freezes: Counter[str] = Counter()
        self.last_thaw: dict[str, float] = {}
        self.min_avail = 1 << 62
        self.measuring = False
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            now = time.monotonic()
            if self.measuring:
                self.min_avail = min(self.min_avail, self.volume.usable_bytes)
            for unit, path in self.events.items():
                try:
                    frozen = "frozen 1" in path.read_text()
                except OSError:
                    continue  # the unit ended: its cgroup is gone
                if frozen and not self.frozen[unit]:
                    self.freezes[unit] += 1
                elif not frozen and self.frozen[unit]:
                    self.last_thaw[unit] = now
                self.frozen[unit] = frozen
            time.sleep(0.002)


def run(python: str, batch: int, args: argparse.Namespace, work: Path) -> None:
    volume = LoopVolume(work / "vol", 512, options=["nodelalloc"]).mount()
    sandbox = SystemdSandbox(work / "sandbox")
    rig: ShippedRig | None = None
    accounts = [f"w{index}" for index in range(args.writers)]
    units = {f"writer@{account}.service": account for account in accounts}
    try:
        mib = volume.usable_bytes // MIB - (PAUSE_MIB + args.room)
        give = mib if args.give_back == 0 else min(mib, args.give_back)
        ballast = volume.mountpoint / "ballast.bin"  # what is given back
        for path, count in ((ballast, give), (volume.mountpoint / "kept.bin", mib - give)):
            with path.open("wb") as handle:
                for _ in range(count):
                    handle.write(b"\0" * MIB)
        unit_files = {}
        for unit, account in units.items():
            (volume.mountpoint / account).mkdir()
            unit_files[unit] = writer_unit(
                python,
                volume.mountpoint / account,
                args.size,
                work / f"{account}.status",
                rate=args.rate,
            )
        sandbox.up(unit_files)
        rig = ShippedRig(sandbox, work, python, watchdog_sec=10)
        migrations = "".join(
            f"""
            [[migrations]]
            account = "{account}"
            unit = "{unit}"
            volume = "bench"
            pause = "freeze"
            """
            for unit, account in units.items()
        )
        rig.write_config(f"""
            [volumes.bench]
            path = "{volume.mountpoint}"
            pause_below = "{PAUSE_MIB}MiB"
            resume_above = "{PAUSE_MIB * 2}MiB"
            resume_after = "1s"
            predict = "0s"
            resume_batch = {batch}
            {migrations}
            """)
        rig.install()
        rig.start()
        for unit in units:
            sandbox.systemctl("start", unit)
        watcher = Watcher(
            volume, {unit: sandbox.unit_cgroup(unit) / "cgroup.events" for unit in units}
        )
        watcher.start()
        wait_until(lambda: all(watcher.frozen.values()), 120, "every writer to be frozen")
        ballast.unlink()
        given_back = time.monotonic()
        watcher.measuring = True
        wait_until(
            lambda: all(
                any(word == "DONE" for word, _ in read_status(work / f"{a}.status"))
                for a in accounts
            ),
            600,
            "every writer to finish",
            on_timeout=rig.journal,
        )
        finished = time.monotonic()
        watcher.stop_flag.set()
        watcher.join()
        journal = Counter(
            (match.group(2), match.group(1)) for match in DONE_LINE.finditer(rig.journal())
        )
        thaws = [
            watcher.last_thaw[unit] - given_back for unit in units if unit in watcher.last_thaw
        ]
        enospc = sum(
            any(word == "ENOSPC" for word, _ in read_status(work / f"{a}.status")) for a in accounts
        )
        cycles = Counter(
            (journal[(unit, "freeze")], journal[(unit, "thaw")], watcher.freezes[unit])
            for unit in units
        )
        label = "auto (0, the default)" if batch == 0 else str(batch)
        print(f"resume_batch = {label}:")
        if len(thaws) == len(units):
            print(f"  space back -> all {len(units)} thawed: {max(thaws):.1f} s")
        else:
            print(f"  thawed: {len(thaws)} of {len(units)} (the others were never seen thawing)")
        print(f"  thaw times (s after space back): {' '.join(f'{t:.1f}' for t in sorted(thaws))}")
        print(f"  space back -> all finished: {finished - given_back:.1f} s")
        print(
            f"  least free space during the resume: {watcher.min_avail / MIB:.1f} MiB "
            f"(pause_below {PAUSE_MIB} MiB)"
        )
        print(
            "  cycles per writer (freezes, thaws by the journal; freezes seen in the cgroup): "
            + ", ".join(f"{n} x {key}" for key, n in sorted(cycles.items()))
        )
        print(f"  writers that hit ENOSPC: {enospc}")
    finally:
        if rig is not None:
            rig.stop()
            rig.cleanup()
        sandbox.down()
        volume.umount()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, default=10)
    parser.add_argument("--rate", default="4M", help="each writer's rate (bytes/s)")
    parser.add_argument("--size", default="30M", help="what each writer writes")
    parser.add_argument("--room", type=int, default=80, help="MiB free above pause_below")
    parser.add_argument(
        "--give-back", type=int, default=0, help="MiB given back (0: all the ballast)"
    )
    parser.add_argument("--batches", default="0,10", help="resume_batch values to run")
    args = parser.parse_args()
    print(
        f"{args.writers} writers at {args.rate}/s each, {args.size} each; 512 MiB ext4, "
        f"pause_below {PAUSE_MIB} MiB, {args.room} MiB free above it at the start; "
        f"resume_after 1s, resume_step 10s (default); given back: "
        f"{args.give_back or 'all the ballast'} MiB"
    )
    for batch in (int(value) for value in args.batches.split(",")):
        work = shipped_workdir("stampede-")
        try:
            run(sys.executable, batch, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
