"""Follow migration log files with inotify (pyinotify) on the asyncio loop.

One :class:`LogWatcher` owns one inotify instance, registered with ``loop.add_reader``
(no thread, no timer: a quiet log costs no CPU), and follows many files. For each file
it watches:

* the file's **directory**, for the name appearing, disappearing or being renamed
  (rotation, deletion, late creation);
* the **open inode** itself (through ``/proc/self/fd/N``, so it is exactly the file we
  read even if the name was replaced meanwhile), for appends and truncation, wherever
  the file has been renamed to.

Every event only says "look again": the follower re-examines its file with
``fstat``/``stat`` and reads what is new, so a missed or coalesced event can only delay
lines, never lose them, and :meth:`LogWatcher.recheck` (called by the daemon every few
seconds) or an inotify queue overflow simply runs the same examination for every file.

Positions: :class:`LogPosition` is (device, inode, offset of the end of the last
complete line delivered). A partial last line is held back until its newline arrives,
so the saved position never points into the middle of a line.

Rotation:

* rename-and-create: the old file is read to its end, then the new one from 0. The old
  file stays open ("draining") in case its writer still appends before it reopens; it
  is closed when its writer closes it, when it is deleted, or when it did not grow
  between two rechecks. Lines appended to it after the switch are delivered, but a
  guard restart in that window would not return to them (positions name one file).
* copytruncate: the file got shorter than our offset (or the byte before our offset is
  no longer a newline): start again at 0. Lines written between logrotate's copy and
  its truncate are lost by copytruncate itself.
* deletion: the deleted file is read to its end and closed (keeping a deleted log open
  would pin its disk space), then we wait for the name to be created again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

with warnings.catch_warnings():
    # pyinotify imports asyncore (deprecated); we only use its inotify wrapper.
    warnings.simplefilter("ignore", DeprecationWarning)
    import pyinotify

__all__ = [
    "MAX_BYTES_PER_TURN",
    "MAX_LINE_BYTES",
    "MAX_SECONDS_PER_TURN",
    "READ_CHUNK_BYTES",
    "LineCallback",
    "LogPosition",
    "LogWatcher",
]

log = logging.getLogger(__name__)

# One batch for the consumer. Its cost is per line, and an error line costs some 30 us
# (parsed, classified, its item masked and dated), an INFO line well under 1 us: 128 KiB
# of error lines (~700) keep the loop for 20-30 ms, 1 MiB of them for 0.2-0.4 s.
READ_CHUNK_BYTES: Final = 128 << 10
MAX_LINE_BYTES: Final = 64 << 10
# A large backlog (say after a restart, or an old log full of errors) is read in slices
# so the loop keeps turning (the volume sampler, watchdog pings, other migrations' events)
# between them: a turn ends after this many bytes or this much time, whichever comes first
# (at least one batch per turn).
MAX_BYTES_PER_TURN: Final = 8 << 20
MAX_SECONDS_PER_TURN: Final = 0.005
HEAD_CHECK_BYTES: Final = 256
# A log inotify cannot watch (no watch left, no inotify instance) is examined this often.
POLL_INTERVAL: Final = 0.25
OVERFLOW_LOG_INTERVAL: Final = 60.0  # a storm of overflows is told once a minute

_DIR_MASK: Final = (
    pyinotify.IN_CREATE
    | pyinotify.IN_MOVED_TO
    | pyinotify.IN_MOVED_FROM
    | pyinotify.IN_DELETE
    | pyinotify.IN_ATTRIB
)
# IN_ATTRIB also reports an unlink (link count change). No IN_MOVE_SELF: pyinotify
# would try (and fail, noisily) to track the new path of a watch it cannot know.
_INODE_MASK: Final = pyinotify.IN_MODIFY | pyinotify.IN_ATTRIB | pyinotify.IN_CLOSE_WRITE

LineCallback = Callable[[str, list[str]], None]


@dataclass(frozen=True)
class LogPosition:
    """Where reading stopped: the end of the last complete line delivered.

    ``head_crc32`` is the CRC-32 of the file's first ``min(offset, 256)`` bytes: ext4
    readily reuses the inode number of a deleted log for the next file created, so
    (dev, inode) alone could resume a *new* file in the middle. None: not checked.
    """

    dev: int
    inode: int
    offset: int
    head_crc32: int | None = None

    def to_json(self) -> dict[str, int]:
        data = {"dev": self.dev, "inode": self.inode, "offset": self.offset}
        if self.head_crc32 is not None:
            data["head_crc32"] = self.head_crc32
        return data

    @classmethod
    def from_json(cls, data: object) -> LogPosition:
        """Read what :meth:`to_json` wrote; ValueError if it is not that."""
        if not isinstance(data, Mapping):
            raise ValueError(f"log position must be an object, not {type(data).__name__}")
        values: dict[str, int] = {}
        for name in ("dev", "inode", "offset"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"log position field {name!r} must be an integer >= 0")
            values[name] = value
        head = data.get("head_crc32")
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or head < 0):
            raise ValueError("log position field 'head_crc32' must be an integer >= 0")
        return cls(values["dev"], values["inode"], values["offset"], head)

    def matches_head(self, fd: int) -> bool:
        """Whether the open file starts as the file this position was taken in did."""
        if self.head_crc32 is None:
            return True
        length = min(self.offset, HEAD_CHECK_BYTES)
        try:
            head = os.pread(fd, length, 0)
        except OSError:
            return False
        return len(head) == length and zlib.crc32(head) == self.head_crc32

    @classmethod
    def end_of(cls, path: Path) -> LogPosition | None:
        """Position after the last complete line now in ``path`` (to skip old content);
        None if the file does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            end = st.st_size
            while end > 0:
                start = max(0, end - MAX_LINE_BYTES)
                newline = os.pread(fd, end - start, start).rfind(b"\n")
                if newline >= 0:
                    offset = start + newline + 1
                    return cls(st.st_dev, st.st_ino, offset, _head_crc32(fd, offset))
                end = start
            return cls(st.st_dev, st.st_ino, 0, _head_crc32(fd, 0))
        finally:
            os.close(fd)


