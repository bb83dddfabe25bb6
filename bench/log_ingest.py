#!/usr/bin/env python3
"""Log ingestion throughput: how fast the guard reads a large rclone ``-vv`` log.

    python3 bench/log_ingest.py [--lines 2000000] [--json] [--keep]

Builds the log from real rclone output: runs ``rclone copy -vv --stats 1s`` on a
generated tree (twice, so the second run adds the "unchanged" lines) and a failing copy
for real ERROR lines, then repeats those lines with varied names and timestamps, a real
stats block every 1000 lines and a few ERROR lines, up to --lines.

Figures, on one core (the process is pinned to one CPU), best of 3:

* parser: RcloneLogParser.feed over the batches logwatch delivers (one per 1 MiB read);
* watcher + parser: LogWatcher following the file from offset 0 on an asyncio loop,
  feeding the parser from its callback (reading, splitting, decoding included);
* ``grep -c ERROR`` on the same file, and the ratio.

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from spaceguard.logwatch import READ_CHUNK_BYTES, LogWatcher
from spaceguard.rclone import RcloneLogParser

_DATE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")


def rclone(*args: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(
        ["rclone", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False
    )
    return proc.stdout.decode("utf-8", "replace").splitlines()


def real_rclone_samples(
    work: Path, json_log: bool
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(start-up lines, body lines, one stats block, error lines) from real rclone runs."""
    source = work / "source"
    rng = random.Random(1)
    for index in range(300):
        folder = source / f"dir{index % 7}" / f"sub{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{index}.dat").write_bytes(rng.randbytes(rng.randrange(0, 20_000)))
    env = {**os.environ, "RCLONE_CONFIG": str(work / "rclone.conf")}
    fmt = ["--use-json-log"] if json_log else []
    body: list[str] = []
    for _ in range(2):  # the second run logs "unchanged" checks instead of copies
        body += rclone("copy", str(source), str(work / "dest"), "-vv", "--stats", "1s", *fmt,
                       env=env)  # fmt: skip
    slow = rclone("copy", str(source), str(work / "dest2"), "-v", "--stats", "200ms",
                  "--bwlimit", "2M", *fmt, env=env)  # fmt: skip
    blocker = work / "blocker"
    blocker.write_text("x")
    failing = rclone("copy", str(source), str(blocker / "sub"), "-v", "--retries", "1", *fmt,
                     env=env)  # fmt: skip
    errors = [line for line in failing if " ERROR " in line or '"level":"error"' in line]
    if json_log:
        stats = [line for line in slow if '"stats":{' in line][:1]
        body = [line for line in body if line.startswith("{") and '"stats":{' not in line]
    else:
        start = next(i for i, line in enumerate(slow) if line.startswith("Transferred:"))
        end = next(i for i in range(start, len(slow)) if slow[i] == "")
        stats = slow[start - 1 : end + 1]
        body = [line for line in body if _DATE.match(line)]  # drop the final stats lines
    # One long migration logs its start-up lines (version, config notice) once, not once
    # per repetition of the sample.
    startup = [line for line in body if "NOTICE" in line or '"warning"' in line]
    body = [line for line in body if line not in startup]
    if not body or not stats or not errors:
        raise SystemExit("rclone did not produce the expected sample output")
    return startup[:1], body, stats, errors


def build_log(
    path: Path,
    total: int,
    samples: tuple[list[str], list[str], list[str], list[str]],
    stats_every: int,
) -> int:
    """Write ``total`` lines; return how many ERROR lines went in."""
    startup, body, stats, errors = samples
    rng = random.Random(2)
    error_at = set(rng.sample(range(total), 20))
    clock = time.mktime((2025, 11, 23, 8, 0, 0, 0, 0, -1))
    written = inserted_errors = 0
    repetition = 0
    with open(path, "w", encoding="utf-8") as out:
        for line in startup:
            out.write(line + "\n")
            written += 1
        while written < total:
            repetition += 1
            stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(clock + repetition))
            chunk: list[str] = []
            for line in body:
                line = line.replace("/file", f"/r{repetition}-file")
                chunk.append(_DATE.sub(stamp + " ", line, count=1))
            for line in chunk:
                if written >= total:
                    break
                if written in error_at:
                    out.write(_DATE.sub(stamp + " ", rng.choice(errors), count=1) + "\n")
                    inserted_errors += 1
                elif written % stats_every == 0:
                    out.write("\n".join(stats[: total - written]) + "\n")
                    written += min(len(stats), total - written) - 1
                else:
                    out.write(line + "\n")
                written += 1
    return inserted_errors


