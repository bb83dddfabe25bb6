#!/usr/bin/env python3
"""What the usage scan costs: its speed against du and gdu on a tree of a million files, and
what it does to the guard's reaction while it runs.

    sudo .venv/bin/python bench/usage_scan.py [--files 1000000] [--trials 12] [--repeats 3]

Real parts only. The tree is made on an ext4 loop volume by a fast generator (about 15 s
for a million files on this VM). Then:

1. **Scan time**, cold (`echo 3 > /proc/sys/vm/drop_caches` before each run) and warm: the
   guard's scanner (the worker process the guard runs, `python -m spaceguard.usage`: a new
   process, then again in the same process with its listing cache) against `du -sh MOUNT/*`
   and gdu (Debian's `gdu -npcx`, which walks with both cores). All run at the priority the
   guard's scanner has (`chrt --idle 0 ionice -c3`), so the machine's other load affects
   them alike.
2. **Thread or process**: how late a 1 ms timer of an asyncio loop fires while the same walk
   runs in a thread of that process (sharing its GIL) and in the idle worker process.
3. **Reaction during a scan**: the real guard (a Type=notify unit in a sandboxed systemd)
   guards an unthrottled writer on a 1 GiB volume (bench/space_reaction.py's set-up and
   watcher) while `spaceguardctl usage tree --rescan` walks the million-file volume;
   threshold crossing -> writer frozen, against a quiet guard.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from spaceguard.usage import ScanRequest, walk  # noqa: E402

from bench.space_reaction import HEADROOM, Watcher  # noqa: E402
from tests.guardrig import GuardRig, read_status, wait_until, writer_unit  # noqa: E402
from tests.sandbox import LoopVolume, SystemdSandbox  # noqa: E402

MIB = 1024 * 1024
IDLE = ["chrt", "--idle", "0", "ionice", "-c3"]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_tree(root: Path, files: int) -> float:
    """10 top directories x 100 x 10 leaves x 100 files (for a million); about one file in
    four (more in the first top directories) has 3000 bytes, the rest are empty."""
    started = time.monotonic()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    data = b"x" * 3000
    made = 0
    leaves = max(1, files // 100)
    for leaf in range(leaves):
        top, rest = divmod(leaf, max(1, leaves // 10))
        directory = root / f"top{min(top, 9)}" / f"d{rest // 10}" / f"e{rest % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for index in range(min(100, files - made)):
                fd = os.open(f"f{index}", flags, 0o644, dir_fd=dir_fd)
                if index % (2 + min(top, 9)) == 0:
                    os.write(fd, data)
                os.close(fd)
                made += 1
        finally:
            os.close(dir_fd)
    for index in range(5):  # a few large files: they lead the top N
        big = root / f"top{index}" / f"video{index}.mp4"
        with big.open("wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, (index + 1) * 40 * MIB)
    os.sync()
    return time.monotonic() - started


# --- 1. scan time ------------------------------------------------------------------------------


def timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.monotonic() - started


class ScannerProcess:
    """The guard's worker process, driven the way consumers.Worker drives it."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
        self.process = subprocess.Popen(
            [*IDLE, sys.executable, "-m", "spaceguard.usage"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        self.hello = json.loads(self.process.stdout.readline())["hello"]

    def scan(self, root: Path) -> tuple[float, dict[str, object]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        request = ScanRequest(root=str(root), budget=600, max_entries=50_000_000)
        started = time.monotonic()
        self.process.stdin.write(json.dumps({"id": 1, "request": request.to_json()}) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        elapsed = time.monotonic() - started
        if "error" in reply:
            raise RuntimeError(reply["error"])
        result: dict[str, object] = reply["result"]
        return elapsed, result

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def fmt(times: list[float]) -> str:
    if not times:
        return "-"
    return f"median {statistics.median(times):6.2f} s (best {min(times):.2f}, n={len(times)})"


def scan_times(mount: Path, repeats: int) -> None:
    du_cmd = [*IDLE, "sh", "-c", f"du -sh {mount}/*"]
    gdu = shutil.which("gdu")
    gdu_cmd = [*IDLE, gdu, "-npcx", str(mount)] if gdu else None
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, cache: str, seconds: float) -> None:
        rows.setdefault(name, {}).setdefault(cache, []).append(seconds)

    check: dict[str, object] = {}
    for _ in range(repeats):
        for name, command in (("du -sh MOUNT/*", du_cmd), ("gdu -npcx MOUNT", gdu_cmd)):
            if command is None:
                continue
            drop_caches()
            add(name, "cold", timed(command))
            add(name, "warm", timed(command))
        drop_caches()
        scanner = ScannerProcess()  # a new process: no listing cache
        seconds, check = scanner.scan(mount)
        add("guard's scanner", "cold", seconds)
        seconds, _ = scanner.scan(mount)
        add("guard's scanner, listing cache", "warm", seconds)
        drop_caches()
        seconds, _ = scanner.scan(mount)
        add("guard's scanner, listing cache", "cold", seconds)
        scanner.close()
        scanner = ScannerProcess()
        seconds, _ = scanner.scan(mount)
        add("guard's scanner", "warm", seconds)
        scanner.close()
    du_total = subprocess.run(
        ["du", "-sx", "--block-size=1", str(mount)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    print(
        f"  the scanner found {check['entries']:,} entries, {check['scanned_bytes']:,} bytes "
        f"(du -sx: {int(du_total):,}); all tools at chrt --idle / ionice -c3"
    )
    print(f"  {'':32} {'cold cache':42} warm cache")
    for name, by_cache in rows.items():
        print(f"  {name:32} {fmt(by_cache.get('cold', [])):42} {fmt(by_cache.get('warm', []))}")
    warm = {name: statistics.median(c["warm"]) for name, c in rows.items() if c.get("warm")}
    fastest = min(warm.values())
    print(
        "  warm, against the fastest: "
        + ", ".join(f"{name} {value / fastest:.2f}x" for name, value in warm.items())
    )


# --- 2. thread or process --------------------------------------------------------------------


async def loop_lateness(seconds: float, during: Callable[[], None] | None) -> list[float]:
    """Lateness (ms) of a 1 ms timer, for `seconds` or while `during` runs in a thread. The
    loop runs on CPU 0, `during` on CPU 1: what is left is what they share, not a core."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    os.sched_setaffinity(0, {0})
    if during is not None:

        def run() -> None:
            os.sched_setaffinity(0, {1})  # this thread only
            during()
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=run, daemon=True).start()
    else:
        loop.call_later(seconds, done.set)
    late: list[float] = []
    while not done.is_set():
        planned = loop.time() + 0.001
        await asyncio.sleep(0.001)
        late.append((loop.time() - planned) * 1000)
    return late


def lateness_text(late: list[float]) -> str:
    ordered = sorted(late)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    over_1 = 100 * sum(1 for value in ordered if value > 1.0) / len(ordered)
    over_5 = 100 * sum(1 for value in ordered if value > 5.0) / len(ordered)
    return (
        f"median {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms, "
        f"worst {ordered[-1]:.1f} ms, late > 1 ms {over_1:.1f} %, > 5 ms {over_5:.2f} % "
        f"({len(ordered)} timers)"
    )


def thread_or_process(mount: Path, rounds: int) -> None:
    """The three cases interleaved, `rounds` times: the machine's other load moves them alike."""
    request = ScanRequest(root=str(mount), budget=600, max_entries=50_000_000)
    walk(request)  # warm the caches
    scanner = ScannerProcess()
    os.sched_setaffinity(scanner.process.pid, {1})
    scanner.scan(mount)  # and its listing cache, like the thread's (a new cache each walk)
    cases: dict[str, list[float]] = {"quiet": [], "thread": [], "process": []}
    for _ in range(rounds):
        cases["quiet"] += asyncio.run(loop_lateness(3.0, None))
        cases["thread"] += asyncio.run(loop_lateness(0, lambda: walk(request)))
        cases["process"] += asyncio.run(loop_lateness(0, lambda: scanner.scan(mount)))
    scanner.close()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    print("  (the loop on CPU 0; the walk, in a thread or in the worker, on CPU 1)")
    print(f"  quiet loop:                    {lateness_text(cases['quiet'])}")
    print(f"  walk in a thread (same GIL):   {lateness_text(cases['thread'])}")
    print(f"  walk in the worker process:    {lateness_text(cases['process'])}")


# --- 3. reaction during a scan ----------------------------------------------------------------


def scan_started(rig: GuardRig, last: float) -> bool:
    """The tree's scan is running, or one finished after `last` (a quick one)."""
    metrics = rig.metrics()
    return bool(
        metrics.get('spaceguard_usage_scan_running{volume="tree"}') == 1
        or metrics.get('spaceguard_usage_scan_timestamp_seconds{volume="tree"}', 0.0) > last
    )


def reaction_during_scans(python: str, tree: LoopVolume, trials: int, work: Path) -> None:
    volume = LoopVolume(work / "vol", 1024, options=["nodelalloc"]).mount()
    sandbox = SystemdSandbox(work / "sandbox")
    results: dict[str, list[float]] = {}
    overlapped: dict[str, int] = {}
    enospc = 0
    try:
        (volume.mountpoint / "data").mkdir()
        status = work / "writer.status"
        sandbox.up(
            {"writer@bench.service": writer_unit(python, volume.mountpoint / "data", "2G", status)}
        )
        rig = GuardRig(sandbox, work, python, watchdog_sec=10, log_level="info")
        rig.write_config(f"""
            [volumes.bench]
            path = "{volume.mountpoint}"
            pause_below = "{HEADROOM}"
            resume_above = "{HEADROOM * 4}"
            resume_after = "200ms"
            predict = "0s"
            usage_interval = "0"
            [volumes.tree]
            path = "{tree.mountpoint}"
            usage_interval = "0"
            usage_budget = "10m"
            usage_max_entries = 50000000
            [[migrations]]
            account = "bench"
            unit = "writer@bench.service"
            volume = "bench"
            """)
        rig.install()
        rig.start()
        env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
        running = 'spaceguard_usage_scan_running{volume="tree"}'
        finished = 'spaceguard_usage_scan_timestamp_seconds{volume="tree"}'

        ctl = [python, "-m", "spaceguard.ctl", "--socket", str(rig.host_socket)]
        clients: list[subprocess.Popen[bytes]] = []

        def rescan() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [*ctl, "usage", "tree", "--rescan"],
                stdout=subprocess.DEVNULL,
                env=env,
            )

        for mode in ("quiet guard", "during a warm scan", "during a cold scan"):
            reactions = results.setdefault(mode, [])
            overlapped[mode] = 0
            for _ in range(trials):
                client = None
                if mode != "quiet guard":
                    last = rig.metrics().get(finished, 0.0)
                    time.sleep(max(0.0, last + 5.5 - time.time()))  # past the freshness window
                    if "cold" in mode:
                        drop_caches()
                    client = rescan()
                    wait_until(
                        functools.partial(scan_started, rig, last),
                        30,
                        "the scan to start",
                        on_timeout=lambda: rig.journal()[-3000:],
                    )
                status.unlink(missing_ok=True)
                sandbox.systemctl("start", "writer@bench.service")
                events = sandbox.unit_cgroup("writer@bench.service") / "cgroup.events"
                watcher = Watcher(volume.mountpoint, events)
                watcher.start()
                watcher.join(60)
                watcher.stop_flag.set()
                if client is not None and rig.metrics().get(running) == 1:
                    overlapped[mode] += 1  # still scanning once the writer was frozen
                if watcher.frozen is not None and watcher.crossed is not None:
                    reactions.append((watcher.frozen - watcher.crossed) * 1000)
                enospc += "ENOSPC" in [word for word, _ in read_status(status)]
                sandbox.systemctl("stop", "writer@bench.service")
                for path in (volume.mountpoint / "data").iterdir():
                    path.unlink()
                wait_until(
                    lambda: rig.metrics().get('spaceguard_volume_low{volume="bench"}') == 0,
                    30,
                    "the guard to see the space back",
                )
                if client is not None:
                    clients.append(client)  # it returns when that scan ends; the next trial
                    # may start while it still runs (it is then joined by the next request)
            for client in clients:
                client.wait(900)
            clients.clear()
        journal = rig.journal()
        rig.stop()
    finally:
        sandbox.down()
        volume.umount()
    quiet = statistics.median(results["quiet guard"]) if results["quiet guard"] else None
    for mode, reactions in results.items():
        if not reactions:
            print(f"  {mode}: no trial measured")
            continue
        ratio = f", {statistics.median(reactions) / quiet:.2f}x the quiet guard" if quiet else ""
        print(
            f"  {mode:20} crossing -> frozen: median {statistics.median(reactions):.1f} ms, "
            f"worst {max(reactions):.1f} ms ({len(reactions)} trials"
            + (f", {overlapped[mode]} still scanning when frozen" if mode != "quiet guard" else "")
            + f"){ratio}"
        )
    print(f"  trials with ENOSPC: {enospc}")
    scans = [line for line in journal.splitlines() if line.startswith("usage tree: scanned")]
    if scans:
        print(f"  the guard's last scan of the tree: {scans[-1][:160]}")
    started = [line for line in journal.splitlines() if "usage scanner started" in line]
    if started:
        print(f"  {started[0]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parts", default="1,2,3", help="which parts to run (default 1,2,3: all of them)"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    gdu = shutil.which("gdu")
    print(f"gdu: {gdu or 'not installed (apt-get install gdu)'}; du: {shutil.which('du')}")
    with tempfile.TemporaryDirectory(prefix="spaceguard-bench-usage-") as tmp:
        work = Path(tmp)
        size_mib = max(1024, args.files * 6 // 1024 + 1024)
        tree = LoopVolume(work / "tree", size_mib, inodes=args.files + 100_000).mount()
        try:
            seconds = make_tree(tree.mountpoint, args.files)
            print(f"tree: {args.files:,} files on a {size_mib} MiB ext4 volume ({seconds:.0f} s)")
            print(f"load average before: {os.getloadavg()[0]:.1f}")
            if "1" in parts:
                print("1. scan time")
                scan_times(tree.mountpoint, args.repeats)
            if "2" in parts:
                print("2. the guard's loop while a walk runs (1 ms timers)")
                thread_or_process(tree.mountpoint, args.repeats)
            if "3" in parts:
                print(f"3. reaction of the guard ({args.trials} trials each)")
                (work / "rig").mkdir()
                reaction_during_scans(sys.executable, tree, args.trials, work / "rig")
            print(f"load average after: {os.getloadavg()[0]:.1f}")
        finally:
            tree.umount()
    return 0


if __name__ == "__main__":
    sys.exit(main())