def _head_crc32(fd: int, offset: int) -> int:
    return zlib.crc32(os.pread(fd, min(offset, HEAD_CHECK_BYTES), 0))


class _OpenLog:
    """One open log inode and how far it has been read."""

    def __init__(self, fd: int, st: os.stat_result, offset: int) -> None:
        self.fd = fd
        self.dev = st.st_dev
        self.inode = st.st_ino
        self.offset = offset  # end of the last complete line delivered
        self.read_pos = offset  # bytes consumed: offset + the held-back partial line
        self.partial = bytearray()
        self.discarding = False  # the partial line hit the cap: drop bytes up to "\n"
        self.watch: int | None = None
        self.watch_problem = ""  # why it has no watch (see _Watches)
        self.writer_closed = False
        self.read_pos_at_last_recheck = -1
        self._head_crc: tuple[int, int] | None = None  # (length, crc) of the first bytes
        # bytes before this were in the file when the guard first read it without a
        # position to go on from: the log's past, delivered to on_backlog
        self.backlog_end = 0

    @property
    def identity(self) -> tuple[int, int]:
        return (self.dev, self.inode)

    def position(self) -> LogPosition:
        length = min(self.offset, HEAD_CHECK_BYTES)
        if self._head_crc is None or self._head_crc[0] != length:
            # Reads at most 256 bytes, and only until the file is that long.
            try:
                self._head_crc = (length, _head_crc32(self.fd, length))
            except OSError:
                return LogPosition(self.dev, self.inode, self.offset)
        return LogPosition(self.dev, self.inode, self.offset, self._head_crc[1])

    def read_lines(self, chunk_bytes: int, max_line: int) -> tuple[list[str], int] | None:
        """Read one chunk; return its complete lines and the offset after them, or None
        at end of file."""
        data = os.pread(self.fd, chunk_bytes, self.read_pos)
        if not data:
            return None
        chunk_start = self.read_pos
        self.read_pos += len(data)
        last_newline = data.rfind(b"\n")
        if last_newline < 0:
            self._hold_partial(data, max_line)
            return [], self.offset
        if self.partial or self.discarding:
            first_newline = data.find(b"\n")
            if self.discarding:
                first = bytes(self.partial)
            else:
                first = bytes(self.partial + data[:first_newline])[:max_line]
            self.partial = bytearray()
            self.discarding = False
            lines = [first.decode("utf-8", "replace")]
            if first_newline < last_newline:
                lines += _split_lines(data[first_newline + 1 : last_newline], max_line)
        else:
            lines = _split_lines(data[:last_newline], max_line)
        self._hold_partial(data[last_newline + 1 :], max_line)
        return lines, chunk_start + last_newline + 1

    def forget_head(self) -> None:
        self._head_crc = None

    def take_partial(self) -> str | None:
        """The held-back unterminated last line, for a file that will not grow any more."""
        if not self.partial:
            return None
        text = self.partial.decode("utf-8", "replace")
        self.partial = bytearray()
        self.discarding = False
        return text

    def _hold_partial(self, data: bytes, max_line: int) -> None:
        if self.discarding or not data:
            return
        self.partial += data
        if len(self.partial) > max_line:
            del self.partial[max_line:]
            self.discarding = True


