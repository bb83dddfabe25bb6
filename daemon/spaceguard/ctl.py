"""spaceguardctl: see and steer the guard through its control socket, like systemctl.

    spaceguardctl status                      volumes and migrations, as tables
    spaceguardctl pause alice --reason "..."  an operator hold: the guard never resumes it
    spaceguardctl --json incidents            the raw result, for scripts

Exit codes: 0 ok · 1 the guard refused or the request failed · 2 usage · 3 cannot connect ·
4 forbidden. Errors are one line on stderr, `spaceguardctl: <message>`.

Standard library only (and the pure `protocol` it shares with the server), so it runs with any
python3 ≥ 3.11 even where the daemon's dependencies are not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import __version__
from .protocol import encode_request
from .quantities import format_size

DEFAULT_SOCKET = "/run/spaceguard/control.sock"
DEFAULT_TIMEOUT = 30.0  # operator verbs wait for the guard to act on the unit
RESCAN_TIMEOUT = 700.0  # `usage --rescan` waits for a scan (usage_budget is at most 10m)
MAX_REPLY_BYTES = 64 * 1024 * 1024

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANNOT_CONNECT = 3
EXIT_FORBIDDEN = 4


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


# --- talking to the guard ------------------------------------------------------------------


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        reason = "no such socket (is spaceguard running? is --socket right?)"
    except ConnectionRefusedError:
        reason = (
            "connection refused (the socket exists but nothing listens: is spaceguard running?)"
        )
    except PermissionError:
        reason = (
            "permission denied (you need to be in the socket's group, "
            "spaceguard's reader or admin group, or root)"
        )
    except TimeoutError:
        reason = f"timed out after {timeout:g} s (the guard is not accepting connections)"
    except OSError as error:
        reason = error.strerror or str(error)
    else:
        return sock
    sock.close()
    raise CtlError(f"cannot connect to {path}: {reason}", EXIT_CANNOT_CONNECT)


def call(path: str, verb: str, args: Mapping[str, Any], timeout: float) -> Any:
    """Send one request and return its result; raise CtlError for anything else."""
    deadline = time.monotonic() + timeout
    sock = _connect(path, timeout)
    try:
        # a guard that answered at once and closed ("busy"): its answer is still there
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(encode_request(verb, args))
        received = bytearray()
        while b"\n" not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            if len(received) > MAX_REPLY_BYTES:
                raise CtlError(f"the reply is larger than {MAX_REPLY_BYTES} bytes")
    except TimeoutError:
        raise CtlError(f"{verb}: no reply within {timeout:g} s (try --timeout)") from None
    except OSError as error:
        raise CtlError(f"{verb}: connection lost: {error.strerror or error}") from None
    finally:
        sock.close()
    line, newline, _ = bytes(received).partition(b"\n")
    if not newline:
        raise CtlError(f"{verb}: the guard closed the connection without replying")
    try:
        reply = json.loads(line)
    except ValueError:
        raise CtlError(f"{verb}: the guard sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise CtlError(f"{verb}: the guard sent a reply this spaceguardctl cannot read")
    if reply["ok"]:
        return reply.get("result")
    failure = reply.get("error")
    if not isinstance(failure, dict):
        failure = {}
    code, message = str(failure.get("code", "?")), str(failure.get("message", "request failed"))
    raise CtlError(_printable(message), EXIT_FORBIDDEN if code == "forbidden" else EXIT_FAILED)


# --- rendering -------------------------------------------------------------------------------


def _printable(text: str, keep_newlines: bool = False) -> str:
    """Escape control characters: log lines and reasons must not drive the terminal."""
    kept = "\n\t" if keep_newlines else ""
    return "".join(
        char if char.isprintable() or char in kept else repr(char)[1:-1] for char in text
    )


def _cell(value: object, limit: int = 0) -> str:
    text = "-" if value is None or value == "" else _printable(str(value))
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def human_bytes(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return "-"
    return format_size(float(value))


def human_duration(seconds: object) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds != seconds:
        return "-"
    if seconds == float("inf"):
        return "never"
    total = int(max(0.0, seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def relative_time(timestamp: object, now: float) -> str:
    """A wall-clock timestamp as "5m ago" or "in 2m"."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not timestamp:
        return "-"
    delta = now - float(timestamp)
    return f"{human_duration(delta)} ago" if delta >= 0 else f"in {human_duration(-delta)}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)
    ]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]
    return "\n".join(lines)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _volume_row(volume: Mapping[str, Any]) -> list[str]:
    avail, size = _number(volume.get("avail_bytes")), _number(volume.get("size_bytes"))
    avail_files, files = _number(volume.get("avail_files")), _number(volume.get("files"))
    percent = f"{100 * avail / size:.1f}%" if avail is not None and size else "-"
    inodes = "-"
    if avail_files is not None:
        inodes = f"{int(avail_files):,}"
        if files:
            inodes += f" ({100 * avail_files / files:.1f}%)"
    rate = _number(volume.get("fill_rate"))
    fill_rate = "-" if rate is None else f"{human_bytes(rate)}/s"
    to_pause = _number(volume.get("seconds_to_pause"))
    if volume.get("low"):
        time_to_pause = "paused"
    elif to_pause is None:
        time_to_pause = "-"
    else:
        time_to_pause = "now" if to_pause <= 0 else human_duration(to_pause)
    if volume.get("up") is False:
        state = "UNAVAILABLE" + (f": {volume['error']}" if volume.get("error") else "")
    elif volume.get("low"):
        state = "LOW" + (f": {volume['low_reason']}" if volume.get("low_reason") else "")
    else:
        state = "ok"
    thresholds = [
        f"{label} {volume[key]}"
        for label, key in (("pause <", "pause_below"), ("resume >", "resume_above"))
        if volume.get(key)
    ]
    if thresholds and state == "ok":
        state += f" ({', '.join(thresholds)})"
    return [
        _cell(volume.get("name")),
        _cell(volume.get("path")),
        _cell(human_bytes(avail) if avail is not None else None),
        percent,
        inodes,
        fill_rate,
        time_to_pause,
        _cell(state, 60),
    ]


