"""What fills a volume: one walk of its tree, counted as `du -x` counts it.

The walk (`walk()`) measures disk usage, `st_blocks * 512`, which is what fills a disk:
a sparse file counts what it has allocated, a preallocated one (rclone ≤ 1.62 preallocates
the whole file when a transfer starts) everything it reserved. It

* stays on the volume's file system: a directory on another `st_dev` (a nested mount) is
  neither entered nor counted, and is listed as not crossed, as `du -x` does;
* counts a file with several hard links once (an `st_ino` set of files with `nlink > 1`);
* follows no symlink, and opens each directory with `O_NOFOLLOW`, then checks that what
  it opened is the directory it listed (same device and inode);
* visits directories in inode order, and each directory's entries in inode order: on a
  cold cache, ext4 then reads its inode tables nearly sequentially (about 2x faster than
  du's order, see README);
* stops at a time budget and an entry budget; a cut result says so, and which consumers
  it did not finish (their sizes are lower bounds);
* never raises for what it meets in the tree: a directory removed under it is counted as
  vanished, an unreadable one as unreadable (with the first few paths named).

**What is cached between walks, and what is not.** `ListingCache` keeps each directory's
list of names, keyed by its device and inode and valid while its mtime and ctime are
unchanged (adding, removing or renaming an entry changes both). A rescan does not read
those directories again (no getdents, no directory blocks read from disk), but it still
`lstat`s every entry: a file that grows does not change its directory's mtime, so sizes
are never taken from the cache. Directories changed within the last `RACY_SECONDS` before
a walk are not cached (timestamps are coarse: a change in the same tick would not show).
The cache is bounded (`CACHE_MAX_BYTES`); beyond it, directories are read every time.

The walk runs in a worker process (`python -m spaceguard.usage`, see `main()`) at idle CPU
and I/O priority, started and fed by `consumers.UsageMonitor`: a thread in the guard would
share its GIL with the loop that freezes migrations. The worker reads one JSON request per
line on stdin and answers one JSON line on stdout. Standard library only.

It only reads. It never deletes, moves or truncates anything: reclaim candidates are
listed for a person to decide.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import json
import os
import platform
import stat
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

RACY_SECONDS = 2.0
CACHE_MAX_BYTES = 48 * 1024 * 1024
CHECK_EVERY = 1024  # entries between two looks at the clock
MAX_NOTES = 10  # paths named for unreadable directories, errors, other mounts
MAX_CONSUMER_DIRS = 100_000  # directories at depth <= usage_depth remembered by name
MAX_TEMP_DIRS = 10_000
CANDIDATE_MIN_BYTES = 1024 * 1024  # old and preallocated files below this are not listed
PREALLOC_SLACK = 1024 * 1024  # allocated beyond the size by more than this: preallocated
# rclone's --partial-suffix (default ".partial", rclone >= 1.63 writes name.XXXX.partial)
PARTIAL_SUFFIX = ".partial"
TEMP_NAMES = frozenset({"tmp", "temp", ".tmp", ".temp", "tmp.d"})
CANDIDATE_KINDS = ("partial", "preallocated", "temp", "old")

_DIR = stat.S_IFDIR
_FMT = 0o170000
_OPEN_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_DIR = _OPEN_ROOT | os.O_NOFOLLOW
_UNCOMPLETE = 1  # flags per directory: the walk was cut inside it
_UNREADABLE = 2  # something inside could not be read


class ScanError(Exception):
    """The walk could not start (the root is missing or unreadable); phrased for people."""


def display(text: str) -> str:
    """A path for people and for JSON: bytes that are not UTF-8 become U+FFFD, control
    characters become escapes (a file name must not forge a journal line or a table)."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


# --- requests and results -------------------------------------------------------------------


@dataclass(frozen=True)
class ScanRequest:
    root: str
    depth: int = 1
    top: int = 10
    budget: float = 30.0
    max_entries: int = 5_000_000
    destinations: Mapping[str, str] = field(default_factory=dict)  # name → absolute path
    old_after: float = 30 * 86400.0

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "depth": self.depth,
            "top": self.top,
            "budget": self.budget,
            "max_entries": self.max_entries,
            "destinations": dict(self.destinations),
            "old_after": self.old_after,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ScanRequest:
        destinations = raw.get("destinations") or {}
        if not isinstance(destinations, dict):
            raise ValueError("destinations must be an object")
        request = cls(
            root=str(raw["root"]),
            depth=int(raw.get("depth", 1)),
            top=int(raw.get("top", 10)),
            budget=float(raw.get("budget", 30.0)),
            max_entries=int(raw.get("max_entries", 5_000_000)),
            destinations={str(k): str(v) for k, v in destinations.items()},
            old_after=float(raw.get("old_after", 30 * 86400.0)),
        )
        if not request.root.startswith("/") or request.depth < 1 or request.top < 1:
            raise ValueError("root must be absolute, depth and top at least 1")
        return request