def _split_lines(block: bytes, max_line: int) -> list[str]:
    # "\n" never occurs inside a UTF-8 sequence, so decoding the block then splitting
    # equals splitting then decoding each line, at C speed.
    lines = block.decode("utf-8", "replace").split("\n")
    if len(block) > max_line and max(map(len, lines)) > max_line:
        lines = [line[:max_line] for line in lines]
    return lines


class _Watches:
    """inotify watches shared between followers (same directory, same inode)."""

    def __init__(self, manager: Any, unavailable: str = "") -> None:
        self._manager = manager  # None: no inotify instance (`unavailable` says why)
        self.unavailable = unavailable
        self.dir_keys: dict[int, set[str]] = {}
        self.inode_keys: dict[int, set[str]] = {}
        # why the latest add failed ("" if it worked, or if the path does not exist:
        # that is no inotify problem, the path is watched once it appears)
        self.last_problem = ""

    def watch_dir(self, directory: Path, key: str) -> int | None:
        return self._add(str(directory), _DIR_MASK, self.dir_keys, key)

    def watch_inode(self, fd: int, key: str) -> int | None:
        # /proc/self/fd/N resolves to the inode we hold open, not to whatever the name
        # points at now.
        return self._add(f"/proc/self/fd/{fd}", _INODE_MASK, self.inode_keys, key)

    def unwatch_dir(self, wd: int, key: str) -> None:
        self._remove(wd, self.dir_keys, key)

    def unwatch_inode(self, wd: int, key: str) -> None:
        self._remove(wd, self.inode_keys, key)

    def forget(self, wd: int) -> set[str]:
        """The kernel dropped this watch (IN_IGNORED); return the keys that used it."""
        return self.dir_keys.pop(wd, set()) | self.inode_keys.pop(wd, set())

    def _add(self, path: str, mask: int, table: dict[int, set[str]], key: str) -> int | None:
        self.last_problem = ""
        if self._manager is None:
            self.last_problem = self.unavailable
            return None
        try:
            result = self._manager.add_watch(path, mask, quiet=False)
        except pyinotify.WatchManagerError as exc:
            log.debug("cannot watch %s for %s: %s", path, key, exc)
            if "(ENOENT)" not in str(exc):
                # ENOSPC: fs.inotify.max_user_watches (or the user namespace's
                # user.max_inotify_watches) is used up; or EACCES and the like
                reason = str(exc).rpartition("Errno=")[2] or str(exc)
                self.last_problem = f"cannot add an inotify watch on {path}: {reason}"
            return None
        wd = result.get(path, -1)
        if not isinstance(wd, int) or wd < 0:
            self.last_problem = f"cannot add an inotify watch on {path}"
            return None
        table.setdefault(wd, set()).add(key)
        return wd

    def _remove(self, wd: int, table: dict[int, set[str]], key: str) -> None:
        keys = table.get(wd)
        if keys is None:
            return
        keys.discard(key)
        if keys:
            return
        del table[wd]
        # It may already be gone with its file or directory.
        if self._manager is not None:
            with contextlib.suppress(pyinotify.WatchManagerError):
                self._manager.rm_watch(wd, quiet=False)


