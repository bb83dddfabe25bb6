#!/usr/bin/env python3
"""Scenario 1 at scale: how many item errors the guard absorbs, what a million of them cost
in memory, and how fast a run-level error still stops the run.

    sudo .venv/bin/python bench/item_errors.py [--lines 1000000] [--trials 20] [--no-guard]

Figures (the lines are rclone 1.60's 'Failed to copy: ... permission denied' item errors,
dated now, each naming another file):

* pure: item error lines per second through MigrationLog.feed (parse, the current-run
  rule, bounded aggregation), and through feed + policy.decide, in batches the size
  logwatch delivers (128 KiB reads); the bench process's RSS growth over --lines of them;
  and through LogWatcher + feed on an asyncio loop, with the longest loop turn (what a
  flood of item errors costs the volume sampler, which needs the loop to turn);
* end to end: the real guard (a unit in a sandboxed systemd) following the log of a
  running migration: lines per second from the first line written to the last one counted
  (spaceguard_log_lines_total), its CPU time, and its RSS before and after --lines item
  errors (the breaker is set out of reach: max_item_errors = 10^12);
* then, on the same guard: a run-level error line (rclone's 401 on the remote) written →
  the migration unit stopped (its cgroup empty), --trials times (bench/failure_latency.py's
  measurement), after each a `spaceguardctl retry`.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from failure_latency import stop_latencies
from space_reaction import cpu_seconds, rss_mib
from spaceguard.config import load
from spaceguard.logwatch import MAX_SECONDS_PER_TURN, READ_CHUNK_BYTES, LogWatcher
from spaceguard.model import UnitChanged, UnitView
from spaceguard.policy import decide, initial_state, is_current_line
from spaceguard.rclone import compile_rules
from spaceguard.runtime import MigrationLog

from tests.guardrig import GuardRig, wait_until
from tests.sandbox import LoopVolume, SystemdSandbox

UNIT = "m365-migrate@alice.service"
BATCH_BYTES = READ_CHUNK_BYTES  # what logwatch reads at a time


def item_line(stamp: str, n: int) -> str:
    name = f"Shared/Team {n % 97}/report-{n}.docx"
    return (
        f"{stamp} ERROR : {name}: Failed to copy: failed to open source object: "
        f"open /srv/onedrive/alice/{name}: permission denied"
    )


def batches(total: int, stamp: str) -> Iterator[list[str]]:
    per_batch = BATCH_BYTES // len(item_line(stamp, 10**6))
    for start in range(0, total, per_batch):
        yield [item_line(stamp, n) for n in range(start, min(total, start + per_batch))]


def pure(lines: int, workdir: Path) -> None:
    config_path = workdir / "pure.toml"
    config_path.write_text(
        f"""
[guard]
state_dir = "{workdir}/pure-state"
metrics_listen = ""

[volumes.space]
path = "{workdir}"

[[migrations]]
account = "alice"
unit = "{UNIT}"
volume = "space"
log = "{workdir}/alice.log"
max_item_errors = 1000000000000
"""
    )
    config = load(config_path)
    started = time.time() - 10
    stamp = time.strftime("%Y/%m/%d %H:%M:%S")
    for with_policy in (False, True):
        state = initial_state(config)
        state, _ = decide(
            config, state, UnitChanged(UNIT, UnitView("active", "running", started_at=started)),
            time.time(),
        )  # fmt: skip
        log = MigrationLog("alice", Path("/l"), compile_rules())
        current = functools.partial(is_current_line, state.migrations["alice"])

        for batch in batches(20_000, stamp):  # warm up
            log.feed(batch, False, current)
        # 50 distinct batches (not timed), fed in turn until `lines` are read
        generated = list(batches(50 * (BATCH_BYTES // len(item_line(stamp, 10**6))), stamp))
        gc.collect()
        rss_before = rss_mib(os.getpid())
        began, began_cpu = time.perf_counter(), time.process_time()
        fed = 0
        while fed < lines:
            batch = generated[(fed // len(generated[0])) % len(generated)]
            event = log.feed(batch, False, current)
            if with_policy and event is not None:
                state, _ = decide(config, state, event, time.time())
            fed += len(batch)
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - began_cpu
        gc.collect()
        rss_after = rss_mib(os.getpid())
        lines_fed = fed
        what = "MigrationLog.feed + policy.decide" if with_policy else "MigrationLog.feed"
        print(
            f"pure, {what}: {lines_fed / cpu:,.0f} item error lines per CPU second "
            f"({lines_fed:,} lines: {cpu:.2f} s CPU, {elapsed:.2f} s wall); bench process RSS "
            f"{rss_before:.1f} -> {rss_after:.1f} MiB"
        )
        if with_policy:
            items = state.migrations["alice"].run_items
            print(
                f"  the run's record: {items.total:,} item errors, "
                f"{len(items.first) + len(items.last)} kept"
            )


def watched(lines: int, workdir: Path) -> None:
    """The log followed by LogWatcher on an asyncio loop, as in the guard: throughput,
    and the longest loop turn (thread CPU time, so that other processes on the machine do
    not count; and wall time) while the whole file is absorbed."""
    path = workdir / "watched.log"
    stamp = time.strftime("%Y/%m/%d %H:%M:%S")
    with path.open("w") as handle:
        for batch in batches(lines, stamp):
            handle.write("\n".join(batch) + "\n")

    async def scenario() -> tuple[float, float, float]:
        log = MigrationLog("alice", path, compile_rules())
        read = 0
        done = asyncio.Event()

        def on_lines(key: str, batch: list[str]) -> None:
            nonlocal read
            log.feed(batch, False, lambda at, backlog: True)
            read += len(batch)
            if read >= lines:
                done.set()

        longest_cpu = longest_wall = 0.0

        async def ticker() -> None:
            nonlocal longest_cpu, longest_wall
            cpu, wall = time.thread_time(), time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0)
                now_cpu, now_wall = time.thread_time(), time.perf_counter()
                longest_cpu = max(longest_cpu, now_cpu - cpu)
                longest_wall = max(longest_wall, now_wall - wall)
                cpu, wall = now_cpu, now_wall

        watcher = LogWatcher()
        task = asyncio.create_task(ticker())
        began = time.thread_time()
        watcher.add("alice", path, None, on_lines)
        await done.wait()
        await task
        watcher.close()
        return time.thread_time() - began, longest_cpu, longest_wall

    cpu, longest_cpu, longest_wall = asyncio.run(scenario())
    print(
        f"pure, LogWatcher + MigrationLog.feed on a loop: {lines / cpu:,.0f} item error lines "
        f"per CPU second; longest loop turn {longest_cpu * 1000:.0f} ms of CPU "
        f"({longest_wall * 1000:.0f} ms wall; {READ_CHUNK_BYTES >> 10} KiB batches, "
        f"{MAX_SECONDS_PER_TURN * 1000:g} ms a turn)"
    )
    path.unlink()


def guard_pid(sandbox: SystemdSandbox) -> int:
    """The guard's main process on the host (its cgroup also holds the usage scanner)."""
    cgroup = sandbox.unit_cgroup("spaceguard.service")
    for pid in (cgroup / "cgroup.procs").read_text().split():
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"run" in command and any(part.endswith(b"spaceguard") for part in command):
            return int(pid)
    raise RuntimeError("no 'spaceguard run' process in the guard's cgroup")


