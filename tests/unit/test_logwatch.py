"""LogWatcher on real files in tmp_path, on a real asyncio loop with real inotify."""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import shutil
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from spaceguard.logwatch import LogPosition, LogWatcher

# <sys/inotify.h> (pyinotify.IN_Q_OVERFLOW; importing pyinotify here first would bypass
# the watcher's silencing of its asyncore DeprecationWarning)
IN_Q_OVERFLOW = 0x4000


class Collector:
    """An on_lines callback that remembers every line per key."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}
        self.calls = 0
        self.lock = threading.Lock()  # only to assert the callback runs on one thread
        self.threads: set[int] = set()

    def __call__(self, key: str, lines: list[str]) -> None:
        self.calls += 1
        self.threads.add(threading.get_ident())
        self.lines.setdefault(key, []).extend(lines)

    def of(self, key: str = "k") -> list[str]:
        return self.lines.get(key, [])


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls the *test's* condition; the watcher itself never polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


SENTINEL = "sentinel"
_sentinels: weakref.WeakKeyDictionary[LogWatcher, Collector] = weakref.WeakKeyDictionary()


async def processed(watcher: LogWatcher, directory: Path) -> None:
    """A positive sign that ``watcher`` has handled every inotify event queued so far: a
    line appended to a sentinel log it also follows (key ``sentinel``) is delivered. One
    inotify queue per watcher, read in order: what was queued before the sentinel's event
    was handled first. (Instead of sleeping, then checking that nothing more arrived.)"""
    path = directory / "sentinel.log"
    got = _sentinels.get(watcher)
    if got is None:
        got = _sentinels[watcher] = Collector()
        path.write_text("")
        watcher.add(SENTINEL, path, None, got)
        await wait_until(lambda: SENTINEL in watcher.positions())  # opened: inotify from now
    count = len(got.of(SENTINEL)) + 1
    append(path, f"{count}\n")
    await wait_until(lambda: len(got.of(SENTINEL)) == count)


def append(path: Path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "ab") as handle:
        handle.write(data)


def swallow_inotify_events(watcher: LogWatcher) -> int:
    """Read and drop whatever inotify queued, as if the events had been lost."""
    fd = watcher._fd
    assert fd is not None
    dropped = 0
    while select.select([fd], [], [], 0)[0]:
        dropped += len(os.read(fd, 65536))
    return dropped


def open_paths() -> list[str]:
    """What this process's file descriptors point at (one entry per descriptor)."""
    paths = []
    for name in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            continue
    return paths


# -- positions -----------------------------------------------------------------------------


def test_position_json_round_trip_and_validation() -> None:
    for position in (LogPosition(2049, 1234, 56), LogPosition(2049, 1234, 56, head_crc32=7)):
        assert LogPosition.from_json(json.loads(json.dumps(position.to_json()))) == position
    bad_values: list[object] = [
        None,
        [],
        {"dev": 1, "inode": 2},
        {"dev": 1, "inode": 2, "offset": -1},
        {"dev": 1, "inode": "2", "offset": 3},
        {"dev": True, "inode": 2, "offset": 3},
        {"dev": 1, "inode": 2, "offset": 3, "head_crc32": "x"},
    ]
    for bad in bad_values:
        with pytest.raises(ValueError):
            LogPosition.from_json(bad)