def logwatch_batches(path: Path) -> list[list[str]]:
    """The batches LogWatcher would deliver: one per 1 MiB read, cut at the last newline."""
    batches: list[list[str]] = []
    carry = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK_BYTES):
            data = carry + chunk
            cut = data.rfind(b"\n")
            carry = data[cut + 1 :]
            batches.append(data[:cut].decode("utf-8", "replace").split("\n"))
    return batches


def best_of(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def time_parser(batches: list[list[str]]) -> tuple[float, int, int]:
    parser = RcloneLogParser()
    failures = unclassified = 0
    started = time.perf_counter()
    for batch in batches:
        result = parser.feed(batch)
        failures += len(result.failures)
        unclassified += result.unclassified_errors
    return time.perf_counter() - started, failures, unclassified


def time_watcher(path: Path, total_lines: int) -> float:
    async def follow() -> float:
        parser = RcloneLogParser()
        seen = 0
        done = asyncio.get_running_loop().create_future()

        def on_lines(key: str, lines: list[str]) -> None:
            nonlocal seen
            parser.feed(lines)
            seen += len(lines)
            if seen >= total_lines and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        watcher = LogWatcher()
        watcher.add("bench", path, None, on_lines)
        await done
        elapsed = time.perf_counter() - started
        watcher.close()
        return elapsed

    return asyncio.run(follow())


def time_grep(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(["grep", "-c", "ERROR", str(path)], capture_output=True, check=False)
    return time.perf_counter() - started, proc.stdout.decode().strip()


def run_one(work: Path, lines: int, json_log: bool, stats_every: int) -> None:
    kind = "--use-json-log" if json_log else "-vv text"
    samples = real_rclone_samples(work / ("json" if json_log else "text"), json_log)
    log_path = work / ("big-json.log" if json_log else "big-vv.log")
    started = time.perf_counter()
    inserted = build_log(log_path, lines, samples, stats_every)
    size = log_path.stat().st_size
    print(f"\n== {kind} log: {lines:,} lines, {size / 2**20:.0f} MiB, {inserted} ERROR lines, "
          f"a stats block every {stats_every} lines (built from {len(samples[1])} real "
          f"rclone lines in {time.perf_counter() - started:.1f} s)")  # fmt: skip

    batches = logwatch_batches(log_path)
    assert sum(map(len, batches)) == lines
    parse_times = []
    found = (0, 0)
    for _ in range(3):
        elapsed, failures, unclassified = time_parser(batches)
        parse_times.append(elapsed)
        found = (failures, unclassified)
    parse_rate = lines / min(parse_times)
    print(f"parser            {parse_rate / 1e6:8.2f} M lines/s  ({len(batches)} batches, "
          f"{found[0]} failures + {found[1]} unclassified errors found)")  # fmt: skip

    watch_rate = lines / best_of(3, lambda: time_watcher(log_path, lines))
    print(f"watcher + parser  {watch_rate / 1e6:8.2f} M lines/s  (inotify, read, decode, parse)")

    grep_runs = [time_grep(log_path) for _ in range(3)]
    grep_rate = lines / min(elapsed for elapsed, _ in grep_runs)
    print(f"grep -c ERROR     {grep_rate / 1e6:8.2f} M lines/s  (count {grep_runs[0][1]})")
    print(f"ratio grep/parser {grep_rate / parse_rate:8.1f} x   "
          f"grep/(watcher+parser) {grep_rate / watch_rate:.1f} x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--stats-every", type=int, default=1000, help="lines between stats")
    parser.add_argument("--json", action="store_true", help="also a --use-json-log log")
    parser.add_argument("--keep", action="store_true", help="keep the generated logs")
    args = parser.parse_args()
    if shutil.which("rclone") is None:
        raise SystemExit("rclone is needed to produce the sample output")
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # one core, as the guard gets
    version = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=False)
    print(f"pinned to CPU {cpu}; python {sys.version.split()[0]}; {version.stdout.splitlines()[0]}")
    work = Path(tempfile.mkdtemp(prefix="log-ingest-"))
    try:
        run_one(work, args.lines, json_log=False, stats_every=args.stats_every)
        if args.json:
            run_one(work, args.lines, json_log=True, stats_every=args.stats_every)
    finally:
        if args.keep:
            print(f"\nlogs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