def _hold_text(hold: object, now: float) -> str:
    if not isinstance(hold, dict):
        return "-"
    by, reason, note = hold.get("by") or "?", hold.get("reason") or "", hold.get("note") or ""
    text = str(by) + (f"/{reason}" if reason and reason != by else "")
    if note:
        text += f": {note}"
    since = relative_time(hold.get("since"), now)
    return text + (f", {since}" if since != "-" else "")


def _failure_text(failure: object, now: float) -> str:
    if not isinstance(failure, dict):
        return "-"
    parts = [f"{failure.get('class') or '?'}/{failure.get('trigger') or '?'}"]
    if failure.get("phase"):
        parts.append(str(failure["phase"]))
    if failure.get("next_retry_at"):
        parts.append(f"retry {relative_time(failure['next_retry_at'], now)}")
    if failure.get("incident"):
        parts.append(f"incident {failure['incident']}")
    if failure.get("detail"):
        parts.append(str(failure["detail"]))
    return ", ".join(parts)


def _item_errors_text(items: object) -> str:
    if not isinstance(items, dict) or not items.get("total"):
        return "-"
    return str(items["total"])


def _migration_row(migration: Mapping[str, Any], now: float) -> list[str]:
    retries = migration.get("retries")
    retry_text = "-" if retries is None else str(retries)
    if retries is not None and migration.get("max_retries") is not None:
        retry_text += f"/{migration['max_retries']}"
    return [
        _cell(migration.get("account")),
        _cell(migration.get("unit")),
        _cell(migration.get("state")),
        _cell(_hold_text(migration.get("hold"), now), 60),
        _cell(_failure_text(migration.get("failure"), now), 100),
        retry_text,
        _item_errors_text(migration.get("item_errors")),
        human_bytes(migration.get("transferred_bytes")),
        relative_time(migration.get("last_progress_at"), now),
    ]