def test_end_of_points_after_the_last_complete_line(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    assert LogPosition.end_of(path) is None
    path.write_text("one\ntwo\nthr")
    position = LogPosition.end_of(path)
    assert position is not None
    assert position.offset == len("one\ntwo\n")
    assert position.inode == path.stat().st_ino
    path.write_text("no newline at all")
    end = LogPosition.end_of(path)
    assert end is not None and end.offset == 0


# -- following -----------------------------------------------------------------------------


def test_append_and_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("first\nsecond\n")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await wait_until(lambda: got.of() == ["first", "second"])
        append(path, "third\nfour")
        await wait_until(lambda: len(got.of()) == 3)
        await processed(watcher, tmp_path)
        assert got.of() == ["first", "second", "third"]
        position = watcher.positions()["k"]
        assert position.offset == len("first\nsecond\nthird\n")  # not past the partial line
        append(path, "th\n")
        await wait_until(lambda: got.of()[-1] == "fourth")
        assert watcher.positions()["k"].offset == path.stat().st_size
        assert got.threads == {threading.get_ident()}  # called on the loop thread
        watcher.close()

    run(scenario)


def test_missing_file_is_read_when_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "late.log"

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await processed(watcher, tmp_path)
        assert got.of() == []
        assert "k" not in watcher.positions()
        path.write_text("hello\n")  # inotify (the directory watch) must notice this
        await wait_until(lambda: got.of() == ["hello"])
        watcher.close()

    run(scenario)


def test_missing_directory_is_picked_up_by_recheck(tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / "m.log"

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await processed(watcher, tmp_path)
        path.parent.mkdir()
        path.write_text("a\n")
        watcher.recheck()  # watches the new directory and reads the file
        await wait_until(lambda: got.of() == ["a"])
        append(path, "b\n")  # and from now on inotify follows it
        await wait_until(lambda: got.of() == ["a", "b"])
        watcher.close()

    run(scenario)


def test_delete_and_late_create(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("old 1\nold 2\n")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await wait_until(lambda: len(got.of()) == 2)
        append(path, "old 3\nunterminated")
        path.unlink()
        await wait_until(lambda: len(got.of()) == 4)
        assert str(path) + " (deleted)" not in open_paths()  # not pinning its space
        await processed(watcher, tmp_path)
        path.write_text("new 1\n")
        await wait_until(lambda: len(got.of()) == 5)
        await processed(watcher, tmp_path)
        assert got.of() == ["old 1", "old 2", "old 3", "unterminated", "new 1"]
        assert watcher.positions()["k"].inode == path.stat().st_ino
        watcher.close()

    run(scenario)


def test_rename_rotation_during_writing_loses_and_repeats_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    rotations, per_file = 15, 1500

    def writer() -> int:
        count = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        rng = random.Random(7)
        for rotation in range(rotations):
            for _ in range(per_file):
                line = f"line {count} " + "x" * rng.randrange(0, 200)
                if rng.random() < 0.2:  # the reader sees partial lines now and then
                    os.write(fd, line[:10].encode())
                    os.write(fd, (line[10:] + "\n").encode())
                else:
                    os.write(fd, (line + "\n").encode())
                count += 1
                if count % 500 == 0:
                    time.sleep(0.001)
            os.rename(path, tmp_path / f"m.log.{rotation}")
            os.write(fd, f"line {count} written after the rename\n".encode())
            count += 1
            new_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            # logrotate's "create" then a signal: the writer still has the old file
            # open for a moment after the new one exists
            os.write(fd, f"line {count} written late to the old file\n".encode())
            count += 1
            os.close(fd)
            fd = new_fd
        os.write(fd, f"line {count} last\n".encode())
        os.close(fd)
        return count + 1

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        total = await asyncio.get_running_loop().run_in_executor(None, writer)
        await wait_until(lambda: len(got.of()) >= total)
        watcher.recheck()
        watcher.recheck()
        await processed(watcher, tmp_path)
        numbers = [int(line.split()[1]) for line in got.of()]
        assert len(numbers) == total  # none twice
        assert sorted(numbers) == list(range(total))  # none lost
        final = watcher.positions()["k"]
        assert (final.inode, final.offset) == (path.stat().st_ino, path.stat().st_size)
        # rotated files are closed once their writer closed them
        assert not any(p.startswith(str(tmp_path / "m.log.")) for p in open_paths())
        watcher.close()

    run(scenario)


def test_rotated_file_still_written_is_followed_until_quiet(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    rotated = tmp_path / "m.log.1"

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        watcher.add("k", path, None, got)
        os.write(writer, b"a\n")
        await wait_until(lambda: got.of() == ["a"])
        os.rename(path, rotated)
        path.write_text("new\n")
        await wait_until(lambda: got.of() == ["a", "new"])
        os.write(writer, b"late\n")  # a writer that has not reopened yet
        await wait_until(lambda: got.of() == ["a", "new", "late"])
        watcher.recheck()  # grew since the switch: keep it
        assert open_paths().count(str(rotated)) == 2  # the writer's and the watcher's
        watcher.recheck()  # quiet for a whole recheck interval: done with it
        assert open_paths().count(str(rotated)) == 1
        os.close(writer)
        watcher.close()

    run(scenario)


def test_copytruncate(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("".join(f"before {i}\n" for i in range(100)))

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await wait_until(lambda: len(got.of()) == 100)
        shutil.copy(path, tmp_path / "m.log.1")
        os.truncate(path, 0)
        append(path, "after 1\n")
        await wait_until(lambda: len(got.of()) == 101)
        # truncated and refilled past the old offset before the watcher looks again
        size_before = path.stat().st_size
        swallow_inotify_events(watcher)
        os.truncate(path, 0)
        append(path, "".join(f"refill {i}\n" for i in range(50)))
        assert path.stat().st_size > size_before
        await processed(watcher, tmp_path)
        watcher.recheck()
        await wait_until(lambda: len(got.of()) == 151)
        await processed(watcher, tmp_path)
        assert got.of()[100:] == ["after 1"] + [f"refill {i}" for i in range(50)]
        watcher.close()

    run(scenario)


def test_long_lines_are_capped_and_invalid_utf8_replaced(tmp_path: Path) -> None:
    path = tmp_path / "m.log"

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher(read_chunk_bytes=4096, max_line_bytes=1000)
        watcher.add("k", path, None, got)
        await processed(watcher, tmp_path)
        append(path, b"short\n" + b"L" * 50_000)  # a long line arriving in pieces
        await processed(watcher, tmp_path)
        append(path, b"L" * 50_000 + b"\nbad \xff\xfe bytes\n" + b"M" * 5000 + b"\nend\n")
        await wait_until(lambda: len(got.of()) == 5)
        lines = got.of()
        assert lines[0] == "short"
        assert lines[1] == "L" * 1000
        assert lines[2] == "bad \ufffd\ufffd bytes"
        assert lines[3] == "M" * 1000
        assert lines[4] == "end"
        assert watcher.positions()["k"].offset == path.stat().st_size
        watcher.close()

    run(scenario)


def test_random_writes_with_tiny_chunks_give_exact_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    rng = random.Random(3)
    text = "".join(
        "".join(rng.choice("abcé€ \t") for _ in range(rng.randrange(0, 40))) + "\n"
        for _ in range(2000)
    )
    data = text.encode()

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher(read_chunk_bytes=7)
        watcher.add("k", path, None, got)
        position = 0
        while position < len(data):
            step = rng.randrange(1, 300)
            append(path, data[position : position + step])
            position += step
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        await wait_until(lambda: len(got.of()) == 2000)
        assert got.of() == text.split("\n")[:-1]
        watcher.close()

    run(scenario)


# -- restart -------------------------------------------------------------------------------


def test_restart_from_saved_position(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("1\n2\n3")

    async def scenario() -> None:
        first = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, first)
        await wait_until(lambda: first.of() == ["1", "2"])
        saved = json.dumps({k: p.to_json() for k, p in watcher.positions().items()})
        watcher.close()

        append(path, "\n4\n")
        second = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, LogPosition.from_json(json.loads(saved)["k"]), second)
        await wait_until(lambda: second.of() == ["3", "4"])
        await processed(watcher, tmp_path)
        assert second.of() == ["3", "4"]
        watcher.close()

    run(scenario)


def test_restart_after_rotation_reads_the_rest_of_the_rotated_file_first(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("a\nb\n")

    async def scenario() -> None:
        first = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, first)
        await wait_until(lambda: first.of() == ["a", "b"])
        saved = watcher.positions()["k"]
        watcher.close()

        append(path, "c\nd\n")  # written while the guard was down...
        os.rename(path, tmp_path / "m.log.1")  # ...then rotated
        path.write_text("e\n")
        second = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, saved, second)
        await wait_until(lambda: len(second.of()) == 3)
        await processed(watcher, tmp_path)
        assert second.of() == ["c", "d", "e"]
        assert watcher.positions()["k"].inode == path.stat().st_ino
        watcher.close()

    run(scenario)


def test_restart_after_rotation_without_new_file_yet(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("a\n")

    async def scenario() -> None:
        first = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, first)
        await wait_until(lambda: first.of() == ["a"])
        saved = watcher.positions()["k"]
        watcher.close()

        append(path, "b\n")
        os.rename(path, tmp_path / "m.log.1")
        second = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, saved, second)
        await wait_until(lambda: second.of() == ["b"])
        path.write_text("c\n")
        await wait_until(lambda: second.of() == ["b", "c"])
        watcher.close()

    run(scenario)


def test_restart_when_the_saved_file_is_gone_or_truncated(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("a\nb\n")

    async def scenario() -> None:
        first = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, first)
        await wait_until(lambda: first.of() == ["a", "b"])
        saved = watcher.positions()["k"]
        watcher.close()

        # copytruncate while down: same inode, shorter than the saved offset
        os.truncate(path, 0)
        append(path, "c\n")
        second = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, saved, second)
        await wait_until(lambda: second.of() == ["c"])
        watcher.close()

        # rotated away and deleted while down: the new file is read from its start
        os.rename(path, tmp_path / "gone")
        keep_inode_busy = tmp_path / "gone"  # still exists; then really remove it
        keep_inode_busy.unlink()
        path.write_text("d\ne\n")
        third = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, saved, third)
        await wait_until(lambda: third.of() == ["d", "e"])
        watcher.close()

    run(scenario)


