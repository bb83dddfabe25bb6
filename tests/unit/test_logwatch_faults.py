"""LogWatcher faults (issue 12), on real files with real inotify:

* the log path becomes a directory, a FIFO, a dangling symlink;
* the log's file system goes away under it (a loop volume lazily unmounted);
* inotify's event queue overflows for real (fs.inotify.max_queued_events lowered for the
  watcher's instance, restored at once and in a finalizer);
* inotify watches run out for real (the per-user-namespace sysctl
  user.max_inotify_watches in a child user namespace: lowering root's global limit would
  break every other root process on the host that adds a watch meanwhile).

Nothing is lost: every line is delivered once, in order; the watcher says what it could
not do, and polls by stat where inotify cannot help.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spaceguard.logwatch import LogWatcher

from tests.sandbox import LoopVolume, missing_for_volumes, require
from tests.unit.test_logwatch import Collector, append, open_paths, processed, run, wait_until

REPO = Path(__file__).resolve().parents[2]


# -- the path changes kind -----------------------------------------------------------------


def test_log_path_becomes_a_directory_then_a_file_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "m.log"
    path.write_text("")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await wait_until(lambda: "k" in watcher.positions())
        append(path, "one\n")
        await wait_until(lambda: got.of() == ["one"])
        with caplog.at_level(logging.WARNING, logger="spaceguard.logwatch"):
            os.rename(path, tmp_path / "m.log.1")
            path.mkdir()
            append(tmp_path / "m.log.1", "two\n")  # the rotated file still drains
            await wait_until(lambda: got.of() == ["one", "two"])
            watcher.recheck()
            await wait_until(lambda: "is not a regular file" in caplog.text)
        assert caplog.text.count("is not a regular file") == 1
        watcher.recheck()  # said once per distinct problem, not at every look
        assert caplog.text.count("is not a regular file") == 1
        path.rmdir()
        path.write_text("three\n")
        await wait_until(lambda: got.of() == ["one", "two", "three"])
        append(path, "four\n")
        await wait_until(lambda: got.of()[-1] == "four")
        assert got.of() == ["one", "two", "three", "four"]
        watcher.close()

    run(scenario)


def test_log_path_becomes_a_fifo(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.log"
    path.write_text("one\n")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await wait_until(lambda: got.of() == ["one"])
        with caplog.at_level(logging.WARNING, logger="spaceguard.logwatch"):
            path.unlink()
            os.mkfifo(path)
            watcher.recheck()  # opens it without blocking the loop, and lets it go
            await wait_until(lambda: "is not a regular file" in caplog.text)
        assert not [p for p in open_paths() if p == str(path)], "the FIFO must not stay open"
        # a writer opening the FIFO is not held up by us (no reader: ENXIO at once)
        with pytest.raises(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        path.unlink()
        path.write_text("two\n")
        await wait_until(lambda: got.of() == ["one", "two"])
        watcher.close()

    run(scenario)


def test_log_path_is_a_dangling_symlink_until_its_target_appears(tmp_path: Path) -> None:
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    target = target_dir / "real.log"
    path = tmp_path / "m.log"
    path.symlink_to(target)

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await processed(watcher, tmp_path)
        watcher.recheck()
        assert got.of() == [] and "k" not in watcher.positions()  # waits, no error
        target.write_text("one\n")
        # the target's directory is not watched (only the link's): the backup check finds it
        watcher.recheck()
        await wait_until(lambda: got.of() == ["one"])
        append(target, "two\n")  # followed through the open file's own watch
        await wait_until(lambda: got.of() == ["one", "two"])
        # the link is pointed at another file: that is a rotation
        other = target_dir / "other.log"
        other.write_text("three\n")
        path.unlink()
        path.symlink_to(other)
        await wait_until(lambda: got.of() == ["one", "two", "three"])
        watcher.close()

    run(scenario)


# -- the file system goes away ---------------------------------------------------------------


@pytest.fixture
def log_volume(tmp_path: Path) -> Iterator[LoopVolume]:
    missing = missing_for_volumes()
    require(not missing, "cannot make loop volumes: " + "; ".join(missing))
    volume = LoopVolume(tmp_path / "logs", 16)
    try:
        volume.mount()
    except Exception as error:
        require(False, f"loop volume did not mount: {error}")
    yield volume
    with contextlib.suppress(Exception):
        volume.umount()


def test_the_logs_file_system_is_unmounted_while_followed(
    log_volume: LoopVolume, tmp_path: Path
) -> None:
    directory = log_volume.mountpoint / "rclone"
    directory.mkdir()
    path = directory / "m.log"
    writer = path.open("a", buffering=1)  # rclone's open log file
    writer.write("one\n")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await wait_until(lambda: got.of() == ["one"])
        subprocess.run(["umount", "-l", str(log_volume.mountpoint)], check=True)
        assert not os.path.ismount(log_volume.mountpoint)
        # The writer still writes to the detached file system: its lines still arrive.
        writer.write("two\n")
        await wait_until(lambda: got.of() == ["one", "two"])
        # The name is gone (an empty mount point): nothing to read, nothing breaks.
        watcher.recheck()
        assert got.of() == ["one", "two"]
        # The log comes back at its path (here: on the file system under the mount point):
        # found, and read from its start, after the old file's last line.
        directory.mkdir()
        path.write_text("three\n")
        watcher.recheck()
        await wait_until(lambda: got.of() == ["one", "two", "three"])
        # The old writer closes its file: the watcher lets the detached file system go.
        writer.write("four\n")
        writer.close()
        watcher.recheck()
        await wait_until(lambda: got.of() == ["one", "two", "three", "four"])
        watcher.recheck()
        watcher.recheck()
        held = [p for p in open_paths() if p.startswith(str(log_volume.mountpoint))]
        assert held == [str(path)], held  # only the new file, not the detached one
        append(path, "five\n")
        await wait_until(lambda: got.of()[-1] == "five")
        assert got.of() == ["one", "two", "three", "four", "five"]
        watcher.close()

    try:
        run(scenario)
    finally:
        if not writer.closed:
            writer.close()
    log_volume.mounted = False  # lazily unmounted above: only the image is left to delete


# -- inotify's limits, for real ------------------------------------------------------------

QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def small_inotify_queue() -> Iterator[Callable[[], LogWatcher]]:
    """Makes a LogWatcher whose inotify instance has a queue of 8 events: the sysctl is
    read when an instance is made, so it is lowered for that moment only and restored at
    once (other processes on the host make instances too), and again at teardown."""
    require(os.access(QUEUE_SYSCTL, os.W_OK), f"{QUEUE_SYSCTL} is not writable (root?)")
    saved = QUEUE_SYSCTL.read_text()

    def make() -> LogWatcher:
        QUEUE_SYSCTL.write_text("8\n")
        try:
            return LogWatcher()
        finally:
            QUEUE_SYSCTL.write_text(saved)

    yield make
    if QUEUE_SYSCTL.read_text() != saved:
        QUEUE_SYSCTL.write_text(saved)


WRITER = """
import sys
handles = [open(path, "a", buffering=1) for path in sys.argv[1:]]
for n in range(100):
    for index, handle in enumerate(handles):
        handle.write(f"{index}:{n}\\n")