def render_status(status: Mapping[str, Any], now: float) -> str:
    head = f"spaceguard {_cell(status.get('version'))}"
    if "ready" in status:
        head += ": ready" if status["ready"] else ": starting"
    if "bus_connected" in status:
        head += ", D-Bus " + ("connected" if status["bus_connected"] else "DISCONNECTED")
    if status.get("freeze_path") == "helper":
        head += ", freezing through spaceguard-freezer"
    lines = [head]
    if status.get("config"):
        lines.append(f"config: {_cell(status['config'])}")
    for key, label in (("config_problem", "config problem"), ("state_problem", "state problem")):
        if status.get(key):
            lines.append(f"{label}: {_cell(status[key])}")
    volumes = [v for v in status.get("volumes") or [] if isinstance(v, dict)]
    lines += ["", "VOLUMES"]
    lines.append(
        table(
            [
                "NAME",
                "PATH",
                "FREE",
                "FREE %",
                "INODES FREE",
                "FILL RATE",
                "TIME TO PAUSE",
                "STATE",
            ],
            [_volume_row(v) for v in volumes],
        )
        if volumes
        else "  (none)"
    )
    migrations = [m for m in status.get("migrations") or [] if isinstance(m, dict)]
    lines += ["", "MIGRATIONS"]
    lines.append(
        table(
            [
                "ACCOUNT",
                "UNIT",
                "STATE",
                "PAUSED BY / REASON / SINCE",
                "FAILURE",
                "RETRIES",
                "ITEM ERRORS",
                "TRANSFERRED",
                "LAST PROGRESS",
            ],
            [_migration_row(m, now) for m in migrations],
        )
        if migrations
        else "  (none)"
    )
    notes = [note for note in status.get("diagnostics") or [] if isinstance(note, str)]
    if notes:
        lines += ["", "NOTES"] + [f"  {_cell(note)}" for note in notes]
    return "\n".join(lines) + "\n"


def _utc(timestamp: object) -> str:
    number = _number(timestamp)
    if number is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(number))
    except (OverflowError, OSError, ValueError):
        return "-"


def render_incidents(incidents: Sequence[Any]) -> str:
    rows = [
        [
            _cell(item.get("id")),
            _utc(item.get("time")),
            _cell(item.get("account")),
            _cell(item.get("class")),
            _cell(item.get("trigger")),
            _cell(item.get("outcome"), 40),
            _cell(item.get("acked_by") or "no"),
            _cell(item.get("detail"), 60),
        ]
        for item in incidents
        if isinstance(item, dict)
    ]
    if not rows:
        return "no incidents\n"
    return (
        table(
            ["ID", "TIME (UTC)", "ACCOUNT", "CLASS", "TRIGGER", "OUTCOME", "ACKED", "DETAIL"], rows
        )
        + "\n"
    )


def _growth(item: Mapping[str, Any]) -> str:
    change, span = _number(item.get("growth_bytes")), _number(item.get("growth_seconds"))
    if change is None or span is None:
        return "-"
    return f"{'+' if change >= 0 else '-'}{human_bytes(abs(change))} in {human_duration(span)}"