# -- missed events -------------------------------------------------------------------------


def test_missed_event_is_caught_by_recheck(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await processed(watcher, tmp_path)
        append(path, "one\ntwo\n")
        assert swallow_inotify_events(watcher) > 0
        await processed(watcher, tmp_path)
        assert got.of() == []  # blind...
        watcher.recheck()
        assert got.of() == ["one", "two"]  # ...until the backup check
        watcher.close()

    run(scenario)


def test_read_now_delivers_what_was_written_before_it_returns(tmp_path: Path) -> None:
    """The daemon reads a unit's log when the unit ends, before deciding on the end: the
    lines written before the call are delivered by it, not on a later loop turn."""
    path = tmp_path / "m.log"
    path.write_text("")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        await processed(watcher, tmp_path)
        append(path, "last line\nsummary\n")
        # no await since the append: the loop cannot have handled its inotify event
        watcher.read_now("k")
        assert got.of() == ["last line", "summary"]
        watcher.read_now("not followed")  # nothing to read: no error
        await processed(watcher, tmp_path)
        assert got.of() == ["last line", "summary"]  # the event that came later adds nothing
        watcher.close()

    run(scenario)


def test_queue_overflow_rechecks_every_file(tmp_path: Path) -> None:
    paths = [tmp_path / f"m{i}.log" for i in range(3)]
    for path in paths:
        path.write_text("")

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        for index, path in enumerate(paths):
            watcher.add(f"k{index}", path, None, got)
        await processed(watcher, tmp_path)
        for index, path in enumerate(paths):
            append(path, f"line of {index}\n")
        os.rename(paths[2], tmp_path / "m2.log.1")
        paths[2].write_text("new m2\n")
        swallow_inotify_events(watcher)
        await processed(watcher, tmp_path)
        assert got.lines == {}
        watcher.on_queue_overflow()
        assert got.lines == {
            "k0": ["line of 0"],
            "k1": ["line of 1"],
            "k2": ["line of 2", "new m2"],
        }
        # the same through the event handler, as pyinotify hands IN_Q_OVERFLOW over
        append(paths[0], "more\n")
        swallow_inotify_events(watcher)
        watcher._on_event(SimpleNamespace(mask=IN_Q_OVERFLOW, wd=-1, name=""))
        assert got.of("k0") == ["line of 0", "more"]
        watcher.close()

    run(scenario)


# -- lifecycle and cost --------------------------------------------------------------------


def test_large_backlog_is_read_in_slices_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("".join(f"backlog line {i}\n" for i in range(200_000)))

    async def scenario() -> None:
        got = Collector()
        turns = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal turns
            while not done.is_set():
                turns += 1
                await asyncio.sleep(0)

        watcher = LogWatcher(read_chunk_bytes=64 << 10, max_bytes_per_turn=256 << 10)
        task = asyncio.create_task(ticker())
        watcher.add("k", path, None, got)
        await wait_until(lambda: len(got.of()) == 200_000)
        done.set()
        await task
        assert got.of()[-1] == "backlog line 199999"
        assert turns >= path.stat().st_size // (256 << 10)  # the loop kept turning
        watcher.close()

    run(scenario)


def test_callback_errors_do_not_stop_the_watcher(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("")

    async def scenario() -> None:
        got: list[str] = []

        def flaky(key: str, lines: list[str]) -> None:
            got.extend(lines)
            if "boom" in lines:
                raise RuntimeError("consumer bug")

        watcher = LogWatcher()
        watcher.add("k", path, None, flaky)
        append(path, "boom\n")
        await wait_until(lambda: got == ["boom"])
        append(path, "after\n")
        await wait_until(lambda: got == ["boom", "after"])
        watcher.close()

    run(scenario)


def test_callback_may_remove_its_own_log(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("")

    async def scenario() -> None:
        watcher = LogWatcher(read_chunk_bytes=16)
        got: list[str] = []

        def stop_after_first(key: str, lines: list[str]) -> None:
            got.extend(lines)
            watcher.remove(key)

        watcher.add("k", path, None, stop_after_first)
        append(path, "".join(f"line {i}\n" for i in range(100)))
        await wait_until(lambda: bool(got))
        watcher.recheck()
        append(path, "later\n")
        await processed(watcher, tmp_path)
        assert got == ["line 0", "line 1"]  # the first 16-byte chunk, then nothing
        assert "k" not in watcher.positions()
        watcher.close()

    run(scenario)


def test_remove_close_and_no_leaks(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("a\n")
    fds_before = len(os.listdir("/proc/self/fd"))

    async def scenario() -> None:
        got = Collector()
        watcher = LogWatcher()
        watcher.add("k", path, None, got)
        watcher.add("other", path, None, got)
        with pytest.raises(ValueError, match="already followed"):
            watcher.add("k", path, None, got)
        await wait_until(lambda: got.of() == ["a"] and got.of("other") == ["a"])
        watcher.remove("k")
        append(path, "b\n")
        await wait_until(lambda: got.of("other") == ["a", "b"])
        assert got.of() == ["a"]
        assert set(watcher.positions()) == {"other"}
        watcher.close()
        watcher.close()  # idempotent
        with pytest.raises(RuntimeError):
            watcher.add("again", path, None, got)

    run(scenario)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_no_timer_while_logs_are_quiet(tmp_path: Path) -> None:
    """Quiet logs cost nothing: no timer, only inotify. (The guard's CPU while its logs are
    quiet is measured by bench/failure_latency.py.)"""
    paths = [tmp_path / f"m{i}.log" for i in range(20)]
    for path in paths:
        path.write_text("x\n")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        timers_before = len(loop._scheduled)  # type: ignore[attr-defined]
        got = Collector()
        watcher = LogWatcher()
        for index, path in enumerate(paths):
            watcher.add(f"k{index}", path, None, got)
        await wait_until(lambda: all(got.of(f"k{index}") == ["x"] for index in range(20)))
        assert len(loop._scheduled) == timers_before  # type: ignore[attr-defined]
        watcher.close()

    run(scenario)


def test_a_position_after_copytruncate_matches_the_new_head(tmp_path: Path) -> None:
    """A saved position's head checksum is of the file's content after a copytruncate, so a
    watcher started from it reads on, not from the start (it used to keep the old head's)."""
    from spaceguard.logwatch import _OpenLog

    path = tmp_path / "log"
    path.write_bytes(b"x" * 300 + b"\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = _OpenLog(fd, os.fstat(fd), 301)
        assert reader.position().matches_head(fd)  # the head of 300 x's, cached
        os.truncate(path, 0)
        path.write_bytes(b"y" * 300 + b"\n")
        reader.offset = 301  # read on past 256 bytes without a position taken between
        assert not reader.position().matches_head(fd)  # the stale head: a re-read from 0
        reader.forget_head()  # what the follower does on truncation
        assert reader.position().matches_head(fd)
    finally:
        os.close(fd)