@dataclass(frozen=True)
class Entry:
    """A consumer: a file or directory and its disk usage (hard links counted once)."""

    path: str
    bytes: int
    is_dir: bool = True
    complete: bool = True  # False: the walk was cut inside it (a lower bound)
    unreadable: bool = False  # something inside could not be read

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "is_dir": self.is_dir,
            "complete": self.complete,
            "unreadable": self.unreadable,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Entry:
        return cls(
            path=str(raw["path"]),
            bytes=int(raw["bytes"]),
            is_dir=bool(raw.get("is_dir", True)),
            complete=bool(raw.get("complete", True)),
            unreadable=bool(raw.get("unreadable", False)),
        )


@dataclass(frozen=True)
class Candidate:
    """Something a person might delete to get space back. The guard only lists it."""

    kind: str  # partial | preallocated | temp | old
    path: str
    bytes: int  # what deleting it would free (preallocated: what it holds beyond its size)
    mtime: float

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "bytes": self.bytes, "mtime": self.mtime}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Candidate:
        return cls(
            kind=str(raw["kind"]),
            path=str(raw["path"]),
            bytes=int(raw["bytes"]),
            mtime=float(raw["mtime"]),
        )


@dataclass(frozen=True)
class Destination:
    name: str
    path: str
    entry: Entry | None  # None: not found in the walk
    note: str = ""  # why there is no entry

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "entry": self.entry.to_json() if self.entry else None,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Destination:
        entry = raw.get("entry")
        return cls(
            name=str(raw["name"]),
            path=str(raw["path"]),
            entry=Entry.from_json(entry) if isinstance(entry, dict) else None,
            note=str(raw.get("note", "")),
        )


