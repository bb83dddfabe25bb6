"""Pure parsing and classification of rclone logs (no I/O).

The guard reads each migration's rclone log and needs two things from it:

* **failures**, classified as transient (retry later), unrecoverable (stop and wait for
  an operator) or disk_full (scenario 3: pause and resume, never fail), and
* **progress**: bytes and files transferred, errors, elapsed time, and whether the
  batch showed any sign of forward progress (for stall detection).

Both rclone log formats are understood: the text log (``-v``/``-vv``, with or without a
date prefix, ``--stats`` blocks) and the JSON log (``--use-json-log``). Anything else on
a line (wrapper-script output, garbage) is tolerated and tested against the rules.

Speed matters: a ``-vv`` log is mostly DEBUG lines. :meth:`RcloneLogParser.feed` joins
a batch into one string and lets one compiled regex skip every DEBUG/INFO line at C
speed; only the few remaining lines are examined in Python.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import accumulate
from typing import Final

from .model import FailureClass

__all__ = [
    "DEFAULT_RULES",
    "ClassifyRule",
    "CompiledRules",
    "FailureClass",
    "LogFailure",
    "ParseResult",
    "Progress",
    "RcloneLogParser",
    "classify_exit_code",
    "compile_rules",
]


@dataclass(frozen=True)
class ClassifyRule:
    """One classification rule: a Python regex searched anywhere in a log message.

    The message is the line without its date prefix and level marker (for JSON logs:
    ``object: msg``). Matching is case-sensitive unless the pattern says ``(?i)``.

    ``keywords`` is an optional speed-up: lowercase substrings of which at least one
    must occur in the lowercased message before the regex is tried (regex alternations
    are slow in CPython; substring tests are not). Empty: the regex is always tried.
    """

    name: str
    pattern: str
    failure_class: FailureClass
    keywords: tuple[str, ...] = ()
    # "run": whatever the line names, the whole run cannot proceed (credentials, quota,
    # usage); "item": only ever one item; "": as the line's structure says
    scope: str = ""


def _http_status(code: int, reason: str) -> str:
    # rclone prints statuses as "(429 Too Many Requests)", "HTTP error 429" or
    # "StatusCode: 429"; a bare number could be a size or a file name, so require context.
    return (
        rf"(?i:\b{code} {reason}\b"
        rf"|\b(?:HTTP(?: error| status)?|status(?: ?code)?|error code)[ :=]*{code}\b)"
    )


_T = FailureClass.TRANSIENT
_U = FailureClass.UNRECOVERABLE
_D = FailureClass.DISK_FULL

# First match wins. Tiers, in order:
#  1. disk_full causes (scenario 3 owns them: pause, never fail);
#  2. explicit throttling codes: Graph and Google send some throttling as 403, which must
#     not fall into the 403 rule below;
#  3. unrecoverable causes (credentials, missing paths, quota, usage, local permissions);
#  4. transient causes (throttling, 5xx, timeouts, network);
#  5. unrecoverable *context* ("Fatal error", "Failed to create file system"): these name
#     where rclone gave up, not why, so a transient cause on the same line wins.
DEFAULT_RULES: tuple[ClassifyRule, ...] = (
    # 1. disk full on the destination
    ClassifyRule(
        "no_space_left",
        # rclone preallocates by default and then says the latter instead of ENOSPC
        r"(?i:no space left on device|file too big for remaining disk space)|\bENOSPC\b",
        _D,
        ("no space left", "enospc", "file too big for remaining"),
    ),
    ClassifyRule(
        "disk_quota_exceeded", r"(?i:disk quota exceeded)|\bEDQUOT\b", _D, ("disk quota", "edquot")
    ),
    # 2. throttling codes that may come with a 403
    ClassifyRule(
        "throttled_code",
        r"activityLimitReached|(?i:\b(?:user)?rateLimitExceeded\b|rate limit exceeded)",
        _T,
        ("activitylimitreached", "ratelimitexceeded", "rate limit exceeded"),
    ),
    # 3. unrecoverable causes
    ClassifyRule(
        "unauthorized",
        _http_status(401, "Unauthorized")
        + r"|(?i:\bunauthori[sz]ed\b)|\bInvalidAuthenticationToken\b",
        _U,
        ("401", "unauthori", "invalidauthenticationtoken"),
        scope="run",
    ),
    ClassifyRule(
        "forbidden",
        _http_status(403, "Forbidden") + r"|(?i:\bforbidden\b)|\baccessDenied\b",
        _U,
        ("403", "forbidden", "accessdenied"),
    ),
    ClassifyRule(
        "token_error",
        r"(?i:\binvalid_grant\b|\binvalid_client\b|couldn'?t fetch token|cannot fetch token"
        r"|failed to refresh token|token (?:has )?expired|expired token)|\bAADSTS\d+",
        _U,
        ("invalid_grant", "invalid_client", "fetch token", "refresh token", "expired", "aadsts"),
        scope="run",
    ),
    ClassifyRule(
        "directory_not_found",
        r"(?i:\bdirectory not found\b)",
        _U,
        ("directory not found",),
    ),
    ClassifyRule(
        "insufficient_storage",
        _http_status(507, "Insufficient Storage") + r"|\binsufficientStorage\b",
        _U,
        ("507", "insufficient"),
        scope="run",
    ),
    ClassifyRule(
        "usage_error",
        r"\bCommand \S+ needs\b|\bunknown (?:shorthand )?flag\b|\bunknown command\b"
        r"|\binvalid argument \"[^\"]*\" for \"-",
        _U,
        ("command ", "unknown ", "invalid argument"),
        scope="run",
    ),
    ClassifyRule(
        "config_error",
        r"didn't find section in config file",
        _U,
        ("didn't find section",),
        scope="run",
    ),
    # local destination problems that no retry can fix
    ClassifyRule(
        "local_permission",
        r"(?i:\bpermission denied\b|\bread-only file system\b|\bnot a directory\b)",
        _U,
        ("permission denied", "read-only file system", "not a directory"),
    ),
    # 4. transient causes
    ClassifyRule(
        "too_many_requests",
        _http_status(429, "Too Many Requests") + r"|(?i:too many requests)",
        _T,
        ("429", "too many requests"),
    ),
    ClassifyRule("throttled", r"(?i:\bthrottl(?:ed|ing|e)\b)", _T, ("throttl",)),
    ClassifyRule(
        "service_unavailable",
        _http_status(503, "Service Unavailable") + r"|\bserviceNotAvailable\b",
        _T,
        ("503", "servicenotavailable"),
    ),
    ClassifyRule(
        "server_error",
        _http_status(500, "Internal Server Error")
        + "|"
        + _http_status(502, "Bad Gateway")
        + "|"
        + _http_status(504, "Gateway Time-?out"),
        _T,
        ("500", "502", "504"),
    ),
    ClassifyRule(
        "timeout",
        r"(?i:\bi/o timeout\b|context deadline exceeded|\btimed out\b|handshake timeout"
        r"|Client\.Timeout exceeded|timeout awaiting)",
        _T,
        ("timeout", "deadline exceeded", "timed out"),
    ),
    ClassifyRule("connection_refused", r"(?i:connection refused)", _T, ("connection refused",)),
    ClassifyRule(
        "connection_reset",
        r"(?i:connection reset|\bbroken pipe\b)",
        _T,
        ("connection reset", "broken pipe"),
    ),
    # EOF only where it ends a transport error ("...: EOF", "unexpected EOF"), so a file
    # called EOF.txt is not a failure.
    ClassifyRule("transport_eof", r"\bunexpected EOF\b|: EOF(?:$|[\s)\"])", _T, ("eof",)),
    ClassifyRule(
        "network_unreachable",
        r"(?i:network is unreachable|no route to host|temporary failure in name resolution"
        r"|\bno such host\b)",
        _T,
        ("unreachable", "no route to host", "name resolution", "no such host"),
    ),
    ClassifyRule("killed", r"\bsignal: killed\b", _T, ("signal: killed",)),
    # 5. unrecoverable context
    ClassifyRule("fatal_error", r"\bFatal error\b", _U, ("fatal error",), scope="run"),
    ClassifyRule(
        "create_fs_failed",
        r"\bFailed to create file system\b",
        _U,
        ("failed to create file system",),
        scope="run",
    ),
)


@dataclass(frozen=True)
class CompiledRules:
    """Rules ready to match, in priority order (first match wins)."""

    rules: tuple[ClassifyRule, ...]
    patterns: tuple[re.Pattern[str], ...]

    def classify(self, message: str, name_end: int = 0) -> ClassifyRule | None:
        """The first rule that matches; a match that lies in message[:name_end] (the name
        of what the line is about) does not count."""
        lowered = message.lower()
        for rule, pattern in zip(self.rules, self.patterns, strict=True):
            if rule.keywords:
                for keyword in rule.keywords:
                    if keyword in lowered:
                        break
                else:
                    continue
            match = pattern.search(message)
            if match is not None and match.end() <= name_end:
                match = pattern.search(message, name_end)  # past the name only
            if match is not None:
                return rule
        return None


def compile_rules(user_rules: Iterable[ClassifyRule] = ()) -> CompiledRules:
    """Compile the user's rules first, then :data:`DEFAULT_RULES`.

    Raises ValueError naming the rule when a pattern is not a valid regex (or a rule
    is malformed: unknown class, keywords that are not lowercase strings).
    """
    rules = (*tuple(user_rules), *DEFAULT_RULES)
    patterns: list[re.Pattern[str]] = []
    for rule in rules:
        if not isinstance(rule.failure_class, FailureClass):
            raise ValueError(f"rule {rule.name!r}: unknown failure class {rule.failure_class!r}")
        if not isinstance(rule.pattern, str):
            raise ValueError(f"rule {rule.name!r}: pattern must be a string")
        for keyword in rule.keywords:
            # A keyword with capitals could never be found in the lowercased message and
            # would silently disable the rule.
            if not isinstance(keyword, str) or not keyword or keyword != keyword.lower():
                raise ValueError(
                    f"rule {rule.name!r}: keyword {keyword!r} must be a non-empty lowercase string"
                )
        try:
            patterns.append(re.compile(rule.pattern))
        except re.error as exc:
            raise ValueError(
                f"rule {rule.name!r}: invalid regular expression {rule.pattern!r}: {exc}"
            ) from exc
    return CompiledRules(rules=rules, patterns=tuple(patterns))


# Exit codes documented in rclone's docs/content/docs.md ("Exit Code").
_EXIT_CLASSES: Final[dict[int, FailureClass | None]] = {
    0: None,
    1: _U,
    2: _T,
    3: _U,
    4: _U,
    5: _T,
    6: _U,
    7: _U,
    8: _T,
    9: None,
    10: _T,
}


def classify_exit_code(code: int) -> FailureClass | None:
    """Map an rclone exit status to a failure class (None: success).

    ====  ===========================================  ==============
    code  rclone meaning                               class
    ====  ===========================================  ==============
    0     success                                      None
    1     syntax or usage error                        unrecoverable
    2     error not otherwise categorised              transient
    3     directory not found                          unrecoverable
    4     file not found                               unrecoverable
    5     temporary error (more retries might fix it)  transient
    6     less serious errors (NoRetry errors)         unrecoverable
    7     fatal error (retries won't fix it)           unrecoverable
    8     transfer exceeded (--max-transfer)           transient
    9     success, but no files were transferred       None
    10    duration exceeded (--max-duration)           transient
    ====  ===========================================  ==============

    Anything else (including a negative code or 128+N for death by signal N) is
    transient: the process was interrupted, not told that the job is impossible.
    """
    if code in _EXIT_CLASSES:
        return _EXIT_CLASSES[code]
    return _T


@dataclass(frozen=True)
class Progress:
    """rclone's latest reported totals; a field is None until rclone reported it."""

    bytes_transferred: int | None = None
    bytes_total: int | None = None
    files_transferred: int | None = None
    files_total: int | None = None
    errors: int | None = None
    elapsed_seconds: float | None = None


@dataclass(frozen=True)
class LogFailure:
    line_number: int  # 0-based index of the line in the batch given to feed()
    line: str
    failure_class: FailureClass
    rule: str
    scope: str = "run"  # "item": one item failed and rclone goes on; "run": the whole run
    object: str = ""  # the item rclone names (never classified)
    message: str = ""  # what was classified
    logged_at: float | None = None  # the line's own time (Unix seconds), when it has one


@dataclass(frozen=True)
class ParseResult:
    failures: list[LogFailure]
    progress: Progress | None  # latest known, across batches; None if never reported
    progressed: bool  # the batch showed more bytes/files, or a file was copied
    lines: int
    # ERROR-or-worse lines that no rule classified (counted for metrics, not acted on)
    unclassified_errors: int = 0
    # line numbers where rclone ended an attempt and will try again (--retries: "Attempt
    # 1/3 failed with 4 errors"): the next attempt logs the items that fail again
    attempts_ended: list[tuple[int, float | None]] = field(default_factory=list)


# Longest part of a line that is examined: logwatch caps lines at 64 KiB anyway, and a
# pathological line must not cost a regex scan of megabytes per rule.
MAX_EXAMINED_CHARS: Final = 64 * 1024

# Optional prefix before rclone's level marker: syslog priority (--log-systemd), Go log
# date/time/microseconds, file:line (--log-format shortfile/longfile).
_PREFIX = r"(?:<\d>)?(?:\d{4}/\d\d/\d\d )?(?:\d\d:\d\d:\d\d(?:\.\d+)? )?(?:[\w./-]+\.go:\d+: )?"

# A line is "boring" when it is DEBUG or INFO: nothing in it can be a failure. Every
# other line start is found by this one regex; its "\n" literal prefix lets the regex
# engine jump from line to line at C speed. The first alternative is the usual shape
# ("2025/11/23 10:00:00 DEBUG : "), checked by the positions of its separators only
# (cheaper than digit classes); the second covers --log-format and --log-systemd
# prefixes. JSON INFO lines carrying stats are found by a plain substring search.
_INTERESTING_LINE = re.compile(
    r"\n(?!..../../.. ..:..:.. (?:DEBUG : |INFO  : )"
    r"|" + _PREFIX + r"(?:DEBUG|INFO) *: "
    r'|\{"level":"(?:debug|info)")'
)
# How much of the first line the regex above needs to see (it looks at a prefix only).
_FIRST_LINE_CHECK_CHARS: Final = 256
_JSON_STATS = '"stats":{'
_TEXT_LEVEL = re.compile(
    _PREFIX + r"(EMERGENCY|ALERT|CRITICAL|ERROR|WARNING|NOTICE|INFO|DEBUG) *: ?"
)
_DATE_PREFIX = re.compile(_PREFIX)

_ERROR_LEVELS: Final = frozenset(
    {
        "EMERGENCY",
        "ALERT",
        "CRITICAL",
        "ERROR",
        "error",
        "fatal",
        "panic",
        "critical",
        "alert",
        "emergency",
    }
)
_QUIET_LEVELS: Final = frozenset({"DEBUG", "INFO", "debug", "info", "trace"})

# Continuation lines of a --stats block (they carry no level marker and no date).
_STATS_LINE_STARTS: Final = (
    "Transferred:",
    "Errors:",
    "Checks:",
    "Deleted:",
    "Renamed:",
    "Elapsed time:",
    "Transferring:",
    "Server Side ",
    " * ",
)
# Digit runs are bounded: int() refuses strings of over 4300 digits, and a figure that
# long is garbage anyway.
_STATS_AMOUNT = re.compile(
    r"Transferred:\s*([\d.]{1,24})\s*([A-Za-z]*)\s*/\s*([\d.]{1,24})\s*([A-Za-z]*)\s*(?:,|$)",
    re.ASCII,
)
_STATS_ERRORS = re.compile(r"Errors:\s*(\d{1,18})\b", re.ASCII)
_STATS_ELAPSED = re.compile(r"Elapsed time:\s*(\S+)")
_DURATION_PART = re.compile(r"(\d{1,18}(?:\.\d{1,18})?)(ms|µs|us|ns|y|w|d|h|m|s)")
_DURATION_SECONDS: Final = {
    "y": 365 * 86400.0,
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "µs": 1e-6,
    "us": 1e-6,
    "ns": 1e-9,
}
_UNIT_POWERS: Final = {"k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_COPIED = "Copied ("


def _unit_bytes(number: str, unit: str) -> int | None:
    """'1.5', 'MiB' -> bytes. rclone prints binary units (MiB; older: MBytes)."""
    try:
        value = float(number)
    except ValueError:
        return None
    power = _UNIT_POWERS.get(unit[:1], 0)
    result = value * 1024**power
    if "bit" in unit.lower():  # --stats-unit bits
        result /= 8
    return int(result) if math.isfinite(result) else None


def _duration_seconds(text: str) -> float | None:
    parts = _DURATION_PART.findall(text)
    if not parts:
        return None
    return sum(float(amount) * _DURATION_SECONDS[unit] for amount, unit in parts)


def _json_int(stats: dict[str, object], key: str) -> int | None:
    value = stats.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):  # json allows Infinity, NaN
        return None
    return int(value)


def _json_stats_line_starts(text: str) -> list[int]:
    """Offsets of the lines mentioning a JSON stats object (found by substring search,
    because the fast regex dismisses every JSON INFO line)."""
    starts: list[int] = []
    position = text.find(_JSON_STATS)
    while position >= 0:
        starts.append(text.rfind("\n", 0, position) + 1)
        line_end = text.find("\n", position)
        if line_end < 0:
            break
        position = text.find(_JSON_STATS, line_end)
    return starts


def _line_numbers(text: str, lines: Sequence[str], offsets: list[int]) -> list[int]:
    """Map ascending offsets in ``"\\n".join(lines)`` to indexes in ``lines``."""
    if text.count("\n") == len(lines) - 1:
        numbers: list[int] = []
        number = scanned = 0
        for offset in offsets:
            number += text.count("\n", scanned, offset)
            scanned = offset
            numbers.append(number)
        return numbers
    # Some "line" had a newline inside: go by the lengths of the given lines instead.
    line_starts = list(accumulate((len(line) + 1 for line in lines), initial=0))
    return [bisect_right(line_starts, offset) - 1 for offset in offsets]


# --- the structure of a line: "LEVEL : <object>: <message>" ---------------------------

ITEM: Final = "item"
RUN: Final = "run"
SUMMARY: Final = "summary"

# rclone's per-item messages (fs.Errorf(object, ...) in operations, sync, march): what
# follows ": " after the object's name. One item failed; rclone goes on with the others.
_ITEM_MESSAGE = re.compile(
    r": (?=(?:Failed to (?:copy|move|set modification time|set modtime|update|read|open"
    r"|remove|delete|mkdir|rename|hash|check|download|upload)"
    r"|failed to (?:open|read|copy|set|get|delete|remove|hash|update)"
    r"|error reading (?:source|destination) directory|error listing|Couldn't |couldn't )"
    r")"
)
# Where rclone says the whole run cannot go on, whatever object it names (the file system
# itself: "Local file system at /x: error reading source root directory: ...").
_RUN_MESSAGE = re.compile(
    r"error reading (?:source|destination) root directory|Failed to create file system"
    r"|\bFatal error\b"
)
# Summaries of item errors already seen one by one ("Attempt 1/3 failed with 2 errors
# and: <the last one>", and the final "Failed to copy with 2 errors: last error was: ..."):
# they repeat an item's message; the exit status says how the run ended.
_SUMMARY_MESSAGE = re.compile(
    r"Attempt \d+/\d+ failed with \d+ errors|Failed to \w+ with \d+ errors"
)
_ATTEMPT = re.compile(r"Attempt (\d+)/(\d+) failed with")
# rclone's last line when a run failed with one error (no level marker, no object): that
# error again, as the last attempt's summary just gave it.
_FINAL_LINE = re.compile(r"Failed to \w+: ")


def retries_after(summary: str) -> bool:
    """Whether a summary line ends an attempt that rclone follows with another one."""
    attempt = _ATTEMPT.match(summary)
    return attempt is not None and int(attempt.group(1)) < int(attempt.group(2))


def split_text(body: str) -> tuple[str, str, str]:
    """A text line after its level marker → (scope, object, message)."""
    if _SUMMARY_MESSAGE.match(body):
        return SUMMARY, "", body
    if _RUN_MESSAGE.search(body):
        return RUN, "", body
    item = _ITEM_MESSAGE.search(body)
    if item is not None and item.start() > 0:
        return ITEM, body[: item.start()], body[item.end() :]
    return RUN, "", body


def object_name(body: str) -> str:
    """What a level-marked line that no known message explains is about: rclone writes
    "<object>: <message>" whenever it names something (fs.Logf(o, ...)), and a name is
    never classified ("NOTICE: 401 Unauthorized.lnk: Can't follow symlink"). "" if none."""
    name, sep, message = body.partition(": ")
    return name if sep and message else ""


def structure_scope(message: str, obj: str) -> str:
    """The scope of a JSON log line, whose object and message are separate fields."""
    if _SUMMARY_MESSAGE.match(message):
        return SUMMARY
    if not obj or _RUN_MESSAGE.search(message):
        return RUN
    return ITEM


_NAME_BEFORE: Final = frozenset(" /\"'")
_NAME_AFTER: Final = frozenset(" :\"'")


def mask_name(message: str, name: str) -> str:
    """`message` with every whole occurrence of an item's name (alone, or as the last
    part of a path) replaced by "<item>"; string scans only: it runs once per item error."""
    parts: list[str] = []
    start = 0
    while (found := message.find(name, start)) >= 0:
        end = found + len(name)
        before = message[found - 1] if found else " "
        after = message[end] if end < len(message) else " "
        if before in _NAME_BEFORE and after in _NAME_AFTER:
            parts += [message[start:found], "<item>"]
            start = end
        else:
            parts.append(message[start : found + 1])
            start = found + 1
    parts.append(message[start:])
    return "".join(parts)


_TEXT_TIME = re.compile(r"(?:<\d>)?(\d{4})/(\d\d)/(\d\d) (\d\d):(\d\d):(\d\d)(\.\d+)?")


def text_line_time(line: str, utc: bool = False) -> float | None:
    """The date and time a text line starts with (rclone prints local time, to the
    second unless --log-format microseconds), as Unix seconds; None without one."""
    match = _TEXT_TIME.match(line)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction = float(match.group(7)) if match.group(7) else 0.0
    try:
        fields = (year, month, day, hour, minute, second, 0, 0, -1)
        when = calendar.timegm(fields) if utc else time.mktime(fields)
    except (OverflowError, ValueError):
        return None
    return when + fraction


def json_time(value: object) -> float | None:
    """rclone's JSON "time" (RFC 3339 with its offset) as Unix seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


@dataclass(frozen=True)
class _Match:
    offset: int  # of the line in the batch text
    rule: ClassifyRule
    scope: str
    object: str
    message: str
    logged_at: float | None = None


@dataclass
class _BatchState:
    matches: list[_Match] = field(default_factory=list)  # in line order
    unclassified_errors: int = 0
    progressed: bool = False
    # (offset, the line's time if JSON gave one), in line order
    attempts_ended: list[tuple[int, float | None]] = field(default_factory=list)


class RcloneLogParser:
    """Parses one log file's lines, batch by batch, keeping the latest progress.

    State is only the latest progress figures (each stats line carries its own figure,
    so a stats block split across batches gives the same result as one batch). Pass
    ``last_progress`` to resume after a restart without taking old totals for progress.
    """

    def __init__(
        self,
        rules: CompiledRules | None = None,
        last_progress: Progress | None = None,
        *,
        utc: bool = False,
    ) -> None:
        self._rules = rules if rules is not None else compile_rules()
        self._utc = utc  # text lines' dates are UTC (rclone --log-format UTC), not local
        self._progress = last_progress
        known = last_progress or Progress()
        self._bytes_transferred = known.bytes_transferred
        self._bytes_total = known.bytes_total
        self._files_transferred = known.files_transferred
        self._files_total = known.files_total
        self._errors = known.errors
        self._elapsed_seconds = known.elapsed_seconds
        self._progress_changed = False

    @property
    def progress(self) -> Progress | None:
        return self._progress

    def feed(self, lines: Sequence[str]) -> ParseResult:
        count = len(lines)
        if count == 0:
            return ParseResult([], self._progress, False, 0)
        text = "\n".join(lines)
        batch = _BatchState()
        # Offsets of the lines worth a look. The regex finds the "\n" before each line,
        # so the first line is checked on its own.
        starts = [match.end() for match in _INTERESTING_LINE.finditer(text)]
        if _INTERESTING_LINE.match("\n" + lines[0][:_FIRST_LINE_CHECK_CHARS]) is not None:
            starts.insert(0, 0)
        json_stats = _json_stats_line_starts(text)
        if json_stats:
            starts = sorted(set(starts).union(json_stats))
        for start in starts:
            end = text.find("\n", start)
            if end < 0:
                end = len(text)
            line = text[start : min(end, start + MAX_EXAMINED_CHARS)]
            self._examine(start, line, end - start, batch)
        if not batch.progressed:
            batch.progressed = self._has_copied_line(text)
        failures: list[LogFailure] = []
        if batch.matches:
            numbers = _line_numbers(text, lines, [match.offset for match in batch.matches])
            failures = [
                LogFailure(
                    number,
                    lines[number][:MAX_EXAMINED_CHARS],
                    match.rule.failure_class,
                    match.rule.name,
                    match.scope,
                    match.object,
                    match.message,
                    match.logged_at
                    if match.logged_at is not None
                    else text_line_time(lines[number], self._utc),
                )
                for number, match in zip(numbers, batch.matches, strict=True)
            ]
        if self._progress_changed:
            self._progress_changed = False
            self._progress = Progress(
                bytes_transferred=self._bytes_transferred,
                bytes_total=self._bytes_total,
                files_transferred=self._files_transferred,
                files_total=self._files_total,
                errors=self._errors,
                elapsed_seconds=self._elapsed_seconds,
            )
        return ParseResult(
            failures=failures,
            progress=self._progress,
            progressed=batch.progressed,
            lines=count,
            unclassified_errors=batch.unclassified_errors,
            attempts_ended=self._attempt_lines(text, lines, batch.attempts_ended),
        )

    def _attempt_lines(
        self, text: str, lines: Sequence[str], ended: list[tuple[int, float | None]]
    ) -> list[tuple[int, float | None]]:
        if not ended:
            return []
        numbers = _line_numbers(text, lines, [offset for offset, _ in ended])
        return [
            (number, at if at is not None else text_line_time(lines[number], self._utc))
            for number, (_, at) in zip(numbers, ended, strict=True)
        ]

    def _has_copied_line(self, text: str) -> bool:
        """Whether an INFO line says a file was copied: str.find at C speed, then a
        check of the level on the few candidate lines."""
        position = text.find(_COPIED)
        while position >= 0:
            line_start = text.rfind("\n", 0, position) + 1
            line_end = text.find("\n", position)
            if line_end < 0:
                line_end = len(text)
            line = text[line_start:line_end]
            if line.startswith("{"):
                if '"level":"info"' in line and '"msg":"' in line:
                    return True
            else:
                level = _TEXT_LEVEL.match(line)
                if level is not None and level.group(1) == "INFO" and _COPIED in line:
                    return True
            position = text.find(_COPIED, line_end)
        return False

    def _examine(self, start: int, line: str, full_length: int, batch: _BatchState) -> None:
        if line.startswith(_STATS_LINE_STARTS):
            self._update_text_stats(line, batch)
            return
        if (
            line.startswith("{")
            and full_length <= MAX_EXAMINED_CHARS
            and self._examine_json(start, line, batch)
        ):
            return
        level_match = _TEXT_LEVEL.match(line)
        if level_match is not None:
            level = level_match.group(1)
            if level not in _QUIET_LEVELS:
                self._apply_text(start, line[level_match.end() :], level, batch)
            return
        prefix = _DATE_PREFIX.match(line)
        message = line[prefix.end() :] if prefix is not None else line
        self._apply_text(start, message, None, batch)

    def _examine_json(self, start: int, line: str, batch: _BatchState) -> bool:
        """Handle a --use-json-log line; False if it is not one (then it is text)."""
        try:
            record = json.loads(line)
        except ValueError:
            return False
        if not isinstance(record, dict):
            return False
        stats = record.get("stats")
        if isinstance(stats, dict):
            self._update_json_stats(stats, batch)
        level = record.get("level")
        if not isinstance(level, str):
            level = None
        elif level in _QUIET_LEVELS:
            return True
        message = str(record.get("msg", ""))[:MAX_EXAMINED_CHARS]
        obj = record.get("object")
        obj = obj if isinstance(obj, str) else ""
        scope = structure_scope(message, obj)
        if scope == SUMMARY:
            if retries_after(message):
                batch.attempts_ended.append((start, json_time(record.get("time"))))
            else:
                self._apply_summary(start, message, batch, json_time(record.get("time")))
            return True
        self._apply_rules(start, scope, obj, message, level, batch, json_time(record.get("time")))
        return True

    def _apply_text(self, start: int, body: str, level: str | None, batch: _BatchState) -> None:
        scope, obj, message = split_text(body)
        if scope == SUMMARY:
            if retries_after(message):
                batch.attempts_ended.append((start, None))
            else:
                self._apply_summary(start, message, batch)
            return
        if (
            level is None
            and _FINAL_LINE.match(message)
            and self._apply_summary(start, message, batch)
        ):
            return
        name_end = 0
        if scope == RUN and not obj and level is not None and not _RUN_MESSAGE.search(message):
            # the whole body is classified (your rules may match "wrapper: giving up"), but
            # not by the name alone
            obj = object_name(message)
            name_end = len(obj)
        self._apply_rules(start, scope, obj, message, level, batch, name_end=name_end)

    def _apply_summary(
        self, start: int, message: str, batch: _BatchState, logged_at: float | None = None
    ) -> bool:
        """The end of a run that failed (its last attempt's summary, then rclone's last
        line) restates the run's last error. Reported, with scope "summary", only when that
        error is a full disk: the items' own lines were the reports (and paused the volume
        when they came); this one says that the run ended on it, which makes its exit a
        full disk's (restarted once space is back), not a failure. Other classes are
        classified from their own lines and the exit status, as before."""
        rule = self._rules.classify(message)
        if rule is None or rule.failure_class != FailureClass.DISK_FULL:
            return False
        batch.matches.append(_Match(start, rule, SUMMARY, "", message, logged_at))
        return True

    def _apply_rules(
        self,
        start: int,
        scope: str,
        obj: str,
        message: str,
        level: str | None,
        batch: _BatchState,
        logged_at: float | None = None,
        name_end: int = 0,
    ) -> None:
        # The object's name is never classified: a file called "401 Unauthorized.txt"
        # is not an authentication failure, not even where the message quotes its path.
        if obj and obj in message and not name_end:
            message = mask_name(message, obj)
        rule = self._rules.classify(message, name_end) if message else None
        if rule is not None:
            batch.matches.append(_Match(start, rule, rule.scope or scope, obj, message, logged_at))
        elif level in _ERROR_LEVELS:
            batch.unclassified_errors += 1

    def _update_text_stats(self, line: str, batch: _BatchState) -> None:
        if line.startswith("Transferred:"):
            amount = _STATS_AMOUNT.match(line)
            if amount is None:
                return
            done, done_unit, total, total_unit = amount.groups()
            if done_unit or total_unit:
                self._set_bytes(
                    _unit_bytes(done, done_unit or total_unit),
                    _unit_bytes(total, total_unit or done_unit),
                    batch,
                )
            elif done.isdigit() and total.isdigit():
                self._set_files(int(done), int(total), batch)
        elif line.startswith("Errors:"):
            errors = _STATS_ERRORS.match(line)
            if errors is not None:
                self._errors = int(errors.group(1))
                self._progress_changed = True
        elif line.startswith("Elapsed time:"):
            elapsed = _STATS_ELAPSED.match(line)
            seconds = _duration_seconds(elapsed.group(1)) if elapsed is not None else None
            if seconds is not None:
                self._elapsed_seconds = seconds
                self._progress_changed = True

    def _update_json_stats(self, stats: dict[str, object], batch: _BatchState) -> None:
        self._set_bytes(_json_int(stats, "bytes"), _json_int(stats, "totalBytes"), batch)
        self._set_files(_json_int(stats, "transfers"), _json_int(stats, "totalTransfers"), batch)
        errors = _json_int(stats, "errors")
        if errors is not None:
            self._errors = errors
        elapsed = stats.get("elapsedTime")
        if (
            isinstance(elapsed, int | float)
            and not isinstance(elapsed, bool)
            and math.isfinite(elapsed)
        ):
            self._elapsed_seconds = float(elapsed)
        self._progress_changed = True

    def _set_bytes(self, done: int | None, total: int | None, batch: _BatchState) -> None:
        """Record reported figures; more bytes than before is progress (fewer: rclone
        restarted, so the next increase is progress again)."""
        if done is not None:
            if done > (self._bytes_transferred or 0):
                batch.progressed = True
            self._bytes_transferred = done
        if total is not None:
            self._bytes_total = total
        self._progress_changed = True

    def _set_files(self, done: int | None, total: int | None, batch: _BatchState) -> None:
        if done is not None:
            if done > (self._files_transferred or 0):
                batch.progressed = True
            self._files_transferred = done
        if total is not None:
            self._files_total = total
        self._progress_changed = True
