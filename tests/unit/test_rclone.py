"""rclone log parsing and classification, on output produced by running real rclone.

A module-scoped fixture runs Debian's rclone against local directories and a local
``rclone serve webdav`` and keeps every log; the tests parse those. Lines rclone cannot
be made to print here (OneDrive's 429/507, ENOSPC, token errors) are hand-written.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spaceguard.rclone import (
    DEFAULT_RULES,
    ClassifyRule,
    CompiledRules,
    FailureClass,
    LogFailure,
    Progress,
    RcloneLogParser,
    classify_exit_code,
    compile_rules,
)

from tests.sandbox import require

T = FailureClass.TRANSIENT
U = FailureClass.UNRECOVERABLE
D = FailureClass.DISK_FULL

SOURCE_FILE_SIZES = [300_000, 700_000, 1_000_000, 1_500_000, 12_345, 0, 1]


def _rclone_binary() -> str:
    binary = shutil.which("rclone")
    require(
        binary is not None,
        "rclone is not installed (apt-get install rclone): the "
        "parser is tested on real rclone output",
    )
    assert binary is not None
    return binary


@dataclass
class RunResult:
    returncode: int
    lines: list[str]


@dataclass
class RcloneLogs:
    runs: dict[str, RunResult]
    source_bytes: int
    source_files: int

    def lines(self, name: str) -> list[str]:
        return self.runs[name].lines


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"rclone serve webdav did not listen on port {port}")


@pytest.fixture(scope="module")
def rclone_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneLogs]:
    rclone = _rclone_binary()
    root = tmp_path_factory.mktemp("rclone")
    source = root / "source"
    (source / "sub" / "deeper").mkdir(parents=True)
    for index, size in enumerate(SOURCE_FILE_SIZES):
        folder = source / "sub" if index % 2 else source / "sub" / "deeper"
        (folder / f"file{index}.bin").write_bytes(os.urandom(size))
    env = {**os.environ, "RCLONE_CONFIG": str(root / "rclone.conf"), "HOME": str(root)}
    runs: dict[str, RunResult] = {}

    def run(name: str, *args: str, log_file: Path | None = None) -> None:
        proc = subprocess.run(
            [rclone, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=120,
            check=False,
        )
        output = log_file.read_bytes() if log_file is not None else proc.stdout
        runs[name] = RunResult(proc.returncode, output.decode("utf-8", "replace").splitlines())

    # --bwlimit makes the copy last ~1 s so that several --stats blocks show up.
    slow = ["--bwlimit", "4M", "--stats", "200ms", "--transfers", "2"]
    run("text_vv", "copy", str(source), str(root / "dst_text"), "-vv", *slow)
    run("json_vv", "copy", str(source), str(root / "dst_json"), "-vv", "--use-json-log", *slow)
    log_file = root / "logfile.log"
    run(
        "logfile_v",
        "copy", str(source), str(root / "dst_logfile"), "-v", "--stats", "1s",
        "--log-file", str(log_file),
        log_file=log_file,
    )  # fmt: skip
    run("missing_source", "copy", str(root / "no-such-dir"), str(root / "dst_x"), "-v")
    blocker = root / "a-file"
    blocker.write_text("not a directory\n")
    fast_fail = ["--retries", "1", "--low-level-retries", "1"]
    run("dest_not_dir", "copy", str(source), str(blocker / "sub"), "-v", *fast_fail)
    run(
        "dest_not_dir_json",
        "copy", str(source), str(blocker / "sub"), "-v", "--use-json-log", *fast_fail,
    )  # fmt: skip
    run("unknown_remote", "lsd", "no-such-remote:")
    run("dest_unknown_remote", "copy", str(source), "no-such-remote:dst", "-v")
    run("usage_args", "copy", str(source))
    run("usage_flag", "copy", "--no-such-flag", str(source), str(root / "dst_y"))
    closed_port = _free_port()
    run(
        "refused",
        "lsd", ":webdav:", "--webdav-url", f"http://127.0.0.1:{closed_port}", *fast_fail,
    )  # fmt: skip

    port = _free_port()
    served = root / "served"
    served.mkdir()
    server = subprocess.Popen(
        [rclone, "serve", "webdav", str(served), "--addr", f"127.0.0.1:{port}",
         "--user", "alice", "--pass", "right-password"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    try:
        _wait_for_port(port)
        wrong = (
            subprocess.run(
                [rclone, "obscure", "wrong-password"], capture_output=True, env=env, check=True
            )
            .stdout.decode()
            .strip()
        )
        right = (
            subprocess.run(
                [rclone, "obscure", "right-password"], capture_output=True, env=env, check=True
            )
            .stdout.decode()
            .strip()
        )
        webdav = ["--webdav-url", f"http://127.0.0.1:{port}", "--webdav-user", "alice"]
        run("webdav_401", "copy", str(source), ":webdav:dst", *webdav, "--webdav-pass", wrong,
            "-v", *fast_fail)  # fmt: skip
        run("webdav_401_json", "copy", str(source), ":webdav:dst", *webdav, "--webdav-pass",
            wrong, "-v", "--use-json-log", *fast_fail)  # fmt: skip
        run("webdav_ok", "copy", str(source), ":webdav:dst", *webdav, "--webdav-pass", right,
            "-v", "--stats", "1s")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)

    # A migration killed from outside (the SIGKILL of scenario "unit is killed").
    victim = subprocess.Popen(
        [rclone, "copy", str(source), str(root / "dst_killed"), "-v", "--bwlimit", "100k"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    runs["killed"] = RunResult(victim.wait(timeout=10), [])

    yield RcloneLogs(runs, sum(SOURCE_FILE_SIZES), len(SOURCE_FILE_SIZES))


def parse(lines: Sequence[str], **kwargs: object) -> tuple[RcloneLogParser, list[LogFailure]]:
    parser = RcloneLogParser(**kwargs)  # type: ignore[arg-type]
    result = parser.feed(lines)
    return parser, result.failures


def classes(failures: Sequence[LogFailure]) -> set[FailureClass]:
    return {failure.failure_class for failure in failures}


# -- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0, None), (1, U), (2, T), (3, U), (4, U), (5, T), (6, U), (7, U), (8, T), (9, None),
        (10, T), (11, T), (137, T), (143, T), (-9, T), (-15, T), (255, T),
    ],
)  # fmt: skip
def test_exit_code_mapping(code: int, expected: FailureClass | None) -> None:
    assert classify_exit_code(code) == expected


def test_real_exit_codes_agree_with_the_log_classification(rclone_logs: RcloneLogs) -> None:
    expectations = {
        "text_vv": None,
        "json_vv": None,
        "missing_source": U,
        "dest_not_dir": U,
        "unknown_remote": U,
        "usage_args": U,
        "usage_flag": U,
        "refused": T,
        "webdav_401": U,
        "webdav_ok": None,
        "killed": T,  # death by SIGKILL: Popen reports -9
    }
    for name, expected in expectations.items():
        run = rclone_logs.runs[name]
        assert classify_exit_code(run.returncode) == expected, (name, run.returncode)
        if run.lines and expected is not None:
            assert expected in classes(parse(run.lines)[1]), name
    assert rclone_logs.runs["killed"].returncode == -signal.SIGKILL


# -- rules ---------------------------------------------------------------------------------


def test_user_rules_come_first_and_bad_regex_is_a_clear_error() -> None:
    user = ClassifyRule("wrapper_gave_up", r"^m365-migrate: giving up", FailureClass.UNRECOVERABLE)
    rules = compile_rules([user])
    assert rules.rules[0] == user
    assert rules.rules[1:] == DEFAULT_RULES
    override = ClassifyRule("my_timeouts_are_fatal", r"i/o timeout", FailureClass.UNRECOVERABLE)
    matched = compile_rules([override]).classify("read tcp: i/o timeout")
    assert matched is not None
    assert matched.name == "my_timeouts_are_fatal"

    with pytest.raises(ValueError, match=r"rule .broken.*invalid regular expression"):
        compile_rules([ClassifyRule("broken", r"(unclosed", FailureClass.TRANSIENT)])
    with pytest.raises(ValueError, match="keyword 'Upper'"):
        compile_rules([ClassifyRule("kw", r"x", FailureClass.TRANSIENT, ("Upper",))])


def test_default_rule_names_are_unique() -> None:
    names = [rule.name for rule in DEFAULT_RULES]
    assert len(names) == len(set(names))


HAND_WRITTEN = [
    # OneDrive / Graph, as rclone's onedrive backend reports them
    ("2025/11/23 10:00:00 ERROR : Documents/a.docx: Failed to copy: activityLimitReached: "
     "throttledRequest: The request has been throttled (429 Too Many Requests)", T,
     "throttled_code"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: accessDenied: activityLimitReached "
     "(403 Forbidden)", T, "throttled_code"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: HTTP error 429 (429 Too Many Requests) "
     "returned body: \"\"", T, "too_many_requests"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: serviceNotAvailable: Service unavailable "
     "(503 Service Unavailable)", T, "service_unavailable"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: generalException: (502 Bad Gateway)", T,
     "server_error"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: insufficientStorage: Insufficient Space "
     "Available (507 Insufficient Storage)", U, "insufficient_storage"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: InvalidAuthenticationToken: Access token "
     "has expired. (401 Unauthorized)", U, "unauthorized"),
    ("2025/11/23 10:00:00 Failed to create file system for \"m365-alice:\": failed to get root: "
     "couldn't fetch token - maybe it has expired? - refresh with \"rclone config reconnect "
     "m365-alice:\": oauth2: cannot fetch token: 400 Bad Request Response: "
     "{\"error\":\"invalid_grant\"}", U, "token_error"),
    ("2025/11/23 10:00:00 ERROR : x: Failed to copy: accessDenied: Access denied "
     "(403 Forbidden)", U, "forbidden"),
    # disk full on /space (scenario 3, not a failure to retry)
    ("2025/11/23 10:00:00 ERROR : big.iso: Failed to copy: write /space/alice/big.iso: "
     "no space left on device", D, "no_space_left"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: preallocate: ENOSPC", D, "no_space_left"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: open /space/a: disk quota exceeded", D,
     "disk_quota_exceeded"),
    # network
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: Get \"https://graph.microsoft.com/v1.0/\": "
     "dial tcp 20.190.1.1:443: i/o timeout", T, "timeout"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: context deadline exceeded", T, "timeout"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: read tcp 10.0.0.2:1->1.1.1.1:443: "
     "read: connection reset by peer", T, "connection_reset"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: write: broken pipe", T, "connection_reset"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: unexpected EOF", T, "transport_eof"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: Put \"https://x/y\": EOF", T,
     "transport_eof"),
    ("2025/11/23 10:00:00 ERROR : a: Failed to copy: dial tcp: lookup graph.microsoft.com: "
     "no such host", T, "network_unreachable"),
    # a cause on a "Failed to create file system" line decides over the context
    ("2025/11/23 10:00:00 Failed to create file system for \"m365-alice:\": failed to get root: "
     "dial tcp: i/o timeout", T, "timeout"),
    ("2025/11/23 10:00:00 Failed to create file system for \"x:\": something odd", U,
     "create_fs_failed"),
    ("2025/11/23 10:00:00 Fatal error: something odd", U, "fatal_error"),
    # a wrapper script's own lines (no level)
    ("m365-migrate-to-space.sh: rclone exited: signal: killed", T, "killed"),
    # NOTICE and CRITICAL lines are tested too, with -v or --log-format prefixes
    ("2025/11/23 10:00:00 NOTICE: a: too many requests, backing off", T, "too_many_requests"),
    ("2025/11/23 10:00:00.123456 CRITICAL: a: no space left on device", D, "no_space_left"),
    ("2025/11/23 10:00:00 sync.go:12: ERROR : a: directory not found", U, "directory_not_found"),
    ("<3>ERROR : a: Failed to copy: 401 Unauthorized", U, "unauthorized"),
    # JSON log
    ('{"level":"error","msg":"Failed to copy: no space left on device","object":"a/b",'
     '"objectType":"*local.Object","source":"x.go:1","time":"2025-11-23T10:00:00Z"}', D,
     "no_space_left"),
    ('{"level":"warning","msg":"couldn\'t fetch token","source":"x.go:1"}', U, "token_error"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "expected_class", "rule"), HAND_WRITTEN)
def test_hand_written_lines(line: str, expected_class: FailureClass, rule: str) -> None:
    _, failures = parse(["2025/11/23 10:00:00 DEBUG : noise", line, "trailing garbage"])
    assert [(f.line_number, f.line, f.failure_class, f.rule) for f in failures] == [
        (1, line, expected_class, rule)
    ]


@pytest.mark.parametrize(
    "line",
    [
        # DEBUG and INFO are never failures, whatever they say (rclone retries quietly)
        "2025/11/23 10:00:00 DEBUG : pacer: low level retry 1/10 (error activityLimitReached: "
        "(429 Too Many Requests))",
        "2025/11/23 10:00:00 INFO  : a: no space left on device (just kidding)",
        '{"level":"debug","msg":"Too many requests. Trying again in 30 seconds."}',
        '{"level":"info","msg":"i/o timeout"}',
        # error-level lines that name no known cause
        "2025/11/23 10:00:00 ERROR : EOF.txt: Failed to copy: checksum mismatch",
        '2025/11/23 10:00:00 NOTICE: Config file "/root/.config/rclone/rclone.conf" not found',
        # stats continuation lines are not tested against rules
        "Errors:                 1 (fatal error encountered)",
        " *  timeout 401 Unauthorized.docx: 12% /1.2Mi, 0/s, -",
        "Transferred:            3 / 10, 30%",
        # numbers without an HTTP context
        "2025/11/23 10:00:00 ERROR : reports/401/429.pdf: Failed to copy: checksum mismatch",
    ],
)
def test_lines_that_are_not_failures(line: str) -> None:
    assert parse([line])[1] == []


def test_unclassified_errors_are_counted() -> None:
    result = RcloneLogParser().feed(
        [
            "2025/11/23 10:00:00 ERROR : a: Failed to copy: checksum mismatch",
            '{"level":"error","msg":"something new"}',
            "2025/11/23 10:00:00 NOTICE: something else",
            "2025/11/23 10:00:00 ERROR : a: no space left on device",
        ]
    )
    assert result.unclassified_errors == 2
    assert [f.rule for f in result.failures] == ["no_space_left"]


def test_user_rules_apply_to_wrapper_lines_without_level() -> None:
    rules = compile_rules(
        [ClassifyRule("wrapper_gave_up", r"^m365-migrate: giving up", FailureClass.UNRECOVERABLE)]
    )
    parser = RcloneLogParser(rules)
    result = parser.feed(["m365-migrate: starting", "m365-migrate: giving up after 3 tries"])
    assert [(f.line_number, f.rule) for f in result.failures] == [(1, "wrapper_gave_up")]


def test_keywords_never_change_the_outcome(rclone_logs: RcloneLogs) -> None:
    """The keyword pre-check is only a speed-up: without it every real and hand-written
    line classifies the same."""
    with_keywords = compile_rules()
    without_keywords = CompiledRules(
        rules=tuple(ClassifyRule(r.name, r.pattern, r.failure_class) for r in DEFAULT_RULES),
        patterns=with_keywords.patterns,
    )
    corpus = [line for run in rclone_logs.runs.values() for line in run.lines]
    corpus += [line for line, _, _ in HAND_WRITTEN]
    for line in corpus:
        fast = with_keywords.classify(line)
        slow = without_keywords.classify(line)
        assert (fast and fast.name) == (slow and slow.name), line


# -- real rclone output ------------------------------------------------------------------


def test_successful_text_copy_has_progress_and_no_failures(rclone_logs: RcloneLogs) -> None:
    lines = rclone_logs.lines("text_vv")
    assert any(" DEBUG : " in line for line in lines)
    assert sum(line.startswith("Transferred:") for line in lines) >= 4  # several blocks
    parser, failures = parse(lines)
    assert failures == []
    progress = parser.progress
    assert progress is not None
    assert progress.files_transferred == progress.files_total == rclone_logs.source_files
    assert progress.errors is None or progress.errors == 0
    assert progress.elapsed_seconds is not None and progress.elapsed_seconds > 0
    # the text log rounds sizes to 4 significant digits
    assert progress.bytes_total == pytest.approx(rclone_logs.source_bytes, rel=1e-3)
    assert progress.bytes_transferred == pytest.approx(rclone_logs.source_bytes, rel=1e-3)


def test_successful_json_copy_has_exact_progress(rclone_logs: RcloneLogs) -> None:
    lines = rclone_logs.lines("json_vv")
    assert sum('"stats":{' in line for line in lines) >= 4
    parser, failures = parse(lines)
    assert failures == []
    assert parser.progress is not None
    assert parser.progress.bytes_transferred == rclone_logs.source_bytes
    assert parser.progress.bytes_total == rclone_logs.source_bytes
    assert parser.progress.files_transferred == rclone_logs.source_files
    assert parser.progress.files_total == rclone_logs.source_files
    assert parser.progress.errors == 0


def test_log_file_output(rclone_logs: RcloneLogs) -> None:
    lines = rclone_logs.lines("logfile_v")
    parser, failures = parse(lines)
    assert failures == []
    assert parser.progress is not None
    assert parser.progress.files_transferred == rclone_logs.source_files


def test_progress_grows_line_by_line_and_copied_lines_count(rclone_logs: RcloneLogs) -> None:
    for name in ("text_vv", "json_vv"):
        parser = RcloneLogParser()
        progressed = [parser.feed([line]).progressed for line in rclone_logs.lines(name)]
        copied = [
            i for i, line in enumerate(rclone_logs.lines(name))
            if "Copied (" in line and ("INFO" in line or '"info"' in line)
        ]  # fmt: skip
        assert copied, name
        assert all(progressed[i] for i in copied), name
        assert sum(progressed) > len(copied), name  # stats blocks showed progress too
        # a restarted parser, seeded with the saved progress, does not take the last
        # stats block (read again) for new progress
        again = RcloneLogParser(last_progress=parser.progress)
        last_stats = max(
            i for i, line in enumerate(rclone_logs.lines(name)) if "Transferred:" in line
        )
        tail = [line for line in rclone_logs.lines(name)[last_stats - 1 :] if "Copied" not in line]
        assert not again.feed(tail).progressed, name


def test_missing_source_is_directory_not_found(rclone_logs: RcloneLogs) -> None:
    parser, failures = parse(rclone_logs.lines("missing_source"))
    assert {f.rule for f in failures} == {"directory_not_found"}
    assert classes(failures) == {U}
    # the final line carries no level (log.Fatalf)
    assert failures[-1].line.endswith("Failed to copy: directory not found")
    assert parser.progress is not None and parser.progress.errors == 1


@pytest.mark.parametrize("name", ["dest_not_dir", "dest_not_dir_json"])
def test_destination_that_cannot_be_created(rclone_logs: RcloneLogs, name: str) -> None:
    lines = rclone_logs.lines(name)
    _, failures = parse(lines)
    assert classes(failures) == {U}
    assert {f.rule for f in failures} == {"local_permission"}
    # rclone's summaries ("Attempt 1/3 failed with N errors and: ...", "Failed to copy
    # with N errors: last error was ...") repeat the items' errors: they are not failures
    summary = re.compile(r"Attempt \d+/\d+ failed with|Failed to \w+ with \d+ errors")
    error_lines = [
        i for i, line in enumerate(lines)
        if "not a directory" in line and '"level":"info"' not in line  # stats: lastError
        and not summary.search(line)
    ]  # fmt: skip
    assert [f.line_number for f in failures] == error_lines
    # every item failed for the same reason: the destination root cannot be created
    assert {f.scope for f in failures} == {"item"}


@pytest.mark.parametrize("name", ["unknown_remote", "dest_unknown_remote"])
def test_unknown_remote_is_a_config_error(rclone_logs: RcloneLogs, name: str) -> None:
    _, failures = parse(rclone_logs.lines(name))
    assert [(f.failure_class, f.rule) for f in failures] == [(U, "config_error")]


def test_usage_errors(rclone_logs: RcloneLogs) -> None:
    for name in ("usage_args", "usage_flag"):
        lines = rclone_logs.lines(name)
        assert len(lines) > 3  # the help text comes with it, and must not match anything
        _, failures = parse(lines)
        assert failures, name
        assert {(f.failure_class, f.rule) for f in failures} == {(U, "usage_error")}, name
        assert all("Usage" not in f.line and "--" not in f.line[:4] for f in failures), name


def test_connection_refused_is_transient(rclone_logs: RcloneLogs) -> None:
    _, failures = parse(rclone_logs.lines("refused"))
    assert failures
    assert {f.rule for f in failures} == {"connection_refused"}


@pytest.mark.parametrize("name", ["webdav_401", "webdav_401_json"])
def test_wrong_webdav_credentials_are_unrecoverable(rclone_logs: RcloneLogs, name: str) -> None:
    lines = rclone_logs.lines(name)
    assert any("401" in line for line in lines)
    _, failures = parse(lines)
    assert failures
    assert {(f.failure_class, f.rule) for f in failures} == {(U, "unauthorized")}


def test_webdav_copy_succeeds_without_failures(rclone_logs: RcloneLogs) -> None:
    parser, failures = parse(rclone_logs.lines("webdav_ok"))
    assert failures == []
    assert parser.progress is not None
    assert parser.progress.files_transferred == rclone_logs.source_files


# -- robustness ----------------------------------------------------------------------------


def test_garbage_never_raises() -> None:
    parser = RcloneLogParser()
    nasty = [
        "",
        "\x00\x01\x02",
        "\ufffd\ufffd invalid utf-8 replaced",
        "{",
        "[1, 2, 3]",
        '{"level": ["error"], "msg": {"a": 1}, "stats": []}',
        '{"level":"info","stats":{"bytes":"many","totalBytes":null,"elapsedTime":true}}',
        '{"level":"error","msg":"no space left on device","object":7}',
        "Transferred: lots / more, 50%",
        "Transferred: 1e999 MiB / 2 MiB, 50%",
        "Elapsed time: forever",
        "Errors: many",
        "2025/11/23 10:00:00 ERROR : " + "x" * 10_000_000 + " no space left on device",
        "y" * 10_000_000,
        '{"level":"error","msg":"' + "z" * 10_000_000 + '"}',
        "line with\nembedded newline: no space left on device",
        '{"level":"info","stats":{"bytes":Infinity,"totalBytes":NaN,"errors":1e400,'
        '"elapsedTime":-Infinity,"transfers":10e300}}',
        "Transferred: " + "9" * 5000 + " MiB / 1 MiB, 1%",
        "Transferred: " + "9" * 5000 + " / 10, 1%",
        "Errors: " + "9" * 5000,
        "Elapsed time: " + "9" * 5000 + "h",
    ]
    result = parser.feed(nasty)
    assert result.lines == len(nasty)
    assert [f.line_number for f in result.failures] == [7, 15]
    assert all(len(f.line) <= 64 * 1024 for f in result.failures)


def test_stats_block_split_across_batches() -> None:
    block = [
        "2025/11/23 10:00:00 INFO  : ",
        "Transferred:   \t    1.500 GiB / 10 GiB, 15%, 10 MiB/s, ETA 14m",
        "Errors:                 3 (retrying may help)",
        "Checks:                 0 / 0, -",
        "Transferred:           12 / 100, 12%",
        "Elapsed time:      1h2m3.5s",
        "Transferring:",
        " *                                   big.iso: 12% /1Gi, 10Mi/s, 1m",
    ]
    expected = Progress(
        bytes_transferred=int(1.5 * 1024**3),
        bytes_total=10 * 1024**3,
        files_transferred=12,
        files_total=100,
        errors=3,
        elapsed_seconds=3723.5,
    )
    for split in range(len(block) + 1):
        parser = RcloneLogParser()
        first = parser.feed(block[:split])
        second = parser.feed(block[split:])
        assert parser.progress == expected
        assert first.progressed or second.progressed
        assert first.failures == second.failures == []


# -- properties ----------------------------------------------------------------------------

SAMPLE_LINES = [line for line, _, _ in HAND_WRITTEN] + [
    "2025/11/23 10:00:00 DEBUG : a: md5 = 0123 OK",
    "2025/11/23 10:00:00 INFO  : a: Copied (new)",
    "2025/11/23 10:00:00 INFO  : ",
    "Transferred:   \t    1.500 MiB / 10 MiB, 15%, 10 MiB/s, ETA 14m",
    "Transferred:           12 / 100, 12%",
    "Errors:                 3 (retrying may help)",
    '{"level":"info","msg":"\\nTransferred: x","stats":{"bytes":10,"totalBytes":20,'
    '"transfers":1,"totalTransfers":2,"errors":0,"elapsedTime":1.5}}',
    '{"level":"info","msg":"Copied (new)","object":"a"}',
]

lines_strategy = st.lists(
    st.one_of(st.sampled_from(SAMPLE_LINES), st.text(max_size=200)), max_size=60
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines_strategy, data=st.data())
def test_batching_does_not_change_the_outcome(lines: list[str], data: st.DataObject) -> None:
    whole = RcloneLogParser()
    whole_result = whole.feed(lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(lines)), max_size=8)))
    split = RcloneLogParser()
    failures: list[tuple[int, str, FailureClass, str]] = []
    progressed = False
    start = 0
    for end in [*cuts, len(lines)]:
        result = split.feed(lines[start:end])
        assert result.lines == end - start
        failures += [
            (start + f.line_number, f.line, f.failure_class, f.rule) for f in result.failures
        ]
        progressed = progressed or result.progressed
        start = end
    assert failures == [
        (f.line_number, f.line, f.failure_class, f.rule) for f in whole_result.failures
    ]
    assert split.progress == whole.progress
    assert progressed == whole_result.progressed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(), max_size=30))
def test_parser_never_raises_on_arbitrary_text(lines: list[str]) -> None:
    result = RcloneLogParser().feed(lines)
    assert result.lines == len(lines)
    for failure in result.failures:
        assert 0 <= failure.line_number < len(lines)