"""


def test_a_real_queue_overflow_loses_no_line(
    tmp_path: Path,
    small_inotify_queue: Callable[[], LogWatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths = [tmp_path / f"m{i}.log" for i in range(4)]
    for path in paths:
        path.write_text("")

    async def scenario() -> None:
        got = Collector()
        watcher = small_inotify_queue()
        for index, path in enumerate(paths):
            watcher.add(f"k{index}", path, None, got)
        await wait_until(lambda: len(watcher.positions()) == len(paths))
        with caplog.at_level(logging.WARNING, logger="spaceguard.logwatch"):
            # A writer process appends 400 lines, alternating between the files (so inotify
            # cannot merge the events), while the loop is held up waiting for it here: far
            # more events than the queue of 8 holds pile up unread.
            subprocess.run([sys.executable, "-c", WRITER, *map(str, paths)], check=True)
            await wait_until(lambda: watcher.overflows >= 1)
            expected = {f"k{i}": [f"{i}:{n}" for n in range(100)] for i in range(len(paths))}
            await wait_until(lambda: got.lines == expected)
        assert "inotify event queue overflowed" in caplog.text
        # inotify still works after the overflow: a new line comes by its event
        append(paths[0], "after\n")
        await wait_until(lambda: got.of("k0")[-1] == "after")
        assert got.of("k0") == [*expected["k0"], "after"]
        watcher.close()

    run(scenario)


CHILD = """
import asyncio, json, logging, os, sys, time
from pathlib import Path
from spaceguard.logwatch import LogWatcher

LIMIT = Path("/proc/sys/user/max_inotify_watches")
root = Path(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
got = {}

async def until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {got} {watcher.polled()}")
        await asyncio.sleep(0.005)

async def main():
    global watcher
    LIMIT.write_text("4\\n")  # this user namespace's own limit
    watcher = LogWatcher()
    paths = []
    for i in range(3):
        (root / f"d{i}").mkdir()
        path = root / f"d{i}" / "m.log"
        path.write_text(f"{i}:first\\n")
        paths.append(path)
        watcher.add(f"k{i}", path, None, lambda key, lines: got.setdefault(key, []).extend(lines))
    await until(lambda: all(len(got.get(f"k{i}", [])) == 1 for i in range(3)))
    polled = watcher.polled()
    for i, path in enumerate(paths):
        with path.open("a") as handle:
            handle.write(f"{i}:second\\n")
    await until(lambda: all(len(got.get(f"k{i}", [])) == 2 for i in range(3)))
    LIMIT.write_text("100\\n")  # watches to be had again: polling ends by itself
    await until(lambda: not watcher.polled())
    for i, path in enumerate(paths):
        with path.open("a") as handle:
            handle.write(f"{i}:third\\n")
    await until(lambda: all(len(got.get(f"k{i}", [])) == 3 for i in range(3)))
    watcher.close()
    print(json.dumps({"polled_while_short": polled, "lines": got}))

asyncio.run(main())
"""


def test_inotify_watches_used_up_fall_back_to_polling(tmp_path: Path) -> None:
    """Three logs in three directories need six watches; the user namespace allows four:
    the three directories and the first log's file. The other two logs are followed by
    stat, and say why; once the limit is raised, they are watched again. Every line
    arrives."""
    require(os.geteuid() == 0, "needs root (a user namespace mapping uid 0)")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    (tmp_path / "logs").mkdir()
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'daemon'}")
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            sys.executable,
            str(script),
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    require(
        "unshare failed" not in result.stderr, f"no user namespace here: {result.stderr.strip()}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    polled = report["polled_while_short"]
    assert sorted(polled) == ["k1", "k2"], polled
    assert all("No space left on device (ENOSPC)" in why for why in polled.values()), polled
    assert report["lines"] == {
        f"k{i}": [f"{i}:first", f"{i}:second", f"{i}:third"] for i in range(3)
    }
    assert "following" in result.stderr and "by stat every 0.25 s" in result.stderr
    assert "inotify watches" in result.stderr and "again" in result.stderr