class _Follower:
    """One followed path: its current file, rotated files still draining, position."""

    def __init__(
        self,
        key: str,
        path: Path,
        resume: LogPosition | None,
        on_lines: LineCallback,
        watches: _Watches,
        chunk_bytes: int,
        max_line: int,
        on_backlog: LineCallback | None = None,
    ) -> None:
        self.key = key
        self.path = path
        self.on_lines = on_lines
        self.on_backlog = on_backlog or on_lines
        # no saved position and the file is there: what it holds now is the log's past
        self._first_read_is_backlog = resume is None and os.path.lexists(path)
        self.resume = resume
        self.last_position = resume
        self.current: _OpenLog | None = None
        self.draining: list[_OpenLog] = []
        self.dir_watch: int | None = None
        self.dir_watch_problem = ""  # why the directory has no watch (see _Watches)
        self.closed = False
        self.continuation_scheduled = False
        self._watches = watches
        self._chunk_bytes = chunk_bytes
        self._max_line = max_line
        self._last_problem: str | None = None
        self._turn_ends = 0.0  # when the current turn's time budget runs out (poll())

    # -- positions -------------------------------------------------------------------

    def position(self) -> LogPosition | None:
        if self.current is not None:
            return self.current.position()
        return self.last_position

    # -- examination -----------------------------------------------------------------

    def ensure_dir_watch(self) -> None:
        if self.dir_watch is None:
            self.dir_watch = self._watches.watch_dir(self.path.parent, self.key)
            self.dir_watch_problem = self._watches.last_problem

    def ensure_inode_watches(self) -> None:
        for reader in self._readers():
            if reader.watch is None:
                reader.watch = self._watches.watch_inode(reader.fd, self.key)
                reader.watch_problem = self._watches.last_problem

    def _readers(self) -> list[_OpenLog]:
        return [*self.draining, *([self.current] if self.current is not None else [])]

    def blind(self) -> str:
        """Why inotify cannot tell us when this log changes ("" when it can)."""
        if self.closed:
            return ""
        if self.dir_watch is None and self.dir_watch_problem:
            return self.dir_watch_problem
        for reader in self._readers():
            if reader.watch is None and reader.watch_problem:
                return reader.watch_problem
        return ""

    def poll(self, budget: int, at_recheck: bool = False) -> bool:
        """Read whatever is new; True if the budget (bytes, or MAX_SECONDS_PER_TURN) ran
        out with data left to read."""
        if self.closed:  # removed while a recheck or an event batch was under way
            return False
        self._turn_ends = time.monotonic() + MAX_SECONDS_PER_TURN
        try:
            return self._poll(budget, at_recheck)
        except OSError as exc:
            self._report_problem(f"cannot read {self.path}: {exc}")
            return False

    def _poll(self, budget: int, at_recheck: bool) -> bool:
        # Rotated files first: their lines are older than the current file's.
        for old in list(self.draining):
            budget = self._read(old, budget)
            if self.closed:
                return False
            if budget <= 0:
                return True
            if old.writer_closed or os.fstat(old.fd).st_nlink == 0:
                self._finish(old)
            elif at_recheck:
                if old.read_pos == old.read_pos_at_last_recheck:
                    self._finish(old)
                else:
                    old.read_pos_at_last_recheck = old.read_pos
        if self.closed:
            return False
        for _ in range(3):  # at most: drain old, switch to new, read new
            if self.current is None and not self._open_current():
                return False
            current = self.current
            assert current is not None
            self._check_truncation(current)
            budget = self._read(current, budget)
            if self.closed:
                return False
            if budget <= 0:
                return True
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == current.identity:
                return False
            if st is None:
                if os.fstat(current.fd).st_nlink > 0:
                    return False  # renamed away, no new file yet: keep following it
                # Deleted: it is read to the end; wait for the name to be created again.
                self.current = None
                self._finish(current)
                return False
            # Replaced by a new file: the old one is read to its end; switch.
            self.current = None
            self.last_position = current.position()  # in case the new name vanishes
            if os.fstat(current.fd).st_nlink == 0:
                self._finish(current)
            else:
                self.draining.append(current)
        return True  # replaced again and again meanwhile: carry on next turn

    def _open_current(self) -> bool:
        resume = self.resume
        opened = self._open(self.path)
        if opened is None:
            if resume is not None:
                # The name is gone; the saved file may live on under its rotated name.
                found = self._find_inode(resume)
                if found is not None:
                    self.resume = None
                    self._adopt(*found, offset=resume.offset)
                    return True
            return False
        fd, st = opened
        if resume is None:
            self._adopt(fd, st, offset=0, backlog=self._first_read_is_backlog)
            self._first_read_is_backlog = False
            return True
        self.resume = None
        if (st.st_dev, st.st_ino) == (resume.dev, resume.inode):
            if resume.matches_head(fd):
                self._adopt(fd, st, offset=resume.offset)
            else:
                log.info(
                    "%s: %s was replaced or truncated; reading it from the start",
                    self.key,
                    self.path,
                )
                self._adopt(fd, st, offset=0, backlog=True)
            return True
        found = self._find_inode(resume)
        if found is None:
            log.warning(
                "%s: the file of the saved log position (inode %d) is gone; "
                "reading %s from the start",
                self.key,
                resume.inode,
                self.path,
            )
            self._adopt(fd, st, offset=0, backlog=True)
            return True
        # Rotated while we were away: finish the saved file first. The poll loop then
        # sees that the name points elsewhere and switches to it.
        os.close(fd)
        self._adopt(*found, offset=resume.offset)
        return True

    def _adopt(self, fd: int, st: os.stat_result, offset: int, backlog: bool = False) -> None:
        if offset > st.st_size:
            offset = 0  # truncated since the position was saved
        reader = _OpenLog(fd, st, offset)
        if backlog:
            reader.backlog_end = st.st_size
        reader.watch = self._watches.watch_inode(fd, self.key)
        reader.watch_problem = self._watches.last_problem
        self.current = reader
        self._last_problem = None

    def _open(self, path: Path) -> tuple[int, os.stat_result] | None:
        try:
            # O_NONBLOCK: a FIFO at the log path must not hang the loop.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._report_problem(f"cannot open {path}: {exc}")
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._report_problem(f"{path} is not a regular file")
            return None
        return fd, st

    def _find_inode(self, position: LogPosition) -> tuple[int, os.stat_result] | None:
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return None
        for entry in entries:
            try:
                if entry.inode() != position.inode:
                    continue
            except OSError:
                continue
            opened = self._open(Path(entry.path))
            if opened is None:
                continue
            fd, st = opened
            if (st.st_dev, st.st_ino) == (position.dev, position.inode) and (
                position.matches_head(fd)
            ):
                return fd, st
            os.close(fd)
        return None

    def _check_truncation(self, reader: _OpenLog) -> None:
        size = os.fstat(reader.fd).st_size
        truncated = size < reader.read_pos
        if not truncated and reader.offset > 0:
            # Truncated and refilled past our offset before we looked: the byte before
            # the offset was a newline when we read it.
            truncated = os.pread(reader.fd, 1, reader.offset - 1) != b"\n"
        if not truncated:
            return
        log.info("%s: %s was truncated; reading it from the start", self.key, self.path)
        rest = reader.take_partial()
        reader.offset = reader.read_pos = 0
        reader.read_pos_at_last_recheck = -1
        # the head's checksum is of the content before the truncation: a position saved with
        # it would not match the file's new head, and a reload or restart would read the
        # whole file again (found as an intermittent re-read after copytruncate + reload)
        reader.forget_head()
        if rest is not None:
            self._deliver([rest])

    def _read(self, reader: _OpenLog, budget: int) -> int:
        while budget > 0 and not self.closed:
            read_from = reader.read_pos
            chunk = min(self._chunk_bytes, budget)
            in_backlog = read_from < reader.backlog_end
            if in_backlog:  # a batch is all past or all new
                chunk = min(chunk, reader.backlog_end - read_from)
            result = reader.read_lines(chunk, self._max_line)
            if result is None:
                break
            lines, offset = result
            budget -= reader.read_pos - read_from
            if lines:
                try:
                    self._deliver(lines, backlog=in_backlog and offset <= reader.backlog_end)
                finally:
                    reader.offset = offset
                if time.monotonic() >= self._turn_ends:
                    return 0  # the rest in a later turn
        return budget

    def _finish(self, reader: _OpenLog) -> None:
        """Close a file that will not be read again, delivering its unterminated tail."""
        rest = reader.take_partial()
        reader.offset = reader.read_pos
        if reader is not self.current and reader in self.draining:
            self.draining.remove(reader)
        if self.current is None and not self.draining:
            self.last_position = reader.position()
        self._close_reader(reader)
        if rest is not None:
            self._deliver([rest])

    def _close_reader(self, reader: _OpenLog) -> None:
        if reader.watch is not None:
            self._watches.unwatch_inode(reader.watch, self.key)
            reader.watch = None
        os.close(reader.fd)

    def _deliver(self, lines: list[str], backlog: bool = False) -> None:
        try:
            (self.on_backlog if backlog else self.on_lines)(self.key, lines)
        except Exception:
            # A failing consumer must not stop the watcher; the lines count as delivered
            # (re-delivering them would fail the same way forever).
            log.exception("%s: line callback failed", self.key)

    def _report_problem(self, problem: str) -> None:
        if problem != self._last_problem:  # once per distinct problem, not every recheck
            log.warning("%s: %s", self.key, problem)
            self._last_problem = problem

    def note_writer_closed(self, wd: int) -> None:
        for reader in self.draining:
            if reader.watch == wd:
                reader.writer_closed = True

    def close(self) -> None:
        self.closed = True
        if self.current is not None:
            self.last_position = self.current.position()
        for reader in [*self.draining, *([self.current] if self.current else [])]:
            self._close_reader(reader)
        self.current = None
        self.draining = []
        if self.dir_watch is not None:
            self._watches.unwatch_dir(self.dir_watch, self.key)
            self.dir_watch = None