def _usage_volume(report: Mapping[str, Any], now: float) -> list[str]:
    head = f"{_cell(report.get('volume'))} ({_cell(report.get('path'))})"
    scan = report.get("scan")
    running = (
        f"; a scan is running (since {relative_time(report.get('scanning_since'), now)})"
        if report.get("scanning")
        else ""
    )
    lines = []
    if report.get("error"):
        lines.append(f"  last scan failed: {_cell(report['error'])}")
    if not isinstance(scan, dict):
        return [f"{head}: no scan yet{running}", *lines]
    age = _number(scan.get("age_seconds"))
    state = "complete" if scan.get("complete") else f"PARTIAL: {_cell(scan.get('cut'))}"
    lines.insert(
        0,
        f"{head}: figures {human_duration(age)} old (scan by {_cell(scan.get('trigger'))}, "
        f"{_number(scan.get('duration_seconds')) or 0:.1f}s, "
        f"{int(_number(scan.get('entries')) or 0):,} entries, {state}){running}",
    )
    depth = report.get("depth", 1)
    rows = [
        [
            human_bytes(item.get("bytes")) + ("" if item.get("complete", True) else "+"),
            _growth(item),
            _cell(item.get("path"), 120) + ("/" if item.get("is_dir") else ""),
        ]
        for item in scan.get("consumers") or []
        if isinstance(item, dict)
    ]
    unexplained = _number(scan.get("unexplained_bytes"))
    rows.append(
        [
            human_bytes(max(0.0, unexplained)) if unexplained is not None else "?",
            "-",
            "(not explained by any directory: deleted-but-open files, other mounts' shadows, "
            f"metadata; {human_bytes(scan.get('reserved_bytes'))} more reserved for root)",
        ]
    )
    lines += ["", f"  LARGEST (depth {depth})", _indent(table(["SIZE", "GROWTH", "PATH"], rows))]
    destinations = [d for d in scan.get("destinations") or [] if isinstance(d, dict)]
    if destinations:
        lines += ["", "  MIGRATION DESTINATIONS"]
        lines.append(
            _indent(
                table(
                    ["ACCOUNT", "SIZE", "GROWTH", "PATH"],
                    [
                        [
                            _cell(d.get("account")),
                            human_bytes(d.get("bytes"))
                            if d.get("bytes") is not None
                            else _cell(d.get("note"), 60),
                            _growth(d),
                            _cell(d.get("path"), 120),
                        ]
                        for d in destinations
                    ],
                )
            )
        )
    candidates = [c for c in scan.get("candidates") or [] if isinstance(c, dict)]
    lines += ["", "  RECLAIM CANDIDATES (listed only: the guard deletes nothing)"]
    if candidates:
        lines.append(
            _indent(
                table(
                    ["KIND", "FREES", "MODIFIED", "PATH"],
                    [
                        [
                            _cell(c.get("kind")),
                            human_bytes(c.get("bytes")),
                            relative_time(c.get("mtime"), now),
                            _cell(c.get("path"), 120),
                        ]
                        for c in candidates
                    ],
                )
            )
        )
    else:
        lines.append("    (none found)")
    notes = []
    if scan.get("other_mounts"):
        notes.append(
            "not crossed (other file systems): " + ", ".join(map(_cell, scan["other_mounts"]))
        )
    for key, label in (
        ("unreadable", "unreadable directories"),
        ("vanished", "removed during the scan"),
    ):
        if scan.get(key):
            notes.append(f"{label}: {scan[key]}")
    if scan.get("hardlinks"):
        notes.append(f"hard links counted once: {scan['hardlinks']} further links")
    notes += [f"error: {_cell(error)}" for error in scan.get("errors") or []]
    if notes:
        lines += ["", *(f"  {note}" for note in notes)]
    return lines


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def render_usage(result: Mapping[str, Any], now: float) -> str:
    blocks = [
        "\n".join(_usage_volume(report, now))
        for report in result.get("volumes") or []
        if isinstance(report, dict)
    ]
    return "\n\n".join(blocks or ["no volumes"]) + "\n"


def render(verb: str, result: Any, now: float) -> str:
    """The human rendering of a verb's result."""
    if verb == "status" and isinstance(result, dict):
        return render_status(result, now)
    if verb == "usage" and isinstance(result, dict):
        return render_usage(result, now)
    if verb == "incidents" and isinstance(result, list):
        return render_incidents(result)
    if verb == "show" and isinstance(result, dict) and isinstance(result.get("text"), str):
        text = _printable(result["text"], keep_newlines=True)
        return text if text.endswith("\n") else text + "\n"
    if verb == "version" and isinstance(result, dict):
        return (
            f"spaceguardctl {__version__}\nspaceguard {_cell(result.get('version'))} "
            f"(protocol {_cell(result.get('protocol'))})\n"
        )
    if isinstance(result, dict) and isinstance(result.get("message"), str) and len(result) == 1:
        return _printable(result["message"]) + "\n"
    return json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


# --- the command line --------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError("must be above 0 (seconds)")
    return value