@dataclass(frozen=True)
class ScanResult:
    root: str
    started_at: float  # wall clock
    duration: float  # seconds
    complete: bool
    cut: str  # why the walk stopped early; "" when complete
    entries: int  # entries lstat'ed
    directories: int
    scanned_bytes: int  # the whole tree under root, as `du -sx --block-size=1 ROOT`
    used_bytes: int  # statvfs at the end: f_blocks - f_bfree
    reserved_bytes: int  # f_bfree - f_bavail: reserved for root
    consumers: tuple[Entry, ...]  # largest entries at depth 1..depth, like `du -d DEPTH`
    destinations: tuple[Destination, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    reclaimable: Mapping[str, int] = field(default_factory=dict)  # kind → all found
    other_mounts: tuple[str, ...] = ()
    unreadable: int = 0
    vanished: int = 0
    errors: tuple[str, ...] = ()  # the first few, with paths
    hardlinks: int = 0  # further links to a file already counted
    cached_dirs: int = 0  # directories whose listing came from the cache

    @property
    def finished_at(self) -> float:
        return self.started_at + self.duration

    @property
    def unexplained_bytes(self) -> int | None:
        """Used space no scanned entry accounts for: files deleted but still open, space
        hidden under other mounts, metadata. Only known after a complete walk."""
        return self.used_bytes - self.scanned_bytes if self.complete else None

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "started_at": self.started_at,
            "duration": self.duration,
            "complete": self.complete,
            "cut": self.cut,
            "entries": self.entries,
            "directories": self.directories,
            "scanned_bytes": self.scanned_bytes,
            "used_bytes": self.used_bytes,
            "reserved_bytes": self.reserved_bytes,
            "consumers": [entry.to_json() for entry in self.consumers],
            "destinations": [destination.to_json() for destination in self.destinations],
            "candidates": [candidate.to_json() for candidate in self.candidates],
            "reclaimable": dict(self.reclaimable),
            "other_mounts": list(self.other_mounts),
            "unreadable": self.unreadable,
            "vanished": self.vanished,
            "errors": list(self.errors),
            "hardlinks": self.hardlinks,
            "cached_dirs": self.cached_dirs,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ScanResult:
        return cls(
            root=str(raw["root"]),
            started_at=float(raw["started_at"]),
            duration=float(raw["duration"]),
            complete=bool(raw["complete"]),
            cut=str(raw.get("cut", "")),
            entries=int(raw["entries"]),
            directories=int(raw["directories"]),
            scanned_bytes=int(raw["scanned_bytes"]),
            used_bytes=int(raw["used_bytes"]),
            reserved_bytes=int(raw.get("reserved_bytes", 0)),
            consumers=tuple(Entry.from_json(item) for item in raw.get("consumers", [])),
            destinations=tuple(Destination.from_json(item) for item in raw.get("destinations", [])),
            candidates=tuple(Candidate.from_json(item) for item in raw.get("candidates", [])),
            reclaimable={str(k): int(v) for k, v in (raw.get("reclaimable") or {}).items()},
            other_mounts=tuple(str(path) for path in raw.get("other_mounts", [])),
            unreadable=int(raw.get("unreadable", 0)),
            vanished=int(raw.get("vanished", 0)),
            errors=tuple(str(error) for error in raw.get("errors", [])),
            hardlinks=int(raw.get("hardlinks", 0)),
            cached_dirs=int(raw.get("cached_dirs", 0)),
        )


# --- the listing cache ----------------------------------------------------------------------


class ListingCache:
    """Names of each directory seen, in inode order, while its mtime and ctime stay the
    same. Sizes are never cached (see the module docstring)."""

    def __init__(self, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.generation = 0
        # (st_dev, st_ino) → (mtime_ns, ctime_ns, names joined by NUL, generation seen)
        self._dirs: dict[tuple[int, int], tuple[int, int, str, int]] = {}

    def __len__(self) -> int:
        return len(self._dirs)

    def begin(self) -> None:
        self.generation += 1

    def get(self, key: tuple[int, int], mtime_ns: int, ctime_ns: int) -> list[str] | None:
        cached = self._dirs.get(key)
        if cached is None or cached[0] != mtime_ns or cached[1] != ctime_ns:
            return None
        if cached[3] != self.generation:
            self._dirs[key] = (cached[0], cached[1], cached[2], self.generation)
        return cached[2].split("\0") if cached[2] else []

    def put(self, key: tuple[int, int], mtime_ns: int, ctime_ns: int, names: list[str]) -> None:
        joined = "\0".join(names)
        size = sys.getsizeof(joined) + 120  # the dict slot and the tuple
        old = self._dirs.pop(key, None)
        if old is not None:
            self.bytes -= sys.getsizeof(old[2]) + 120
        if self.bytes + size > self.max_bytes:
            return
        self._dirs[key] = (mtime_ns, ctime_ns, joined, self.generation)
        self.bytes += size

    def forget(self, key: tuple[int, int]) -> None:
        old = self._dirs.pop(key, None)
        if old is not None:
            self.bytes -= sys.getsizeof(old[2]) + 120

    def prune(self) -> None:
        """After a complete walk: drop directories it did not meet (removed ones)."""
        for key, cached in list(self._dirs.items()):
            if cached[3] != self.generation:
                self.forget(key)


# --- the walk -------------------------------------------------------------------------------


class _TopK:
    """The k largest (size, item) pairs seen; ties keep the first seen."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[int, int, Any]] = []
        self.seq = 0

    def floor(self) -> int:
        return self.heap[0][0] if len(self.heap) >= self.k else -1

    def add(self, size: int, item: Any) -> None:
        self.seq -= 1
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (size, self.seq, item))
        elif size > self.heap[0][0]:
            heapq.heapreplace(self.heap, (size, self.seq, item))

    def items(self) -> list[tuple[int, Any]]:
        return [(size, item) for size, _, item in sorted(self.heap, reverse=True)]


def _is_temp_dir(name: str) -> bool:
    lowered = name.lower()
    return lowered in TEMP_NAMES or lowered.startswith("tmp.") or lowered.endswith(".tmp")


def _join(parent: str, name: str) -> str:
    return parent + name if parent.endswith("/") else parent + "/" + name


def walk(
    request: ScanRequest,
    cache: ListingCache | None = None,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
) -> ScanResult:
    """Walk `request.root` once; see the module docstring for what is counted."""
    root = request.root
    started_wall, started = now(), clock()
    deadline = started + request.budget
    old_cutoff = started_wall - request.old_after
    racy_ns = int((started_wall - RACY_SECONDS) * 1e9)
    try:
        root_fd = os.open(root, _OPEN_ROOT)
    except OSError as error:
        raise ScanError(f"{display(root)}: cannot open: {error.strerror}") from None
    try:
        root_st = os.fstat(root_fd)
    finally:
        os.close(root_fd)
    dev = root_st.st_dev
    if cache is not None:
        cache.begin()
    destination_paths = {
        os.path.normpath(path): name for name, path in request.destinations.items()
    }
    # per directory, by index in discovery order (a child always after its parent)
    parents: list[int] = [-1]
    own: list[int] = [root_st.st_blocks]  # 512-byte blocks of the directory and its files
    flags: list[int] = [0]
    named: list[tuple[int, str]] = []  # directories at depth <= request.depth
    temp_dirs: list[tuple[int, str, float]] = []
    destination_dirs: dict[str, int] = {}
    top_files = _TopK(request.top)
    partial = _TopK(request.top)
    prealloc = _TopK(request.top)
    old = _TopK(request.top)
    reclaimable = dict.fromkeys(CANDIDATE_KINDS, 0)
    links: set[int] = set()
    seen_dirs: set[int] = {root_st.st_ino}  # a bind mount of the same file system: once
    other_mounts: list[str] = []
    notes: list[str] = []
    counts = {"unreadable": 0, "vanished": 0, "errors": 0, "hardlinks": 0, "cached": 0}
    # pending directories, in inode order: (st_ino, index, path, depth, in a destination)
    pending: list[tuple[int, int, str, int, bool]] = [
        (root_st.st_ino, 0, root, 0, os.path.normpath(root) in destination_paths)
    ]
    if pending[0][4]:
        destination_dirs[destination_paths[os.path.normpath(root)]] = 0
    entries = 0
    max_entries = request.max_entries
    next_check = min(CHECK_EVERY, max_entries)
    cut = ""
    want_depth = request.depth
    os_lstat = os.lstat

    def note(text: str) -> None:
        if len(notes) < MAX_NOTES:
            notes.append(display(text))

    while pending:
        ino, index, path, depth, in_destination = heapq.heappop(pending)
        try:
            fd = os.open(path, _OPEN_DIR if index else _OPEN_ROOT)
        except FileNotFoundError:
            counts["vanished"] += 1
            continue
        except PermissionError as error:
            counts["unreadable"] += 1
            flags[index] |= _UNREADABLE
            note(f"{path}: {error.strerror}")
            continue
        except OSError as error:
            if error.errno in (errno.ENOTDIR, errno.ELOOP):  # replaced by a file or symlink
                counts["vanished"] += 1
            else:
                counts["errors"] += 1
                flags[index] |= _UNREADABLE
                note(f"{path}: {error.strerror}")
            continue
        try:
            dir_st = os.fstat(fd)
            if dir_st.st_dev != dev or dir_st.st_ino != ino:
                counts["vanished"] += 1  # replaced between the listing and the open
                continue
            key = (dev, ino)
            names = None
            if cache is not None:
                names = cache.get(key, dir_st.st_mtime_ns, dir_st.st_ctime_ns)
            if names is not None:
                counts["cached"] += 1
            else:
                try:
                    with os.scandir(fd) as listing:
                        found = [(item.inode(), item.name) for item in listing]
                except OSError as error:
                    counts["unreadable" if error.errno == errno.EACCES else "errors"] += 1
                    flags[index] |= _UNREADABLE
                    note(f"{path}: {error.strerror}")
                    continue
                found.sort()
                names = [name for _, name in found]
                if cache is not None:
                    if dir_st.st_mtime_ns < racy_ns and dir_st.st_ctime_ns < racy_ns:
                        cache.put(key, dir_st.st_mtime_ns, dir_st.st_ctime_ns, names)
                    else:
                        cache.forget(key)
            child_depth = depth + 1
            name_children = child_depth <= want_depth
            blocks = 0
            for name in names:
                try:
                    st = os_lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    counts["vanished"] += 1
                    continue
                except PermissionError as error:  # readable but not searchable (no x)
                    counts["unreadable"] += 1
                    flags[index] |= _UNREADABLE
                    note(f"{path}: {error.strerror}")
                    break
                except OSError as error:
                    counts["errors"] += 1
                    flags[index] |= _UNREADABLE
                    note(f"{_join(path, name)}: {error.strerror}")
                    continue
                entries += 1
                if st.st_dev != dev:
                    if len(other_mounts) < MAX_NOTES:
                        other_mounts.append(display(_join(path, name)))
                    continue
                if st.st_mode & _FMT == _DIR:
                    if st.st_ino in seen_dirs:
                        continue  # met before: the same directory mounted twice
                    seen_dirs.add(st.st_ino)
                    child = len(parents)
                    parents.append(index)
                    own.append(st.st_blocks)
                    flags.append(0)
                    child_path = _join(path, name)
                    child_in_destination = in_destination
                    if child_path in destination_paths:
                        destination_dirs[destination_paths[child_path]] = child
                        child_in_destination = True
                    if name_children and len(named) < MAX_CONSUMER_DIRS:
                        named.append((child, child_path))
                    if _is_temp_dir(name) and len(temp_dirs) < MAX_TEMP_DIRS:
                        temp_dirs.append((child, child_path, st.st_mtime))
                    heapq.heappush(
                        pending, (st.st_ino, child, child_path, child_depth, child_in_destination)
                    )
                else:
                    if st.st_nlink > 1:
                        if st.st_ino in links:
                            counts["hardlinks"] += 1
                            continue
                        links.add(st.st_ino)
                    file_blocks = st.st_blocks
                    blocks += file_blocks
                    size = file_blocks * 512
                    if name_children and size > top_files.floor():
                        top_files.add(size, (_join(path, name), st.st_mtime))
                    if name.endswith(PARTIAL_SUFFIX):
                        reclaimable["partial"] += size
                        partial.add(size, (_join(path, name), st.st_mtime))
                    elif size >= CANDIDATE_MIN_BYTES:
                        excess = size - st.st_size
                        if excess > PREALLOC_SLACK:
                            reclaimable["preallocated"] += excess
                            prealloc.add(excess, (_join(path, name), st.st_mtime))
                        if (
                            not in_destination
                            and st.st_mtime < old_cutoff
                            and st.st_ctime < old_cutoff
                        ):
                            reclaimable["old"] += size
                            old.add(size, (_join(path, name), st.st_mtime))
                if entries >= next_check:
                    next_check = min(entries + CHECK_EVERY, max_entries)
                    if clock() > deadline:
                        cut = f"time budget of {request.budget:g}s used up"
                        break
                    if entries >= max_entries:
                        cut = f"entry budget of {max_entries:,} used up"
                        break
            own[index] += blocks
            if cut:
                flags[index] |= _UNCOMPLETE  # its listing stays cached: the names are right
                break
        finally:
            os.close(fd)
    for _, index, _, _, _ in pending:
        flags[index] |= _UNCOMPLETE
    if cache is not None and not cut:
        cache.prune()

    # totals, children into parents (children always come after their parent)
    totals = own
    for child in range(len(parents) - 1, 0, -1):
        parent = parents[child]
        totals[parent] += totals[child]
        flags[parent] |= flags[child]
    duration = clock() - started
    try:
        vfs = os.statvfs(root)
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        reserved = max(0, vfs.f_bfree - vfs.f_bavail) * vfs.f_frsize
    except OSError as error:
        raise ScanError(f"{display(root)}: statvfs failed: {error.strerror}") from None

    def entry(index: int, path: str) -> Entry:
        return Entry(
            path=display(path),
            bytes=totals[index] * 512,
            complete=not flags[index] & _UNCOMPLETE,
            unreadable=bool(flags[index] & _UNREADABLE),
        )

    consumers = [entry(index, path) for index, path in named]
    consumers += [
        Entry(path=display(path), bytes=size, is_dir=False) for size, (path, _) in top_files.items()
    ]
    consumers.sort(key=lambda item: (-item.bytes, item.path))
    destinations = []
    for name, path in request.destinations.items():
        index_or_none = destination_dirs.get(name)
        if index_or_none is not None:
            destinations.append(Destination(name, display(path), entry(index_or_none, path)))
        else:
            destinations.append(
                Destination(name, display(path), None, _missing_destination(root, path, dev, cut))
            )
    temps = _TopK(request.top)
    temp_indexes = {index for index, _, _ in temp_dirs}
    for index, path, mtime in temp_dirs:
        if not _inside(index, parents, temp_indexes):  # else counted with the outer one
            reclaimable["temp"] += totals[index] * 512
        temps.add(totals[index] * 512, (path, mtime))
    candidates = [
        Candidate(kind, display(path), size, mtime)
        for kind, top in (("partial", partial), ("preallocated", prealloc), ("temp", temps))
        for size, (path, mtime) in top.items()
        if size > 0
    ]
    candidates += [
        Candidate("old", display(path), size, mtime) for size, (path, mtime) in old.items()
    ]
    return ScanResult(
        root=display(root),
        started_at=started_wall,
        duration=duration,
        complete=not cut,
        cut=cut,
        entries=entries,
        directories=len(parents),
        scanned_bytes=totals[0] * 512,
        used_bytes=used,
        reserved_bytes=reserved,
        consumers=tuple(consumers[: request.top]),
        destinations=tuple(destinations),
        candidates=tuple(candidates),
        reclaimable=reclaimable,
        other_mounts=tuple(other_mounts),
        unreadable=counts["unreadable"],
        vanished=counts["vanished"],
        errors=tuple(notes),
        hardlinks=counts["hardlinks"],
        cached_dirs=counts["cached"],
    )


def _inside(index: int, parents: list[int], others: set[int]) -> bool:
    """Whether directory `index` lies inside one of `others`."""
    parent = parents[index]
    while parent >= 0:
        if parent in others:
            return True
        parent = parents[parent]
    return False


def _missing_destination(root: str, path: str, dev: int, cut: str) -> str:
    normal, top = os.path.normpath(path), os.path.normpath(root)
    if normal != top and not normal.startswith(top.rstrip("/") + "/"):
        return f"not under {display(root)}"
    try:
        st = os.lstat(normal)
    except FileNotFoundError:
        return "does not exist (yet)"
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    if st.st_dev != dev:
        return "on another file system (not crossed)"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if cut:
        return "not reached before the walk was cut"
    return "not reached (under an unreadable or removed directory)"


# --- the worker process ---------------------------------------------------------------------

# ioprio_set(2): not in the os module. Syscall numbers of the common architectures.
_IOPRIO_SET = {
    "x86_64": 251,
    "amd64": 251,
    "i386": 289,
    "i686": 289,
    "aarch64": 30,
    "arm64": 30,
    "riscv64": 30,
    "armv7l": 314,
    "ppc64le": 273,
    "s390x": 282,
}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13


def lower_priority() -> dict[str, str]:
    """Make this process yield to everything else: SCHED_IDLE (else nice 19), the idle I/O
    class, and first in line for the OOM killer. Returns what was set, for the journal."""
    done: dict[str, str] = {}
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        done["cpu"] = "SCHED_IDLE"
    except (AttributeError, OSError):
        try:
            os.nice(19 - os.nice(0))
            done["cpu"] = "nice 19"
        except OSError as error:
            done["cpu"] = f"unchanged ({error.strerror})"
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        done["io"] = f"unchanged (no ioprio_set number for {platform.machine()})"
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        value = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
        if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value) == 0:
            done["io"] = "idle class"
        else:
            done["io"] = f"unchanged ({os.strerror(ctypes.get_errno())})"
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
        done["oom_score_adj"] = "1000"
    except OSError as error:
        done["oom_score_adj"] = f"unchanged ({error.strerror})"
    return done


def serve(lines: Iterable[bytes], write: Callable[[str], None]) -> None:
    """Answer each request line with one reply line; a bad request gets an error reply."""
    cache = ListingCache()
    for line in lines:
        if not line.strip():
            continue
        request_id: object = None
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("a request is a JSON object")
            request_id = raw.get("id")
            request = ScanRequest.from_json(raw["request"])
            reply: dict[str, Any] = {"id": request_id, "result": walk(request, cache).to_json()}
        except ScanError as error:
            reply = {"id": request_id, "error": str(error)}
        except (KeyError, TypeError, ValueError) as error:
            reply = {"id": request_id, "error": f"bad request: {error!r}"}
        except Exception as error:  # a bug here must cost one scan, not the worker
            reply = {"id": request_id, "error": f"internal: {type(error).__name__}: {error}"}
        write(json.dumps(reply, ensure_ascii=True) + "\n")


def main() -> int:
    hello = {"hello": {"pid": os.getpid(), **lower_priority()}}
    out = sys.stdout
    out.write(json.dumps(hello) + "\n")
    out.flush()

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(iter(sys.stdin.buffer.readline, b""), write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
