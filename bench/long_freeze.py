#!/usr/bin/env python3
"""What a long freeze does to a real rclone copy, to choose `max_freeze`'s default (issue 14).

    sudo .venv/bin/python bench/long_freeze.py [--timeouts 5,10] [--factors 0.5,1,2,5,10]
        [--modes thaw,stop] [--server-drop 30s] [--cycles 10] [--long] [--serial]
        [--json FILE]

The defaults take about 11 minutes (7.5 of them frozen); fewer --timeouts/--factors, or
--server-drop '' --cycles 0, run fewer cases. --long adds rclone's default --timeout 5m
(frozen 0.5 and 1.2 x 5m: about 9 minutes more).

Real parts: a sandboxed systemd (tests/sandbox.py); per lane, `rclone serve webdav` of a
source tree (a few hundred MiB of random files, some large) in a unit of its own that is
never frozen, with `--bwlimit` on the server (the network is the bottleneck, as in a real
migration); and `rclone copy` from it into a local directory in another unit, with
`--timeout T` and everything else at rclone's defaults (`--contimeout` 1m,
`--low-level-retries` 10, `--retries` 3, `--transfers` 4). That unit has
IPAccounting=yes: its IPIngressBytes are what really came over the wire (what a re-opened
connection had already received, and threw away, counts too).

Each case freezes the copy unit (`systemctl freeze`, i.e. FreezeUnit) while a large file is
mid-flight, for k x T, then either
  thaw: `systemctl thaw` and let rclone finish, or
  stop: `systemctl stop` (SIGTERM, what a max_freeze stop does) and start the same copy
        again (what resume_unit does: rclone copies what is missing or changed).
It records whether rclone finished, its exit status, what it logged after the thaw (or the
stop), the bytes it moved beyond the source size (rclone's own "Transferred" bytes, and the
bytes received over the wire against an unfrozen baseline copy), the time from thaw/stop to
completion against what the unfrozen copy needed for the same remaining bytes, `rclone check`
of source against destination, and what the WebDAV server side did with its connections
meanwhile (`ss`, and the server's journal). By default the thaw and stop lanes of a case run
at the same time (separate servers and destinations); --serial runs them one after another.

Two more cases by default: --server-drop thaws the longest freezes with the servers'
--server-write-timeout short enough that the server gives up the stalled responses (as a
remote with its own timeouts would); --cycles freezes one copy again and again (each
freeze longer than --timeout costs an in-flight transfer one of its --low-level-retries
re-opens, which rclone never gives back during that transfer).

Prints a table and figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.guardrig import free_port
from tests.sandbox import SandboxError, SystemdSandbox, exec_line

MIB = 1024 * 1024
LANES = ("a", "b")  # cases of a group run side by side, one per lane
CYCLE_LANE = "c"  # the --cycles case: a source of its own
CYCLE_RUN = 0.25  # seconds of running between the freezes of a --cycles case

# What rclone logs when a connection or transfer breaks, by class (a line may hit several).
ERROR_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("timeout", re.compile(r"i/o timeout|deadline exceeded|timeout awaiting|timed out", re.I)),
    ("reset", re.compile(r"connection reset", re.I)),
    ("broken-pipe", re.compile(r"broken pipe", re.I)),
    ("EOF", re.compile(r"unexpected EOF|\bEOF\b")),
    ("reopen", re.compile(r"Reopening on read failure")),
    ("reopen-exhausted", re.compile(r"too many retries")),
    ("low-level-retry", re.compile(r"low level retry", re.I)),
    ("failed-copy", re.compile(r"Failed to copy")),
    ("attempt-failed", re.compile(r"Attempt \d+/\d+ failed")),
    ("signal", re.compile(r"Signal received|Exiting")),
)
NOTEWORTHY_LEVELS = {"error", "warning", "notice", "critical", "alert", "emergency"}


# --------------------------------------------------------------------------- the parts


def make_source(directory: Path, big: int, big_mib: int, small: int) -> int:
    """Random (incompressible) files of 1 MiB, and big ones spread over the listing order."""
    directory.mkdir(parents=True)
    count = big + small
    big_at = {round((i + 0.3) * count / big) for i in range(big)}
    total = 0
    for index in range(count):
        size = big_mib * MIB if index in big_at else MIB
        with (directory / f"file-{index:03d}.bin").open("wb") as out:
            left = size
            while left:
                chunk = min(left, 4 * MIB)
                out.write(os.urandom(chunk))
                left -= chunk
        total += size
    return total


@dataclass
class Lane:
    """One WebDAV server unit (never frozen) and one copy unit template, on a port of its own."""

    name: str
    port: int
    work: Path
    source: Path
    source_bytes: int = 0
    rate: str = ""  # the server's --bwlimit, if not the bench's

    @property
    def dest(self) -> Path:
        return self.work / f"dest-{self.name}"

    def server_unit(self, write_timeout: str) -> str:
        return f"webdav-{self.name}@{write_timeout}.service"

    def copy_unit(self, timeout: str) -> str:
        return f"copy-{self.name}@{timeout}.service"

    def log(self, timeout: str) -> Path:
        return self.work / "logs" / f"{self.name}-{timeout}.log"

    def units(self, rclone: str, rate: str, conf: Path) -> dict[str, str]:
        serve = [
            rclone,
            "serve",
            "webdav",
            str(self.source),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--bwlimit",
            rate,
            "-v",
        ]
        copy = [
            rclone,
            "--config",
            str(conf),
            "copy",
            f"{self.name}:",
            str(self.dest),
            "--use-json-log",
            "-vv",
            "--stats",
            "500ms",
        ]
        log = self.work / "logs" / f"{self.name}-%i.log"
        return {
            # %i: the server's --server-write-timeout (rclone's default is 1h)
            f"webdav-{self.name}@.service": textwrap.dedent(f"""\
                [Service]
                Type=exec
                ExecStart={exec_line(serve)} --server-write-timeout %i
                """),
            # %i: the copy's --timeout; RemainAfterExit keeps IPIngressBytes readable
            # after rclone exits. TimeoutStopSec and KillMode as the shipped example unit.
            f"copy-{self.name}@.service": textwrap.dedent(f"""\
                [Service]
                Type=exec
                RemainAfterExit=yes
                IPAccounting=yes
                KillMode=control-group
                TimeoutStopSec=60s
                ExecStart={exec_line(copy)} --timeout %i --log-file {log}
                """),
        }


@dataclass
class Case:
    timeout: float  # rclone --timeout, seconds
    factor: float  # freeze = factor x timeout (0: no freeze, the baseline)
    mode: str  # "thaw", "stop" or "none"
    server_write_timeout: str = "1h"
    cycles: int = 1  # freezes of this length, with CYCLE_RUN seconds of running between
    lane: str = ""  # run on this lane (else: the case's place in its group)

    @property
    def freeze(self) -> float:
        return self.factor * self.timeout


@dataclass
class Outcome:
    timeout: float
    factor: float
    freeze: float
    mode: str
    server_write_timeout: str
    cycles: int
    source_bytes: int
    froze_mid_flight: bool = False
    bytes_at_freeze: int = 0
    in_flight: list[str] = field(default_factory=list)
    finished: bool = False
    exit_status: str = ""  # of the run that finished (thaw: the one run; stop: the restart)
    first_run_exit: str = ""  # stop mode: the stopped run
    stop_seconds: float | None = None
    to_done: float | None = None  # thaw (or stop) -> copy complete
    unfrozen_remaining: float | None = None  # what the baseline needed for those bytes
    stats_bytes: int = 0  # rclone's "Transferred" bytes, summed over runs
    wire_bytes: int = 0  # IPIngressBytes, summed over runs
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    check: str = ""
    server: dict[str, Any] = field(default_factory=dict)
    most_reopens: int = 0  # the most re-opens of one file (rclone allows --low-level-retries)
    first_error_after: float | None = None  # seconds from thaw/stop to the first error line
    note: str = ""
    wall_seconds: float = 0.0


# --------------------------------------------------------------------------- reading


def fmt_seconds(value: float) -> str:
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g}m"
    return f"{value:g}s"


class JsonLog:
    """An rclone --use-json-log file, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.entries: list[dict[str, Any]] = []
        self._partial = ""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open() as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        data = self._partial + data
        lines = data.split("\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    new.append(entry)
        self.entries += new
        return new

    def last_stats(self) -> dict[str, Any] | None:
        for entry in reversed(self.entries):
            if isinstance(entry.get("stats"), dict):
                return entry["stats"]  # type: ignore[no-any-return]
        return None

    def since(self, wall: float) -> Iterator[dict[str, Any]]:
        for entry in self.entries:
            when = entry_time(entry)
            if when is not None and when >= wall:
                yield entry


def entry_time(entry: dict[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(entry.get("time"))).timestamp()
    except ValueError:
        return None


def classify(
    entries: Iterator[dict[str, Any]],
) -> tuple[Counter[str], list[str], float | None, Counter[str]]:
    """Counts by class, one sample line per kind of message, the time of the first, and
    the re-opens of each file."""
    counts: Counter[str] = Counter()
    reopens: Counter[str] = Counter()
    samples: list[str] = []
    seen: set[str] = set()
    first: float | None = None
    for entry in entries:
        if "stats" in entry:
            continue
        msg = str(entry.get("msg", "")).strip()
        if "starting with parameters" in msg:  # the command line names --timeout
            continue
        obj = entry.get("object")
        text = f"{obj}: {msg}" if obj else msg
        hits = [name for name, pattern in ERROR_CLASSES if pattern.search(msg)]
        level = str(entry.get("level", ""))
        if not hits and level not in NOTEWORTHY_LEVELS:
            continue
        counts.update(hits or [level])
        if "reopen" in hits:
            reopens[str(obj)] += 1
        when = entry_time(entry)
        if when is not None and (first is None or when < first):
            first = when
        # one sample per kind of message (numbers, names and ports stripped)
        key = re.sub(r"[0-9]+", "N", msg)[:90]
        if key not in seen and len(samples) < 8:
            seen.add(key)
            samples.append(f"{level}: {text}"[:300])
    return counts, samples, first, reopens


def tcp_sockets(port: int) -> list[tuple[str, int, int, int, int]]:
    """(state, recv-q, send-q, local port, peer port) of TCP sockets on ``port``."""
    out = subprocess.run(["ss", "-tanH"], capture_output=True, text=True, check=False).stdout
    result = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        state, recv_q, send_q, local, peer = parts[:5]
        lport = int(local.rsplit(":", 1)[1])
        pport = int(peer.rsplit(":", 1)[1]) if peer.rsplit(":", 1)[1].isdigit() else 0
        if port in (lport, pport) and state != "LISTEN":
            result.append((state, int(recv_q), int(send_q), lport, pport))
    return result


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-tlnH"], capture_output=True, text=True, check=False).stdout
    return any(f"127.0.0.1:{port} " in line for line in out.splitlines())


def connection_view(port: int) -> dict[str, Any]:
    socks = tcp_sockets(port)
    server = [s for s in socks if s[3] == port]
    client = [s for s in socks if s[4] == port]
    return {
        "server_states": dict(Counter(s[0] for s in server)),
        "server_send_q": sum(s[2] for s in server),
        "client_states": dict(Counter(s[0] for s in client)),
        "client_recv_q": sum(s[1] for s in client),
        "client_ports": sorted(s[3] for s in client if s[0] == "ESTAB"),
    }


_IP_LINE = re.compile(r"received ([0-9.]+)([BKMGT]) IP traffic")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, rclone: str) -> None:
        self.args = args
        self.work = work
        self.rclone = rclone
        self.sandbox = SystemdSandbox(work / "sandbox")
        self.source = work / "source"
        self.source_bytes = 0
        self.lanes = {name: Lane(name, free_port(), work, self.source) for name in LANES}
        if args.cycles > 1:  # one file big enough to stay in flight over all the freezes
            self.lanes[CYCLE_LANE] = Lane(
                CYCLE_LANE, free_port(), work, work / "source-cycles", rate=args.cycle_rate
            )
        self.baseline_seconds = 0.0

    # -- sandbox

    def setup(self) -> None:
        self.source_bytes = make_source(
            self.source, self.args.big_files, self.args.big_mib, self.args.small_files
        )
        for lane in self.lanes.values():
            if lane.source == self.source:
                lane.source_bytes = self.source_bytes
            else:
                lane.source_bytes = make_source(lane.source, 1, self.args.cycle_mib, 4)
        (self.work / "logs").mkdir()
        conf = self.work / "rclone.conf"
        conf.write_text(
            "".join(
                f"[{lane.name}]\ntype = webdav\nurl = http://127.0.0.1:{lane.port}\n"
                for lane in self.lanes.values()
            )
        )
        units: dict[str, str] = {}
        for lane in self.lanes.values():
            units.update(lane.units(self.rclone, lane.rate or self.args.rate, conf))
        self.sandbox.up(units)

    def props(self, unit: str, *names: str) -> dict[str, str]:
        res = self.sandbox.systemctl("show", *(f"-p{n}" for n in names), unit, check=False)
        values = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        return {n: values.get(n, "") for n in names}

    def ensure_server(self, lane: Lane, write_timeout: str) -> None:
        wanted = lane.server_unit(write_timeout)
        running = self.sandbox.systemctl(
            "list-units", "--plain", "--no-legend", f"webdav-{lane.name}@*", check=False
        ).stdout.split()
        for unit in running:
            if unit.startswith(f"webdav-{lane.name}@") and unit != wanted:
                self.sandbox.systemctl("stop", unit)
        self.sandbox.systemctl("start", wanted)
        deadline = time.monotonic() + 10
        while not listening(lane.port):
            if time.monotonic() > deadline:
                raise SandboxError(f"{wanted} does not listen:\n{self.sandbox.journal(wanted)}")
            time.sleep(0.05)

    def server_journal_since(self, unit: str, wall: float) -> dict[str, Any]:
        """The server's requests since ``wall`` (GET, PROPFIND) and any other line."""
        self.sandbox.exec("journalctl", "--sync", timeout=10)
        out = self.sandbox.exec(
            "journalctl", "--no-pager", "-q", "-o", "cat", "-u", unit, "--since", f"@{int(wall)}"
        ).stdout
        requests: Counter[str] = Counter()
        other = []
        for line in out.splitlines():
            found = re.search(r": (GET|PROPFIND|HEAD) from ", line)
            if found:
                requests[found.group(1)] += 1
            elif line.strip():
                other.append(line.strip())
        return {"requests": dict(requests), "other": other[:20]}

    def wire_bytes(self, unit: str, since: float) -> int:
        value = self.props(unit, "IPIngressBytes")["IPIngressBytes"]
        if value.isdigit():
            return int(value)
        # the unit is gone: its "Consumed ..., received X IP traffic" line (1 decimal)
        self.sandbox.exec("journalctl", "--sync", timeout=10)
        out = self.sandbox.exec(
            "journalctl", "--no-pager", "-q", "-o", "cat", "-u", unit, "--since", f"@{int(since)}"
        ).stdout
        found = _IP_LINE.findall(out)
        if not found:
            return 0
        number, unit_suffix = found[-1]
        scale = {"B": 1, "K": 1024, "M": MIB, "G": 1024 * MIB, "T": 1024 * 1024 * MIB}
        return int(float(number) * scale[unit_suffix])

    # -- one run

    def start_copy(self, lane: Lane, timeout: str) -> JsonLog:
        log = lane.log(timeout)
        log.unlink(missing_ok=True)
        self.sandbox.systemctl("start", lane.copy_unit(timeout))
        return JsonLog(log)

    def wait_done(self, unit: str, log: JsonLog, deadline: float) -> dict[str, str] | None:
        while time.monotonic() < deadline:
            log.poll()
            state = self.props(unit, "SubState", "ActiveState")
            if state["SubState"] in ("exited", "failed") or state["ActiveState"] in (
                "failed",
                "inactive",
            ):
                time.sleep(0.2)  # the last log lines
                log.poll()
                return self.props(unit, "ExecMainStatus", "ExecMainCode", "Result", "SubState")
            time.sleep(0.1)
        return None

    def mid_flight(
        self, log: JsonLog, lane: Lane, early: bool = False
    ) -> tuple[int, list[str]] | None:
        """A large file 20-80 % done (``early``: 3-20 %, so that it stays in flight)."""
        stats = log.last_stats()
        if not stats:
            return None
        big = self.args.big_mib * MIB // 2
        if not early and stats.get("bytes", 0) < 0.15 * lane.source_bytes:
            return None
        low, high = (3, 20) if early else (20, 80)
        flying = [t for t in stats.get("transferring") or [] if t.get("size", 0) >= big]
        if not any(low <= (t.get("percentage") or 0) <= high for t in flying):
            return None
        names = [
            f"{t['name']} {t.get('percentage')}% of {t['size'] // MIB} MiB"
            for t in stats.get("transferring") or []
        ]
        return int(stats.get("bytes", 0)), names

    @staticmethod
    def status_text(props: dict[str, str] | None) -> str:
        if props is None:
            return "hung"
        code = {"1": "exit", "2": "killed", "3": "dumped"}.get(props["ExecMainCode"], "code")
        if props["ExecMainCode"] in ("", "0"):
            return f"{props['Result']}"
        return f"{code} {props['ExecMainStatus']} ({props['Result']})"

    def run(self, case: Case, lane_name: str = LANES[0]) -> Outcome:
        lane = self.lanes[lane_name]
        timeout = fmt_seconds(case.timeout)
        unit = lane.copy_unit(timeout)
        out = Outcome(
            case.timeout,
            case.factor,
            case.freeze,
            case.mode,
            case.server_write_timeout,
            case.cycles,
            lane.source_bytes,
        )
        started = time.monotonic()
        shutil.rmtree(lane.dest, ignore_errors=True)
        self.ensure_server(lane, case.server_write_timeout)
        budget = 120 + 3 * case.timeout
        log = self.start_copy(lane, timeout)
        wall_start = time.time()

        if case.mode == "none":
            props = self.wait_done(unit, log, time.monotonic() + budget)
            out.finished = props is not None and props["ExecMainStatus"] == "0"
            out.exit_status = self.status_text(props)
            out.to_done = time.monotonic() - started
            out.stats_bytes = int((log.last_stats() or {}).get("bytes", 0))
            out.wire_bytes = self.wire_bytes(unit, wall_start)
            self._finish(lane, unit, out, wall_start, [log])
            out.wall_seconds = time.monotonic() - started
            return out

        # run until a large file is mid-flight, then freeze
        deadline = time.monotonic() + 90
        point = None
        while point is None and time.monotonic() < deadline:
            log.poll()
            point = self.mid_flight(log, lane, early=case.cycles > 1)
            if point is None:
                if self.props(unit, "SubState")["SubState"] != "running":
                    break
                time.sleep(0.05)
        if point is None:
            out.note = "the copy ended (or never got there) before a large file was mid-flight"
            self.wait_done(unit, log, time.monotonic() + budget)
            self.sandbox.systemctl("stop", unit, check=False)
            out.wall_seconds = time.monotonic() - started
            return out
        self.sandbox.systemctl("freeze", unit)
        frozen_at = time.monotonic()
        wall_freeze = time.time()
        out.froze_mid_flight = True
        out.bytes_at_freeze, out.in_flight = point
        server_unit = lane.server_unit(case.server_write_timeout)

        time.sleep(min(1.0, case.freeze / 3))
        out.server["at_freeze"] = connection_view(lane.port)
        time.sleep(max(0.0, frozen_at + case.freeze - 0.3 - time.monotonic()))
        out.server["before_thaw"] = connection_view(lane.port)
        wire_frozen = self.wire_bytes(unit, wall_start)
        time.sleep(max(0.0, frozen_at + case.freeze - time.monotonic()))

        logs = [log]
        remaining = lane.source_bytes - out.bytes_at_freeze
        if self.baseline_seconds and case.cycles == 1:
            out.unfrozen_remaining = self.baseline_seconds * remaining / self.source_bytes
        wall_after = time.time()
        if case.mode == "thaw":
            frozen = True
            for cycle in range(2, case.cycles + 1):
                self.sandbox.systemctl("thaw", unit)
                frozen = False
                time.sleep(CYCLE_RUN)
                if self.props(unit, "SubState")["SubState"] != "running":
                    out.note = f"the copy ended before freeze {cycle}"
                    break
                self.sandbox.systemctl("freeze", unit)
                frozen = True
                time.sleep(case.freeze)
            if frozen:
                self.sandbox.systemctl("thaw", unit)
            thawed = time.monotonic()
            time.sleep(min(1.0, case.timeout / 2))
            out.server["after_thaw"] = connection_view(lane.port)
            props = self.wait_done(unit, log, thawed + budget)
            out.to_done = time.monotonic() - thawed if props else None
            out.finished = props is not None and props["ExecMainStatus"] == "0"
            out.exit_status = self.status_text(props)
            out.stats_bytes = int((log.last_stats() or {}).get("bytes", 0))
            out.wire_bytes = self.wire_bytes(unit, wall_start)
        else:
            stop_at = time.monotonic()
            self.sandbox.systemctl("stop", unit, timeout=120)
            out.stop_seconds = time.monotonic() - stop_at
            first = self.props(unit, "ExecMainStatus", "ExecMainCode", "Result")
            out.first_run_exit = self.status_text(first)
            log.poll()
            first_bytes = int((log.last_stats() or {}).get("bytes", 0))
            # the stopped run's bytes: the figure of its "Consumed" line if systemd logged
            # one (it counts what rclone read after SIGTERM), else the one read while frozen
            out.wire_bytes = max(wire_frozen, self.wire_bytes(unit, wall_start))
            first_log = lane.log(timeout).with_suffix(".run1.log")
            lane.log(timeout).rename(first_log)
            log.path = first_log
            restart_wall = time.time()
            second = self.start_copy(lane, timeout)
            logs.append(second)
            props = self.wait_done(unit, second, stop_at + budget)
            out.to_done = time.monotonic() - stop_at if props else None
            out.finished = props is not None and props["ExecMainStatus"] == "0"
            out.exit_status = self.status_text(props)
            out.stats_bytes = first_bytes + int((second.last_stats() or {}).get("bytes", 0))
            out.wire_bytes += self.wire_bytes(unit, restart_wall)
        out.server["journal"] = self.server_journal_since(server_unit, wall_freeze)
        self._finish(lane, unit, out, wall_after, logs)
        out.wall_seconds = time.monotonic() - started
        return out

    def _finish(
        self, lane: Lane, unit: str, out: Outcome, since_wall: float, logs: list[JsonLog]
    ) -> None:
        """What was logged since ``since_wall``; stop the unit; `rclone check`."""
        counts: Counter[str] = Counter()
        samples: list[str] = []
        firsts: list[float] = []
        reopens: Counter[str] = Counter()
        for each in logs:
            each.poll()
            c, s, first, r = classify(each.since(since_wall - 0.05))
            counts += c
            samples += s
            reopens += r
            if first is not None:
                firsts.append(first)
        out.errors = dict(counts)
        out.most_reopens = max(reopens.values(), default=0)
        if firsts:
            out.first_error_after = round(min(firsts) - since_wall, 2)
        out.samples = samples[:10]
        if self.props(unit, "ActiveState")["ActiveState"] != "inactive":
            self.sandbox.systemctl("stop", unit, check=False)
            self.sandbox.systemctl("reset-failed", unit, check=False)
        check = subprocess.run(
            [self.rclone, "check", str(lane.source), str(lane.dest)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode == 0:
            out.check = "clean"
        else:
            found = re.search(r"(\d+) differences found", check.stderr)
            out.check = f"{found.group(1) if found else '?'} differences"
        shutil.rmtree(lane.dest, ignore_errors=True)


# --------------------------------------------------------------------------- report


def wire_resent(r: Outcome, baseline: Outcome) -> float:
    """Bytes received beyond what an unfrozen copy of the same source receives."""
    return r.wire_bytes - r.source_bytes * baseline.wire_bytes / baseline.source_bytes


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def table(results: list[Outcome], baseline: Outcome) -> str:
    head = (
        "| --timeout | frozen | then | finished | exit | logged after thaw/stop | "
        "re-sent (rclone stats) | re-sent (wire) | thaw/stop → done | unfrozen needs | "
        "check | server side during the freeze |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in results:
        if not r.froze_mid_flight:
            lines.append(f"| {fmt_seconds(r.timeout)} | {r.factor:g}xT | {label(r)} | {r.note} |")
            continue
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "nothing"
        if r.first_error_after is not None:
            errors += f" (first {r.first_error_after:+.2f} s)"
        if r.most_reopens > 1:
            errors += f"; one file re-opened {r.most_reopens} times"
        if r.note:
            errors += f"; {r.note}"
        stats_extra = r.stats_bytes - r.source_bytes
        wire_extra = wire_resent(r, baseline)
        exit_text = r.exit_status
        if r.mode == "stop":
            exit_text = (
                f"stopped: {r.first_run_exit} in {r.stop_seconds:.2f}s; restart: {exit_text}"
            )
        server = server_text(r)
        lines.append(
            f"| {fmt_seconds(r.timeout)} | {r.factor:g}xT = {fmt_seconds(r.freeze)} | {label(r)} | "
            f"{'yes' if r.finished else 'NO'} | {exit_text} | {errors} | "
            f"{mib(stats_extra)} MiB | {mib(wire_extra)} MiB | "
            f"{'-' if r.to_done is None else f'{r.to_done:.1f} s'} | "
            f"{'-' if r.unfrozen_remaining is None else f'{r.unfrozen_remaining:.1f} s'} | "
            f"{r.check} | {server} |"
        )
    return "\n".join(lines)


def server_text(r: Outcome) -> str:
    at = r.server.get("at_freeze", {})
    before = r.server.get("before_thaw", {})
    if not at:
        return "-"
    gone = set(at.get("client_ports", [])) - set(before.get("client_ports", []))
    states = ",".join(f"{k} {v}" for k, v in sorted(before.get("server_states", {}).items()))
    text = (
        f"{states or 'no connection'}; server Send-Q {mib(before.get('server_send_q', 0))} MiB, "
        f"client Recv-Q {mib(before.get('client_recv_q', 0))} MiB"
    )
    if gone:
        text += f"; {len(gone)} closed"
    if r.server.get("journal", {}).get("other"):
        text += f"; server logged {len(r.server['journal']['other'])} other line(s)"
    return text


# --------------------------------------------------------------------------- main


def parse_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def label(r: Outcome) -> str:
    text = r.mode
    if r.cycles > 1:
        text += f" (x{r.cycles}, {CYCLE_RUN:g} s running between)"
    if r.server_write_timeout != "1h":
        text += f" (server drops a response after {r.server_write_timeout})"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeouts", default="5,10", help="rclone --timeout values, seconds")
    parser.add_argument("--factors", default="0.5,1,2,5,10", help="freeze = factor x timeout")
    parser.add_argument("--modes", default="thaw,stop", help="thaw, stop or both")
    parser.add_argument(
        "--long",
        action="store_true",
        help="also rclone's default --timeout 5m, frozen for --long-factors x 5m (slow)",
    )
    parser.add_argument("--long-factors", default="0.5,1.2")
    parser.add_argument(
        "--server-drop",
        default="30s",
        help="also thaw the largest factor of each --timeout with the servers' "
        "--server-write-timeout at this (a server that drops a stalled response; "
        "rclone's default is 1h); '' to skip",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=10,
        help="also freeze one copy (of a --cycle-mib file) this many times for --cycle-factor "
        f"x the first --timeout, {CYCLE_RUN:g} s of running between (rclone re-opens a "
        "transfer at most --low-level-retries = 10 times); 0 to skip",
    )
    parser.add_argument("--cycle-factor", type=float, default=1.5)
    parser.add_argument(
        "--cycle-mib", type=int, default=240, help="the file in flight in the --cycles case"
    )
    parser.add_argument("--cycle-rate", default="5M", help="its server's --bwlimit")
    parser.add_argument("--rate", default="25M", help="the WebDAV server's --bwlimit")
    parser.add_argument("--big-files", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=80)
    parser.add_argument("--small-files", type=int, default=60, help="of 1 MiB each")
    parser.add_argument("--serial", action="store_true", help="one case at a time")
    parser.add_argument("--json", type=Path, help="write every outcome here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root (a systemd sandbox needs namespaces and cgroups)")
    rclone = shutil.which("rclone")
    if rclone is None:
        parser.error("rclone is not installed (apt-get install rclone)")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or not set(modes) <= {"thaw", "stop"}:
        parser.error("--modes: thaw and/or stop")
    timeouts = parse_list(args.timeouts)
    factors = parse_list(args.factors)
    if not timeouts or not factors:
        parser.error("--timeouts and --factors need a value each")

    pairs = [(t, k) for t in timeouts for k in factors]
    if args.long:
        pairs += [(300.0, k) for k in parse_list(args.long_factors)]
    groups = [[Case(t, k, m) for m in modes] for t, k in pairs]
    if args.server_drop and "thaw" in modes:
        groups.append([Case(t, max(factors), "thaw", args.server_drop) for t in timeouts])
    if args.cycles > 1 and "thaw" in modes:
        groups.append(
            [Case(timeouts[0], args.cycle_factor, "thaw", cycles=args.cycles, lane=CYCLE_LANE)]
        )
    if args.serial:
        groups = [[case] for group in groups for case in group]
    frozen = sum(max(c.freeze * c.cycles for c in g) for g in groups)
    print(
        f"{sum(map(len, groups))} case(s) in {len(groups)} group(s) run side by side; frozen "
        f"for {frozen / 60:.1f} min in all, plus about 20 s of copying per group",
        flush=True,
    )

    rclone_version = subprocess.run(
        [rclone, "version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    results: list[Outcome] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="spaceguard-freeze-") as tmp:
        bench = Bench(args, Path(tmp), rclone)
        try:
            bench.setup()
            print(
                f"{rclone_version}; source {mib(bench.source_bytes)} MiB "
                f"({args.big_files} x {args.big_mib} MiB + {args.small_files} x 1 MiB), "
                f"server --bwlimit {args.rate}; copy with --timeout T and the defaults "
                "--transfers 4 --contimeout 1m --low-level-retries 10 --retries 3",
                flush=True,
            )
            baseline = bench.run(Case(timeouts[0], 0.0, "none"))
            bench.baseline_seconds = baseline.to_done or 0.0
            print(
                f"baseline (no freeze): {baseline.exit_status}, {bench.baseline_seconds:.1f} s, "
                f"rclone stats {mib(baseline.stats_bytes)} MiB, wire "
                f"{mib(baseline.wire_bytes)} MiB, check {baseline.check}",
                flush=True,
            )
            with ThreadPoolExecutor(max_workers=len(LANES)) as pool:
                for group in groups:
                    lanes = [case.lane or LANES[i] for i, case in enumerate(group)]
                    for outcome in pool.map(bench.run, group, lanes):
                        results.append(outcome)
                        print(
                            f"  T={fmt_seconds(outcome.timeout)} frozen {outcome.factor:g}xT "
                            f"{label(outcome)}: finished={outcome.finished} "
                            f"{outcome.exit_status} errors={outcome.errors} "
                            f"to_done={outcome.to_done and round(outcome.to_done, 1)} "
                            f"wire+={mib(wire_resent(outcome, baseline))} MiB "
                            f"check={outcome.check} ({outcome.wall_seconds:.0f} s)",
                            flush=True,
                        )
        finally:
            bench.sandbox.down()
    print()
    print(table(results, baseline))
    print()
    print("What rclone logged after the thaw / stop (one line per kind):")
    for r in results:
        if r.samples:
            print(f"  T={fmt_seconds(r.timeout)} frozen {r.factor:g}xT, {label(r)}:")
            for sample in r.samples:
                print(f"    {sample}")
        other = r.server.get("journal", {}).get("other", [])
        if other:
            print(f"  its WebDAV server's journal since the freeze ({len(other)} lines):")
            for line in other[:4]:
                print(f"    {line[:200]}")
    print()
    print(summary(results, baseline))
    print(f"\nbench ran {(time.monotonic() - began) / 60:.1f} min")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"baseline": asdict(baseline), "results": [asdict(r) for r in results]},
                indent=1,
            )
        )
    return 0


def summary(results: list[Outcome], baseline: Outcome) -> str:
    """The figures a max_freeze default rests on, from what was measured."""
    lines = []
    plain = [r for r in results if r.froze_mid_flight and r.cycles == 1]
    plain = [r for r in plain if r.server_write_timeout == "1h"]
    thaws = [r for r in plain if r.mode == "thaw"]
    stops = [r for r in plain if r.mode == "stop"]
    clean = [r for r in thaws if not r.errors]
    broken = [r for r in thaws if r.errors]
    if clean:
        freezes = ", ".join(f"{r.factor:g}x{fmt_seconds(r.timeout)}" for r in clean)
        lines.append(f"thawed without a logged error: {freezes}")
    if broken:
        lines.append(
            "thawed with errors: "
            + "; ".join(
                f"{r.factor:g}x{fmt_seconds(r.timeout)}: "
                + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))
                for r in broken
            )
        )
    for name, group in (("thaw", thaws), ("stop+restart", stops)):
        if not group:
            continue
        extra = [wire_resent(r, baseline) / MIB for r in group]
        stats = [(r.stats_bytes - r.source_bytes) / MIB for r in group]
        late = [
            r.to_done - r.unfrozen_remaining
            for r in group
            if r.to_done is not None and r.unfrozen_remaining is not None
        ]
        done = sum(r.finished for r in group)
        checks = sum(r.check == "clean" for r in group)
        lines.append(
            f"{name}: {done}/{len(group)} finished, {checks}/{len(group)} checks clean; "
            f"re-sent {min(stats):.1f} to {max(stats):.1f} MiB by rclone's stats, "
            f"{min(extra):.1f} to {max(extra):.1f} MiB over the wire; "
            + (
                f"thaw/stop to done {min(late):+.1f} to {max(late):+.1f} s against unfrozen"
                if late
                else ""
            )
        )
    for r in results:
        if r.froze_mid_flight and (r.cycles > 1 or r.server_write_timeout != "1h"):
            lines.append(
                f"{label(r)}, {r.factor:g}x{fmt_seconds(r.timeout)}: finished={r.finished} "
                f"({r.exit_status}), most re-opens of one file {r.most_reopens}, "
                f"re-sent {mib(r.stats_bytes - r.source_bytes)} MiB (stats) / "
                f"{mib(wire_resent(r, baseline))} MiB (wire), check {r.check}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