def build_parser() -> argparse.ArgumentParser:
    # the common options are accepted before and after the verb, as systemctl does. They
    # default to SUPPRESS (the parsers share these option objects, so a default would let
    # the verb's parser overwrite a value given before the verb); parse() fills them in.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--socket",
        metavar="PATH",
        help=f"control socket (default $SPACEGUARD_SOCKET or {DEFAULT_SOCKET})",
    )
    common.add_argument("--json", action="store_true", help="print the raw result as JSON")
    common.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help=f"how long to wait for the guard (default {DEFAULT_TIMEOUT:g})",
    )
    parser = argparse.ArgumentParser(
        prog="spaceguardctl",
        parents=[common],
        description="See and steer spaceguard, which guards the rclone migrations.",
        epilog="exit codes: 0 ok, 1 refused or failed, 2 usage, 3 cannot connect, 4 forbidden",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[common], help=help_text, description=help_text)

    verb("status", "volumes (free space, fill rate, time to pause) and migrations")
    pause = verb("pause", "pause a migration with an operator hold (never auto-resumed)")
    pause.add_argument("account")
    pause.add_argument("--reason", default=None, help="why (shown in status and the journal)")
    resume = verb("resume", "resume a paused migration")
    resume.add_argument("account")
    resume.add_argument(
        "--force", action="store_true", help="resume even though its volume is still low on space"
    )
    retry = verb("retry", "start a failed migration again (after an unrecoverable failure)")
    retry.add_argument("account")
    incidents = verb("incidents", "list incidents")
    incidents.add_argument("--account", default=None)
    show = verb("show", "show one incident")
    show.add_argument("incident")
    ack = verb("ack", "acknowledge an incident, or every open incident of a migration")
    ack_what = ack.add_mutually_exclusive_group(required=True)
    ack_what.add_argument("incident", nargs="?", default=None)
    ack_what.add_argument(
        "--account", default=None, help="every open incident of this migration's account"
    )
    verb("reload", "re-read the configuration (kept unchanged if the new one is invalid)")
    check = verb("check-config", "validate the configuration (or FILE) without applying it")
    check.add_argument("file", nargs="?", default=None, metavar="FILE")
    verb("version", "versions of spaceguardctl and of the running guard")
    usage = verb("usage", "what fills the volumes: largest entries, growth, reclaim candidates")
    usage.add_argument("volume", nargs="?", default=None, metavar="VOLUME")
    usage.add_argument(
        "--rescan", action="store_true", help="scan now and wait for it (else: the latest figures)"
    )
    return parser


def request_args(options: argparse.Namespace) -> dict[str, Any]:
    """The protocol arguments for the parsed command line."""
    verb = options.verb
    if verb in ("pause", "resume", "retry"):
        args: dict[str, Any] = {"account": options.account}
        if verb == "pause" and options.reason is not None:
            args["reason"] = options.reason
        if verb == "resume" and options.force:
            args["force"] = True
        return args
    if verb == "incidents":
        return {"account": options.account} if options.account else {}
    if verb == "ack" and options.account:
        return {"account": options.account}
    if verb in ("show", "ack"):
        return {"incident": options.incident}
    if verb == "check-config" and options.file:
        return {"path": os.path.abspath(options.file)}
    if verb == "usage":
        args = {"volume": options.volume} if options.volume is not None else {}
        return {**args, "rescan": True} if options.rescan else args
    return {}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    options = build_parser().parse_args(argv)
    options.socket = (
        getattr(options, "socket", None) or os.environ.get("SPACEGUARD_SOCKET") or DEFAULT_SOCKET
    )
    options.json = getattr(options, "json", False)
    rescan = options.verb == "usage" and options.rescan
    options.timeout = getattr(options, "timeout", RESCAN_TIMEOUT if rescan else DEFAULT_TIMEOUT)
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    try:
        result = call(options.socket, options.verb, request_args(options), options.timeout)
    except CtlError as error:
        print(f"spaceguardctl: {error.message}", file=sys.stderr)
        return error.exit_code
    try:
        if options.json:
            sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(render(options.verb, result, time.time()))
        sys.stdout.flush()
    except BrokenPipeError:  # `spaceguardctl status | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
