"""usage.py: the tree walk on real trees, against `du` on the same tree.

The trees are real files in a temporary directory (the walk only reads what the kernel
reports); nested mounts and loop volumes are in tests/integration/test_usage.py. The
unreadable-subtree test runs the real worker process as uid 65534 (needs root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spaceguard.protocol import encode_reply, ok_reply
from spaceguard.usage import (
    CHECK_EVERY,
    ListingCache,
    ScanError,
    ScanRequest,
    ScanResult,
    display,
    serve,
    walk,
)

from tests.sandbox import readable_package_dir, require

MIB = 1024 * 1024


def du(path: Path, *args: str) -> int:
    """`du -sx --block-size=1 PATH`: what the walk must report (disk usage, links once)."""
    out = subprocess.run(
        ["du", "-sx", "--block-size=1", *args, str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def du_depth(path: Path, depth: int) -> dict[str, int]:
    """`du -x -a -d DEPTH --block-size=1 PATH` as {path: bytes}."""
    out = subprocess.run(
        ["du", "-x", "-a", f"-d{depth}", "--block-size=1", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sizes = {}
    for line in out.splitlines():
        size, name = line.split("\t", 1)
        sizes[name] = int(size)
    return sizes


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(b"x" * size)
    return path


def mixed_tree(root: Path) -> None:
    """Files of many sizes, a sparse file, a preallocated one (as rclone <= 1.62 leaves an
    interrupted transfer), a symlink, empty directories, a partial file and a temp dir."""
    for account in ("alice", "bob", "carol"):
        for index in range(40):
            write(root / account / f"dir{index % 4}" / f"file{index}.bin", index * 3000)
    write(root / "big.bin", 3 * MIB)
    sparse = root / "alice" / "sparse.img"
    with sparse.open("wb") as handle:
        handle.truncate(512 * MIB)  # 512 MiB apparent, nothing allocated
        handle.write(b"y" * 10)
    prealloc = root / "bob" / "video.mp4"
    write(prealloc, 100_000)
    subprocess.run(["fallocate", "-n", "-l", str(8 * MIB), str(prealloc)], check=True)
    (root / "alice" / "link").symlink_to("/etc/passwd")
    (root / "empty" / "deeper").mkdir(parents=True)
    write(root / "carol" / "doc.docx.ab12cd.partial", 2 * MIB)
    write(root / "tmp" / "scratch.bin", MIB)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "space"
    root.mkdir()
    mixed_tree(root)
    return root


def scan(root: Path, **options: object) -> ScanResult:
    return walk(ScanRequest(root=str(root), **options))  # type: ignore[arg-type]


def test_sizes_match_du(tree: Path) -> None:
    result = scan(tree)
    assert result.complete and result.cut == ""
    assert result.scanned_bytes == du(tree)
    expected = du_depth(tree, 1)
    for entry in result.consumers:
        assert entry.bytes == expected[entry.path], entry
    # the top N (10) of du's depth-1 entries, largest first
    ranked = sorted(
        ((size, path) for path, size in expected.items() if path != str(tree)), reverse=True
    )
    assert {e.path for e in result.consumers} == {path for _, path in ranked[:10]}
    assert [e.bytes for e in result.consumers] == sorted(
        (e.bytes for e in result.consumers), reverse=True
    )
    files = {e.path: e for e in result.consumers if not e.is_dir}
    assert str(tree / "big.bin") in files
    # disk usage, not apparent size: the sparse 512 MiB file holds one block
    assert result.scanned_bytes < 100 * MIB < du(tree, "--apparent-size")


def test_depth_two_lists_like_du(tree: Path) -> None:
    result = scan(tree, depth=2, top=100)
    expected = du_depth(tree, 2)
    assert {e.path for e in result.consumers} == set(expected) - {str(tree)}
    for entry in result.consumers:
        assert entry.bytes == expected[entry.path], entry


def test_hard_links_count_once(tmp_path: Path) -> None:
    root = tmp_path / "space"
    originals = [write(root / "a" / f"f{index}", 50_000) for index in range(30)]
    for index, original in enumerate(originals):
        (root / "a" / f"again{index}").hardlink_to(original)  # same directory
        (root / "b").mkdir(exist_ok=True)
        (root / "b" / f"f{index}").hardlink_to(original)  # another top-level directory
    result = scan(root)
    assert result.complete
    assert result.scanned_bytes == du(root)
    assert result.hardlinks == 60
    consumers = {e.path: e.bytes for e in result.consumers}
    # every file is counted once, in whichever directory the walk met it first
    own = du(root, "-S")  # the root directory's own blocks
    assert consumers[str(root / "a")] + consumers[str(root / "b")] + own == result.scanned_bytes
    assert max(consumers.values()) == du(root / "a")  # du counts them all in a, met first too


def test_entry_budget_cuts_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "space"
    for top in range(3):
        for index in range(1500):
            write(root / f"d{top}" / f"f{index}", 100)
    result = scan(root, max_entries=1000)
    assert not result.complete
    assert result.cut == "entry budget of 1,000 used up"
    assert 1000 <= result.entries < 1000 + CHECK_EVERY
    assert result.unexplained_bytes is None
    assert not all(entry.complete for entry in result.consumers)
    assert result.scanned_bytes < du(root)


def test_time_budget_cuts_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "space"
    for index in range(3 * CHECK_EVERY):
        write(root / "d" / f"f{index}", 0)
    ticks = iter(range(1000))
    result = walk(ScanRequest(root=str(root), budget=1.5), clock=lambda: float(next(ticks)))
    assert not result.complete and result.cut == "time budget of 1.5s used up"
    assert result.entries == 2 * CHECK_EVERY  # the clock passed 1.5 at its third reading


def test_a_directory_removed_mid_scan_is_counted_as_vanished(tmp_path: Path) -> None:
    root = tmp_path / "space"
    for index in range(2 * CHECK_EVERY):  # "first" is created first: lowest inode, read first
        write(root / "first" / f"f{index}", 0)
    doomed = root / "zz-doomed"
    for index in range(50):
        write(doomed / "inner" / f"f{index}", 4096)
    readings = 0

    def clock() -> float:
        nonlocal readings
        readings += 1
        if readings == 2:  # the first look at the budget, while "first" is being read
            shutil.rmtree(doomed)
        return 0.0

    result = walk(ScanRequest(root=str(root)), clock=clock)
    assert readings >= 2
    assert result.complete and result.vanished >= 1
    assert str(doomed / "inner") not in str(result.consumers)
    assert result.scanned_bytes <= du(root) + 4096  # the doomed directory's own block


def test_the_root_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match=r"/nope: cannot open: No such file or directory"):
        scan(tmp_path / "nope")


def test_listing_cache_reuses_names_but_never_sizes(tmp_path: Path) -> None:
    root = tmp_path / "space"
    for index in range(20):
        write(root / "a" / f"f{index}", 1000)
    write(root / "b" / "grows.log", 1000)
    cache = ListingCache()

    def later() -> float:  # the walks run a minute on: no directory was "just changed"
        return time.time() + 60

    first = walk(ScanRequest(root=str(root)), cache, now=later)
    assert first.cached_dirs == 0 and len(cache) == 3
    # a file grows: its directory's mtime does not change, the size is still seen
    with (root / "b" / "grows.log").open("ab") as handle:
        handle.write(b"z" * 200_000)
    second = walk(ScanRequest(root=str(root)), cache, now=later)
    assert second.cached_dirs == 3
    assert second.scanned_bytes == du(root)
    # a new file changes the directory's mtime: it is listed again
    write(root / "a" / "new.bin", 300_000)
    third = walk(ScanRequest(root=str(root)), cache, now=later)
    assert third.cached_dirs == 2  # root and b from the cache, a listed again
    assert third.scanned_bytes == du(root)
    # just changed (now, not a minute ago): not cached, since a change within the same
    # timestamp tick would not show
    write(root / "a" / "newer.bin", 10)
    assert walk(ScanRequest(root=str(root)), cache).cached_dirs == 2
    assert walk(ScanRequest(root=str(root)), cache).cached_dirs == 2
    # a removed directory leaves the cache after a complete walk
    shutil.rmtree(root / "b")
    walk(ScanRequest(root=str(root)), cache, now=later)
    assert len(cache) == 2


def test_listing_cache_is_bounded(tmp_path: Path) -> None:
    root = tmp_path / "space"
    for index in range(50):
        write(root / f"d{index}" / ("x" * 200), 0)
    cache = ListingCache(max_bytes=4000)
    walk(ScanRequest(root=str(root)), cache, now=lambda: time.time() + 60)
    assert 0 < len(cache) < 51 and cache.bytes <= 4000


def test_reclaim_candidates_are_listed(tree: Path) -> None:
    destination = tree / "alice"
    a_month_on = time.time() + 40 * 86400  # every file is "old" then (mtime and ctime)
    result = walk(
        ScanRequest(root=str(tree), destinations={"alice": str(destination)}),
        now=lambda: a_month_on,
    )
    kinds: dict[str, list[str]] = {}
    for candidate in result.candidates:
        kinds.setdefault(candidate.kind, []).append(candidate.path)
    assert kinds["partial"] == [str(tree / "carol" / "doc.docx.ab12cd.partial")]
    assert kinds["preallocated"] == [str(tree / "bob" / "video.mp4")]
    assert kinds["temp"] == [str(tree / "tmp")]
    assert str(tree / "big.bin") in kinds["old"]
    assert not [path for path in kinds["old"] if path.startswith(str(destination))]
    prealloc = next(c for c in result.candidates if c.kind == "preallocated")
    assert prealloc.bytes >= 8 * MIB - 100_000 - 4096
    assert result.reclaimable["partial"] == 2 * MIB
    assert result.reclaimable["temp"] == du(tree / "tmp")
    (alice,) = result.destinations
    assert alice.entry is not None and alice.entry.bytes == du(destination)
    assert scan(tree).reclaimable["old"] == 0  # nothing is a month old today


def test_destinations_that_cannot_be_counted_say_why(tree: Path, tmp_path: Path) -> None:
    result = scan(
        tree,
        destinations={
            "new": str(tree / "not-yet"),
            "elsewhere": str(tmp_path / "other"),
            "file": str(tree / "big.bin"),
        },
    )
    notes = {d.name: d.note for d in result.destinations}
    assert all(d.entry is None for d in result.destinations)
    assert notes == {
        "new": "does not exist (yet)",
        "elsewhere": f"not under {tree}",
        "file": "not a directory",
    }


def test_odd_names_are_shown_safely(tmp_path: Path) -> None:
    root = tmp_path / "space"
    root.mkdir()
    bad = os.fsencode(str(root)) + b"/evil\xff\n[ERROR] forged.partial"
    with open(bad, "wb") as handle:
        handle.write(b"x" * 5000)
    result = scan(root)
    (entry,) = result.consumers
    assert entry.path == f"{root}/evil\ufffd\\n[ERROR] forged.partial"
    assert result.candidates[0].path == entry.path
    assert encode_reply(ok_reply(result.to_json())).count(b"\n") == 1
    assert ScanResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    assert display("tab\there") == "tab\\there"


def test_worker_answers_every_line(tree: Path) -> None:
    replies: list[dict[str, object]] = []
    lines = [
        json.dumps({"id": 1, "request": ScanRequest(root=str(tree)).to_json()}).encode(),
        b"not json",
        json.dumps({"id": 2, "request": {"root": "relative"}}).encode(),
        json.dumps({"id": 3, "request": {"root": str(tree / "missing")}}).encode(),
        b"",
    ]
    serve(lines, lambda text: replies.append(json.loads(text)))
    assert [reply["id"] for reply in replies] == [1, None, 2, 3]
    result = replies[0]["result"]
    assert isinstance(result, dict) and result["scanned_bytes"] == du(tree)
    assert "bad request" in str(replies[1]["error"]) and "bad request" in str(replies[2]["error"])
    assert replies[3]["error"] == f"{tree / 'missing'}: cannot open: No such file or directory"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="sg-usage-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unreadable_subtrees_as_an_unprivileged_scanner(public_dir: Path) -> None:
    require(
        os.geteuid() == 0 and shutil.which("setpriv") is not None,
        "needs root and setpriv (util-linux) to run the scanner as uid 65534",
    )
    root = public_dir / "space"
    write(root / "open" / "a.bin", 10_000)
    write(root / "secret" / "inner" / "b.bin", 500_000)
    write(root / "listable" / "c.bin", 7000)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    root.chmod(0o755)
    (root / "secret").chmod(0o700)  # root's: not even listable for the scanner
    (root / "listable").chmod(0o744)  # listable, not searchable: no entry can be lstat'ed
    request = json.dumps({"id": 7, "request": {"root": str(root)}})
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "spaceguard.usage",
        ],
        input=request + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(readable_package_dir())},
        check=True,
    )
    hello, reply = (json.loads(line) for line in out.stdout.splitlines())
    assert hello["hello"]["cpu"] in ("SCHED_IDLE", "nice 19")
    result = ScanResult.from_json(reply["result"])
    assert result.complete and result.unreadable == 2
    assert sorted(result.errors) == [
        f"{root / 'listable'}: Permission denied",
        f"{root / 'secret'}: Permission denied",
    ]
    consumers = {e.path: e for e in result.consumers}
    assert consumers[str(root / "secret")].unreadable
    assert consumers[str(root / "listable")].unreadable
    assert not consumers[str(root / "open")].unreadable
    assert consumers[str(root / "open")].bytes == du(root / "open")
    # what it could not read is not counted, and so shows up as unexplained
    assert result.scanned_bytes < du(root)