class LogWatcher:
    """Follows many log files on one inotify instance, on the running asyncio loop.

    Callbacks ``on_lines(key, lines)`` run on the loop thread with complete lines (no
    trailing newline), in file order, in batches of up to one read chunk.

    Where inotify cannot help, the watcher falls back to stat and says so: a log whose
    directory or open file cannot be watched (fs.inotify.max_user_watches used up, no
    inotify instance at all: max_user_instances) is examined every POLL_INTERVAL until a
    watch can be added again (:meth:`polled` names them, with the reason); a queue
    overflow (events lost) has every log examined at once (:attr:`overflows` counts them).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        read_chunk_bytes: int = READ_CHUNK_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_bytes_per_turn: int = MAX_BYTES_PER_TURN,
    ) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._chunk_bytes = read_chunk_bytes
        self._max_line = max_line_bytes
        self._max_bytes_per_turn = max_bytes_per_turn
        self._followers: dict[str, _Follower] = {}
        self._closed = False
        self.overflows = 0  # inotify queue overflows (or unreadable event batches)
        self._overflow_logged_at = -OVERFLOW_LOG_INTERVAL
        self._polled: dict[str, str] = {}  # key → why it is followed by stat
        self._poll_handle: asyncio.TimerHandle | None = None
        self._fd: int | None = None
        self._notifier: Any = None
        try:
            self._manager: Any = pyinotify.WatchManager()
        except OSError as error:  # EMFILE: fs.inotify.max_user_instances used up
            self._manager = None
            self.inotify_problem = f"no inotify instance ({error})"
            log.warning(
                "%s: following every log by stat every %g s", self.inotify_problem, POLL_INTERVAL
            )
        else:
            self.inotify_problem = ""
        self._watches = _Watches(self._manager, self.inotify_problem)
        if self._manager is not None:
            self._notifier = pyinotify.Notifier(self._manager, default_proc_fun=self._on_event)
            self._fd = self._manager.get_fd()
            os.set_inheritable(self._fd, False)  # pyinotify's inotify_init() sets no CLOEXEC
            self._loop.add_reader(self._fd, self._on_readable)

    # -- public API ------------------------------------------------------------------

    def add(
        self,
        key: str,
        path: Path,
        position: LogPosition | None,
        on_lines: LineCallback,
        on_backlog: LineCallback | None = None,
    ) -> None:
        """Follow ``path`` from ``position`` (None: from the start of the file).

        A missing file (or directory) is not an error: it is read once it appears.
        The first read happens on the next loop turn, not inside this call. Lines that
        were in the file before it was first read without a usable position (its past)
        go to ``on_backlog`` when given; lines of a file that appears later are new.
        """
        if self._closed:
            raise RuntimeError("LogWatcher is closed")
        if key in self._followers:
            raise ValueError(f"log {key!r} is already followed")
        follower = _Follower(
            key,
            Path(os.path.abspath(path)),
            position,
            on_lines,
            self._watches,
            self._chunk_bytes,
            self._max_line,
            on_backlog,
        )
        self._followers[key] = follower
        follower.ensure_dir_watch()  # before the first read, so no change slips between
        self._schedule(follower)

    def remove(self, key: str) -> None:
        follower = self._followers.pop(key, None)
        self._polled.pop(key, None)
        if follower is not None:
            follower.close()

    def polled(self) -> dict[str, str]:
        """The logs followed by stat because inotify cannot watch them: key → why."""
        return dict(self._polled)

    def positions(self) -> dict[str, LogPosition]:
        result: dict[str, LogPosition] = {}
        for key, follower in self._followers.items():
            position = follower.position()
            if position is not None:
                result[key] = position
        return result

    def read_now(self, key: str) -> None:
        """Read what is new in log ``key`` now, before this call returns (the lines go to
        its callbacks first), as an event would have made it do on a later loop turn; a
        backlog beyond one turn's budget goes on as usual. For the daemon: what a unit
        wrote before it ended is read before its end is decided on."""
        follower = self._followers.get(key)
        if follower is not None:
            self._poll(follower)

    def recheck(self) -> None:
        """Examine every file by stat, as if an event had come for each (backs inotify
        up: the daemon calls this every few seconds)."""
        for follower in list(self._followers.values()):
            follower.ensure_dir_watch()
            follower.ensure_inode_watches()
            self._poll(follower, at_recheck=True)

    def on_queue_overflow(self) -> None:
        """inotify dropped events: every file may have changed."""
        self.overflows += 1
        now = self._loop.time()
        if now - self._overflow_logged_at >= OVERFLOW_LOG_INTERVAL:
            self._overflow_logged_at = now
            log.warning(
                "inotify event queue overflowed (%d times so far; fs.inotify."
                "max_queued_events): events were lost, rechecking every log by stat",
                self.overflows,
            )
        self.recheck()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        for follower in self._followers.values():
            follower.close()
        self._followers.clear()
        self._polled.clear()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._notifier.stop()  # closes the inotify fd (and with it every watch)
            self._fd = None

    # -- inotify ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            self._notifier.read_events()
        except (pyinotify.NotifierError, UnicodeDecodeError, OSError) as exc:
            # pyinotify could not decode a batch (e.g. a non-UTF-8 file name in a
            # watched directory): those events are lost, so look at everything.
            log.warning("reading inotify events failed: %s", exc)
            self.on_queue_overflow()
        self._notifier.process_events()

    def _on_event(self, event: Any) -> None:
        try:
            self._dispatch(event)
        except Exception:
            log.exception("handling inotify event %r failed", event)

    def _dispatch(self, event: Any) -> None:
        mask: int = event.mask
        if mask & pyinotify.IN_Q_OVERFLOW:
            self.on_queue_overflow()
            return
        wd: int = event.wd
        if mask & pyinotify.IN_IGNORED:
            # The watched directory (or inode) is gone; recheck() will watch it again.
            for key in self._watches.forget(wd):
                follower = self._followers.get(key)
                if follower is not None and follower.dir_watch == wd:
                    follower.dir_watch = None
            return
        dir_keys = self._watches.dir_keys.get(wd)
        if dir_keys:
            name = event.name
            for key in list(dir_keys):
                follower = self._followers.get(key)
                if follower is not None and follower.path.name == name:
                    self._poll(follower)
        inode_keys = self._watches.inode_keys.get(wd)
        if inode_keys:
            for key in list(inode_keys):
                follower = self._followers.get(key)
                if follower is None:
                    continue
                if mask & pyinotify.IN_CLOSE_WRITE:
                    follower.note_writer_closed(wd)
                self._poll(follower)

    # -- reading ---------------------------------------------------------------------

    def _schedule(self, follower: _Follower) -> None:
        if not follower.continuation_scheduled:
            follower.continuation_scheduled = True
            self._loop.call_soon(self._continue, follower)

    def _continue(self, follower: _Follower) -> None:
        follower.continuation_scheduled = False
        if self._followers.get(follower.key) is follower:
            self._poll(follower)

    def _poll(self, follower: _Follower, at_recheck: bool = False) -> None:
        if follower.poll(self._max_bytes_per_turn, at_recheck):
            self._schedule(follower)  # more to read: continue after other callbacks
        self._track_blindness(follower)

    # -- stat polling where inotify cannot watch ---------------------------------------

    def _track_blindness(self, follower: _Follower) -> None:
        key = follower.key
        why = follower.blind() if self._followers.get(key) is follower else ""
        if why and key not in self._polled:
            self._polled[key] = why
            log.warning(
                "%s: %s: following %s by stat every %g s until it can be watched",
                key,
                why,
                follower.path,
                POLL_INTERVAL,
            )
        elif not why and key in self._polled:
            del self._polled[key]
            log.info("%s: inotify watches %s again", key, follower.path)
        if self._polled and self._poll_handle is None and not self._closed:
            self._poll_handle = self._loop.call_later(POLL_INTERVAL, self._poll_blind)

    def _poll_blind(self) -> None:
        self._poll_handle = None
        for key in list(self._polled):
            follower = self._followers.get(key)
            if follower is None:
                self._polled.pop(key, None)
                continue
            follower.ensure_dir_watch()  # the limit may have been raised, watches freed
            follower.ensure_inode_watches()
            self._poll(follower)
        if self._polled and self._poll_handle is None and not self._closed:
            self._poll_handle = self._loop.call_later(POLL_INTERVAL, self._poll_blind)