def end_to_end(lines: int, trials: int, python: str) -> None:
    with tempfile.TemporaryDirectory(prefix="spaceguard-bench-") as tmp:
        work = Path(tmp)
        volume = LoopVolume(work / "vol", 1024).mount()
        sandbox = SystemdSandbox(work / "sandbox")
        try:
            sandbox.up({UNIT: "[Service]\nExecStart=/bin/sleep infinity\n"})
            log = work / "alice.log"
            rig = GuardRig(sandbox, work, python, watchdog_sec=10, log_level="info")
            rig.write_config(
                f"""
                [volumes.space]
                path = "{volume.mountpoint}"
                pause_below = "1MiB"
                resume_above = "2MiB"

                [[migrations]]
                account = "alice"
                unit = "{UNIT}"
                volume = "space"
                log = "{log}"
                max_item_errors = 1000000000000
                """
            )
            rig.install()
            sandbox.systemctl("start", UNIT)
            rig.start()
            key = 'spaceguard_log_lines_total{account="alice"}'
            stamp = time.strftime("%Y/%m/%d %H:%M:%S")
            with log.open("a") as handle:  # warm up: every code path once
                for batch in batches(20_000, stamp):
                    handle.write("\n".join(batch) + "\n")
            wait_until(lambda: rig.metrics().get(key, 0) >= 20_000, 60, "the warm-up lines")
            pid = guard_pid(sandbox)
            rss_before, cpu_before = rss_mib(pid), cpu_seconds(pid)
            began = time.monotonic()
            written = 20_000
            with log.open("a") as handle:
                for batch in batches(lines, stamp):
                    handle.write("\n".join(batch) + "\n")
                    written += len(batch)
            write_done = time.monotonic() - began
            wait_until(
                lambda: rig.metrics().get(key, 0) >= written, 600, "the guard to read every line"
            )
            elapsed = time.monotonic() - began
            rss_after, cpu = rss_mib(pid), cpu_seconds(pid) - cpu_before
            counted = rig.metrics().get(
                'spaceguard_log_item_errors_total{account="alice",class="unrecoverable",'
                'rule="local_permission"}',
                0,
            )
            print(
                f"end to end, the real guard following the log: {lines / elapsed:,.0f} item "
                f"error lines/s ({lines:,} lines written in {write_done:.1f} s, all counted "
                f"{elapsed:.1f} s after the first; guard CPU {cpu:.1f} s, "
                f"{lines / max(cpu, 1e-9):,.0f} lines per CPU second); "
                f"item errors counted: {counted:,.0f}"
            )
            print(
                f"  guard RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after "
                f"{lines:,} item errors: growth {rss_after - rss_before:+.1f} MiB"
            )
            latencies = stop_latencies(sandbox, rig, "alice", UNIT, log, trials)
            print(
                f"run-level error line written -> migration unit stopped (cgroup empty), "
                f"{trials} trials, on that guard: median {statistics.median(latencies):.1f} ms, "
                f"worst {max(latencies):.1f} ms, best {min(latencies):.1f} ms"
            )
            rig.stop()
        finally:
            sandbox.down()
            volume.umount()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--no-guard", action="store_true", help="the pure figures only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spaceguard-bench-") as tmp:
        pure(args.lines, Path(tmp))
        watched(min(args.lines, 200_000), Path(tmp))
    if not args.no_guard:
        end_to_end(args.lines, args.trials, sys.executable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
