"""Scenario 1 on real migrations (issue 10): real rclone copies in real units, the real guard.

- Item errors (files and a folder the migration's user cannot read, names that look like
  errors) never stop a run: every readable item is copied, and the incident of the run
  that finished with item errors names each failed item.
- A systemic failure (almost every item failing) trips the circuit breaker.
- A log full of an earlier run's errors, read by a guard that starts for the first time
  (and after a restart, after a corrupt state file, and in a log that appears later),
  never pauses or stops the current run.
- The runbook's wrapper script (systemd/examples/m365-migrate-to-space.sh) under its
  example units: frozen and thawed as Type=exec; as Type=oneshot, paused by stopping it and
  resumed by its resume unit (twice: the resumed oneshot is paused again), never by asking
  systemd to freeze what it cannot. Nothing is lost (rclone check).

The migrations run as `nobody` (User= in the unit): pytest's directories are opened for
traversal, the sources are made readable except where a test wants them not to be.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.guardrig import REPO, GuardRig, free_port, wait_until
from tests.installed import ShippedRig
from tests.integration.test_failures import _port_open, incidents
from tests.integration.test_operators import ctl, migration_status
from tests.integration.test_space_guard import make_ballast
from tests.sandbox import (
    LoopVolume,
    SandboxError,
    SystemdSandbox,
    missing_for_volumes,
    require,
    terminate,
)

MIB = 1024 * 1024
NOBODY = 65534
NOGROUP = 65534
UNIT = "m365-migrate@alice.service"
EXAMPLES = REPO / "systemd" / "examples"
WRAPPER = EXAMPLES / "m365-migrate-to-space.sh"
WRAPPER_UNIT = "m365-migrate-wrapper@alice.service"
RESUME_UNIT = "m365-migrate-resume@alice.service"
STAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d")


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def rclone() -> str:
    path = shutil.which("rclone")
    require(path is not None, "rclone is not installed (apt-get install rclone)")
    assert path is not None
    return path


class Workdir:
    """Where the migrations' files live: a directory `nobody` can reach (pytest's own are
    0700, and a concurrent pytest session resets their modes), with its loop volumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.volumes: list[LoopVolume] = []

    def volume(self, size_mib: int, name: str, options: Iterable[str] = ()) -> LoopVolume:
        """A loop volume mounted here (before sandbox.up(): mounts do not propagate)."""
        missing = missing_for_volumes()
        require(not missing, "cannot make loop volumes: " + "; ".join(missing))
        if SystemdSandbox.live():
            raise RuntimeError("mount loop volumes before sandbox.up()")
        volume = LoopVolume(self.path / name, size_mib, options=tuple(options))
        try:
            volume.mount()
        except SandboxError as error:
            require(False, f"loop volume did not mount: {error}")
        self.volumes.append(volume)
        volume.mountpoint.chmod(0o755)
        return volume


@pytest.fixture
def work() -> Iterator[Workdir]:
    """Ask for it before `sandbox`: it is torn down after the sandbox is down. Under the
    directory the shipped guard can see (its PrivateTmp= hides /tmp), traversable by
    nobody (the migration units' user)."""
    from tests.installed import shipped_workdir

    path = shipped_workdir("real-")
    workdir = Workdir(path)
    yield workdir
    errors = []
    for volume in reversed(workdir.volumes):
        try:
            volume.umount()
        except SandboxError as error:
            errors.append(str(error))
    shutil.rmtree(path, ignore_errors=True)
    if errors:
        pytest.fail("volume teardown: " + "; ".join(errors), pytrace=False)


def nobodys(path: Path, directory: bool = False) -> Path:
    """A file (or directory) the migration's user writes."""
    if directory:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.touch()
    os.chown(path, NOBODY, NOGROUP)
    return path


def make_tree(
    root: Path,
    good: int,
    unreadable: Iterable[str] = (),
    locked: dict[str, int] | None = None,
    size: int = 512,
) -> tuple[dict[str, bytes], set[str]]:
    """A source tree: `good` readable files in a few folders, files only root may read,
    folders only root may open (with files in them). Returns (readable files by path,
    the items rclone cannot copy: each unreadable file, each locked folder)."""
    readable: dict[str, bytes] = {}
    root.mkdir(parents=True)
    for index in range(good):
        relative = f"folder-{index % 8}/doc-{index:04d}.txt"
        content = f"document {index}\n".encode() * (size // 14 + 1)
        path = root / relative
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        readable[relative] = content
    failed: set[str] = set()
    for relative in unreadable:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"only root may read this\n")
        path.chmod(0o600)
        failed.add(relative)
    for folder, files in (locked or {}).items():
        for index in range(files):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"inside-{index}.txt").write_bytes(b"behind a locked folder\n")
        failed.add(folder)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    for folder in locked or {}:
        (root / folder).chmod(0o700)
    for relative in readable:
        (root / relative).chmod(0o644)
    return readable, failed


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def rclone_unit(rclone: str, source: Path, destination: Path, log: Path, flags: str = "") -> str:
    return textwrap.dedent(f"""\
        [Unit]
        Description=OneDrive to /space migration for alice (local source)
        [Service]
        Type=exec
        User=nobody
        Group=nogroup
        ExecStart={rclone} --config /dev/null copy {source} {destination} -v --stats 1s \\
            --log-file {log} {flags}
        """)


def migration_config(
    volume: LoopVolume,
    log: Path,
    destination: Path,
    extra: str = "",
    unit: str = UNIT,
    pause_below: str = "1MiB",
    resume_above: str = "2MiB",
) -> str:
    return f"""
        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "{pause_below}"
        resume_above = "{resume_above}"
        resume_after = "1s"
        predict = "0s"

        [[migrations]]
        account = "alice"
        unit = "{unit}"
        volume = "space"
        log = "{log}"
        destination = "{destination}"
        max_retries = 0
        {extra}
        """


def as_nobody(*command: str | Path) -> subprocess.CompletedProcess[str]:
    require(shutil.which("setpriv") is not None, "setpriv is missing (util-linux)")
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOGROUP}",
            "--clear-groups",
            *map(str, command),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def item_error_lines(log: Path) -> list[str]:
    """rclone's per-item ERROR lines (not its 'Attempt N/M failed' summaries)."""
    return [
        line
        for line in log.read_text().splitlines()
        if " ERROR : " in line and " ERROR : Attempt " not in line
    ]


def metric(rig: GuardRig, name: str, **labels: str) -> float:
    """One sample of the guard's /metrics (0 when absent)."""
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return rig.metrics().get(key, 0.0)


def actions(rig: GuardRig) -> dict[str, float]:
    """The guard's unit actions so far: {'action="freeze",reason=...': count}."""
    prefix = "spaceguard_actions_total{"
    return {
        key[len(prefix) : -1]: value
        for key, value in rig.metrics().items()
        if key.startswith(prefix) and value
    }


def rclone_check(rclone: str, source: Path, destination: Path) -> None:
    check = subprocess.run(
        [rclone, "--config", "/dev/null", "check", str(source), str(destination)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-3000:]


# --- item errors never stop a run ---------------------------------------------------------


def test_item_errors_never_stop_the_run_and_the_incident_names_every_item(
    work, sandbox, venv_python, tmp_path, rclone
):
    volume = work.volume(64, "vol")
    source = work.path / "onedrive"
    readable, failed = make_tree(
        source,
        good=200,
        # names that look like errors: only what rclone says about them counts
        unreadable=["401 Unauthorized.txt", "forbidden.txt", "noread.bin", "Finance/pay.xlsx"],
        locked={"Private": 3},
    )
    for name in ("403 Forbidden notes.txt", "no space left on device.txt"):  # readable
        (source / name).write_bytes(b"just a name\n")
        (source / name).chmod(0o644)
        readable[name] = b"just a name\n"
    # a link rclone skips with a NOTICE that names it: "401 Unauthorized shortcut: Can't
    # follow symlink without -L/--copy-links"
    (source / "401 Unauthorized shortcut").symlink_to("/nonexistent")
    destination = nobodys(volume.mountpoint / "alice", directory=True)
    log = nobodys(work.path / "m365-migrate-alice.log")
    # rclone's default --retries 3: each attempt logs the failed items again
    sandbox.up({UNIT: rclone_unit(rclone, source, destination, log)})
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(migration_config(volume, log, destination))
    rig.install()
    rig.start()
    sandbox.systemctl("start", UNIT)

    found = wait_until(
        lambda: incidents(rig),
        60,
        "the incident of the run that finished with item errors",
        on_timeout=lambda: rig.journal()[-3000:] + log.read_text()[-3000:],
    )
    (incident,) = found
    assert log.read_text(), sandbox.journal(UNIT)
    # the run ended by itself, with rclone's own exit status: the guard never stopped it
    assert sandbox.show(UNIT, "ExecMainCode") == "1"  # CLD_EXITED, not killed
    assert sandbox.show(UNIT, "ExecMainStatus") == "1"
    assert "Attempt 3/3 failed with 5 errors" in log.read_text()
    assert "NOTICE: 401 Unauthorized shortcut: Can't follow symlink" in log.read_text()
    assert not [a for a in actions(rig) if a.startswith('action="stop"')], actions(rig)
    # every readable item was copied, and nothing else
    assert tree_files(destination) == readable
    # the incident: finished with item errors, each failed item named once
    assert incident["trigger"] == "item-errors", incident
    assert incident["class"] == "unrecoverable"
    assert "finished with item errors" in incident["outcome"]
    items = incident["items"]
    assert items["total"] == len(failed) == 5
    assert items["not_listed"] == 0
    assert {item["path"] for item in items["failed"]} == failed
    assert {item["rule"] for item in items["failed"]} == {"local_permission"}
    assert all("<item>" in item["message"] or "permission denied" in item["message"]
               for item in items["failed"])  # fmt: skip
    shown = ctl(rig, "show", str(incident["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "Items rclone could not copy (5; it copied the others)" in shown.stdout
    for path in failed:
        assert f"  {path}: " in shown.stdout, (path, shown.stdout)
    # the metrics count every item error line rclone wrote (once per attempt)
    lines = item_error_lines(log)
    assert len(lines) == 3 * len(failed)
    counted = metric(
        rig,
        "spaceguard_log_item_errors_total",
        account="alice",
        **{"class": "unrecoverable"},
        rule="local_permission",
    )
    assert counted == len(lines)
    assert metric(rig, "spaceguard_migration_state", account="alice", unit=UNIT,
                  state="items_failed") == 1  # fmt: skip
    status = migration_status(rig, "alice")
    assert status["state"] == "items_failed"
    assert status["failure"]["phase"] == "needs-operator"  # type: ignore[index]


def test_a_systemic_failure_trips_the_circuit_breaker(work, sandbox, venv_python, tmp_path, rclone):
    """Almost every item fails, as when a permission is revoked on everything: more than
    max_item_errors within item_error_window is no longer a few bad items, and the guard
    stops the run."""
    volume = work.volume(64, "vol")
    source = work.path / "onedrive"
    _readable, failed = make_tree(
        source, good=3, unreadable=[f"Shared/report-{i:03d}.docx" for i in range(300)]
    )
    destination = nobodys(volume.mountpoint / "alice", directory=True)
    log = nobodys(work.path / "m365-migrate-alice.log")
    # rclone's own retries keep the run alive (20 attempts, 2 s apart) as a large account
    # would be: a local copy of 303 items is over in a fraction of a second otherwise
    flags = "--retries 20 --retries-sleep 2s"
    sandbox.up({UNIT: rclone_unit(rclone, source, destination, log, flags)})
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(migration_config(volume, log, destination, "max_item_errors = 50"))
    rig.install()
    rig.start()
    sandbox.systemctl("start", UNIT)

    found = wait_until(lambda: incidents(rig), 60, "the breaker's incident", on_timeout=rig.journal)
    (incident,) = found
    assert incident["trigger"] == "item-error-rate", incident
    assert incident["class"] == "unrecoverable"
    assert re.match(r"\d+ item errors within 600s \(max_item_errors 50\)", incident["detail"])
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=30)
    # the guard stopped it (rclone would have gone on for 20 attempts)
    assert actions(rig).get('action="stop",reason="failure",result="ok"') == 1, actions(rig)
    assert "Attempt 20/20" not in log.read_text()
    assert incident["items"]["total"] >= 50
    assert {item["path"] for item in incident["items"]["failed"]} <= failed
    wait_until(
        lambda: migration_status(rig, "alice")["failure"]["phase"] == "needs-operator",  # type: ignore[index]
        30,
        "the failure to be left for an operator",
    )


# --- an earlier run's errors never act ------------------------------------------------------


def _redated(lines: Iterable[str], when: float) -> list[str]:
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(when))
    return [STAMP.sub(stamp, line) for line in lines]


def _real_item_errors(tmp: Path, rclone: str) -> list[str]:
    """rclone copying as nobody a tree with unreadable files and a locked folder."""
    source = tmp / "earlier-source"
    make_tree(source, good=6, unreadable=["budget 401 Unauthorized.xlsx", "x.bin"],
              locked={"HR": 1})  # fmt: skip
    destination = nobodys(tmp / "earlier-destination", directory=True)
    log = nobodys(tmp / "earlier-items.log")
    as_nobody(rclone, "--config", "/dev/null", "copy", source, destination, "-v",
              "--retries", "2", "--log-file", log)  # fmt: skip
    lines = log.read_text().splitlines()
    assert any("permission denied" in line for line in lines), lines
    return lines


def _real_unauthorized(tmp: Path, rclone: str) -> list[str]:
    """rclone against a WebDAV remote that refuses its password (401)."""
    served = tmp / "served"
    served.mkdir()
    (served / "a.txt").write_text("a\n")
    port = free_port()
    server = subprocess.Popen(
        [rclone, "serve", "webdav", str(served), "--addr", f"127.0.0.1:{port}",
         "--user", "alice", "--pass", "secret"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _port_open(port), 10, "rclone serve webdav")
        obscured = subprocess.run(
            [rclone, "obscure", "wrong"], capture_output=True, text=True, check=True
        ).stdout.strip()
        conf = tmp / "earlier-rclone.conf"
        conf.write_text(
            f"[m365-alice]\ntype = webdav\nurl = http://127.0.0.1:{port}\n"
            f"user = alice\npass = {obscured}\n"
        )
        log = tmp / "earlier-401.log"
        subprocess.run(
            [rclone, "--config", str(conf), "copy", "m365-alice:", str(tmp / "earlier-401"),
             "-v", "--retries", "1", "--low-level-retries", "1", "--log-file", str(log)],
            capture_output=True,
            timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        terminate(server)
    lines = log.read_text().splitlines()
    assert any("401 Unauthorized" in line for line in lines), lines
    return lines


def _real_disk_full(tmp: Path, rclone: str, small: LoopVolume) -> list[str]:
    """rclone copying a file bigger than a small volume's free space."""
    big = tmp / "earlier-big"
    big.mkdir()
    (big / "big.bin").write_bytes(os.urandom(small.usable_bytes + 2 * MIB))
    log = tmp / "earlier-enospc.log"
    subprocess.run(
        [rclone, "--config", "/dev/null", "copy", str(big), str(small.mountpoint), "-v",
         "--retries", "1", "--local-no-preallocate", "--log-file", str(log)],
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    for leftover in small.mountpoint.glob("big.bin*"):
        leftover.unlink()
    lines = log.read_text().splitlines()
    assert any("no space left on device" in line for line in lines), lines
    return lines


def earlier_runs(tmp: Path, rclone: str, small: LoopVolume, runs: int) -> list[str]:
    """A log's past: real rclone failures (item errors, 401, ENOSPC) of `runs` earlier
    runs, one a day before today, and a wrapper's undated lines."""
    block = [
        *_real_item_errors(tmp, rclone),
        *_real_unauthorized(tmp, rclone),
        *_real_disk_full(tmp, rclone, small),
        # what a wrapper that captures rclone's stderr without dates leaves
        'Failed to create file system for "m365-alice:": couldn\'t fetch token - maybe it has '
        'expired? - refresh with "rclone config reconnect m365-alice:"',
        "m365-migrate-to-space.sh: rclone exited: signal: killed",
    ]
    day = 86400.0
    lines: list[str] = []
    for run in range(runs, 0, -1):
        lines += _redated(block, time.time() - run * day)
    return lines


def test_an_earlier_runs_errors_never_pause_or_stop_the_current_run(
    work, sandbox, venv_python, tmp_path, rclone
):
    volume = work.volume(128, "vol")
    small = work.volume(4, "small")
    past = earlier_runs(work.path, rclone, small, runs=40)
    log = work.path / "m365-migrate-alice.log"
    log.write_text("\n".join(past) + "\n")
    bob_log = work.path / "m365-migrate-bob.log"  # appears later
    source = work.path / "onedrive"
    source.mkdir()
    for index in range(80):  # 80 s at 1 MiB/s: still running when the test ends it
        (source / f"part-{index:02d}.bin").write_bytes(os.urandom(MIB))
    destination = volume.mountpoint / "alice"
    # the current run: a real copy at 1 MiB/s, appending to the log its earlier runs wrote
    migration = textwrap.dedent(f"""\
        [Service]
        Type=exec
        ExecStart={rclone} --config /dev/null copy {source} {destination} -v --stats 1s \\
            --bwlimit 1M --transfers 1 --log-file {log}
        """)
    sleeper = "[Service]\nExecStart=/bin/sleep infinity\n"
    sandbox.up({UNIT: migration, "m365-migrate@bob.service": sleeper})
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(
        migration_config(volume, log, destination)
        + f"""
        [[migrations]]
        account = "bob"
        unit = "m365-migrate@bob.service"
        volume = "space"
        log = "{bob_log}"
        """
    )
    rig.install()
    sandbox.systemctl("start", UNIT)
    sandbox.systemctl("start", "m365-migrate@bob.service")
    wait_until(lambda: "Copied (new)" in log.read_text(), 30, "the current run to copy")
    started = sandbox.show(UNIT, "InactiveExitTimestampMonotonic")
    assert not (rig.state_dir / "state.json").exists()  # a first start: no positions
    rig.start()

    def read_the_past(account: str, lines: int) -> bool:
        metrics = rig.metrics()
        return (
            metrics.get(f'spaceguard_log_lines_total{{account="{account}"}}', 0) >= lines
            and metrics.get(f'spaceguard_log_past_errors_total{{account="{account}"}}', 0) > 0
        )

    def untouched(what: str) -> None:
        """Nothing ever paused or stopped alice (nor bob), not even briefly."""
        assert actions(rig) == {}, (what, actions(rig))
        assert not incidents(rig), what
        assert sandbox.show(UNIT, "InactiveExitTimestampMonotonic") == started, what
        assert sandbox.show(UNIT, "ActiveState") == "active", what
        assert sandbox.show(UNIT, "FreezerState") == "running", what
        assert sandbox.show("m365-migrate@bob.service", "FreezerState") == "running", what
        journal = rig.journal()
        for word in ("pausing", "migration failed", f"freeze {UNIT}", f"stop {UNIT}"):
            assert word not in journal, (what, word)
        errors = [k for k, v in rig.metrics().items()
                  if k.startswith("spaceguard_log_errors_total") and v]  # fmt: skip
        assert errors == [], (what, errors)  # no line of the current run was an error

    wait_until(
        lambda: read_the_past("alice", len(past)),
        30,
        "the guard to read the whole log, past included",
        on_timeout=rig.journal,
    )
    untouched("first start")
    assert metric(rig, "spaceguard_migration_state", account="alice", unit=UNIT,
                  state="running") == 1  # fmt: skip

    # a restart mid-run goes on from the saved position: the past is not read again
    rig.stop()
    rig.start()
    wait_until(
        lambda: metric(rig, "spaceguard_log_lines_total", account="alice") >= 2,
        30,
        "the restarted guard to read the current run's new lines",
    )
    assert metric(rig, "spaceguard_log_past_errors_total", account="alice") == 0
    assert metric(rig, "spaceguard_log_lines_total", account="alice") < len(past)
    untouched("restart")

    # a corrupt state file: no positions, the whole log is read again, as the past
    rig.stop()
    (rig.state_dir / "state.json").write_text("{ not json")
    rig.start()
    wait_until(
        lambda: read_the_past("alice", len(past)),
        30,
        "the guard to read the whole log again",
        on_timeout=rig.journal,
    )
    assert list(rig.state_dir.glob("state.json.corrupt-*"))
    untouched("corrupt state")

    # bob's log appears now, with an earlier run's (dated) errors before the current lines
    now = time.strftime("%Y/%m/%d %H:%M:%S")
    bob_past = [line for line in past if STAMP.match(line)]
    staged = work.path / "bob.staged"
    staged.write_text("\n".join([*bob_past, f"{now} INFO  : bob.txt: Copied (new)"]) + "\n")
    staged.rename(bob_log)
    wait_until(
        lambda: read_the_past("bob", len(bob_past) + 1),
        30,
        "the guard to read bob's log",
        on_timeout=rig.journal,
    )
    untouched("a log that appears later")

    # and the guard does act on the current run: the same 401, written now, stops alice
    unauthorized = next(line for line in past if "webdav root '': error reading" in line)
    current = STAMP.sub(time.strftime("%Y/%m/%d %H:%M:%S"), unauthorized)
    with log.open("a") as handle:
        handle.write(current + "\n")
    found = wait_until(
        lambda: incidents(rig),
        30,
        "the current 401 to stop alice",
        on_timeout=lambda: rig.journal()[-2000:] + rig.metrics_text() + log.read_text()[-2000:],
    )
    (incident,) = found
    assert incident["trigger"] == "log" and incident["class"] == "unrecoverable"
    assert incident["matched_lines"] == [current]
    sandbox.wait_for(UNIT, "ActiveState", ("inactive", "failed"), timeout=30)


# --- the runbook's wrapper ----------------------------------------------------------------


def wrapper_units(
    sandbox: SystemdSandbox,
    rclone: str,
    source: Path,
    destination: Path,
    log: Path,
    service_type: str | None = None,
) -> None:
    """The example units as shipped, with a drop-in that points them at the test (and
    its user, nobody, for m365-migrate which this host does not have); `service_type`
    changes Type= of the migration's units only."""
    flags = "--bwlimit 8M --transfers 1 --local-no-preallocate"
    for template in ("m365-migrate-wrapper@.service", "m365-migrate-resume@.service"):
        sandbox.add_unit(template, (EXAMPLES / template).read_text())
        dropin = sandbox.units_dir / f"{template}.d"
        dropin.mkdir(exist_ok=True)
        resume = " --resume" if "resume" in template else ""
        (dropin / "test.conf").write_text(
            textwrap.dedent(f"""\
                [Service]
                User=nobody
                Group=nogroup
                ExecStart=
                ExecStart={WRAPPER} --account %i{resume}
                Environment=RCLONE_LOG_FILE={log}
                Environment=M365_SOURCE={source} M365_DESTINATION={destination}
                Environment="M365_RCLONE_FLAGS={flags}" RCLONE={rclone} RCLONE_CONFIG=/dev/null
                """)
            + (f"Type={service_type}\n" if service_type else "")
        )


def wrapper_source(root: Path, files: int) -> Path:
    root.mkdir()
    for index in range(files):
        (root / f"file-{index:02d}.bin").write_bytes(os.urandom(2 * MIB))
    for path in [root, *root.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def boot_wrapper(
    sandbox: SystemdSandbox,
    work: Workdir,
    tmp_path: Path,
    venv_python: str,
    rclone: str,
    volume: LoopVolume,
    files: int,
    service_type: str | None = None,
) -> tuple[GuardRig, Path, Path, Path]:
    source = wrapper_source(work.path / "onedrive", files)
    destination = nobodys(volume.mountpoint / "alice", directory=True)
    log = nobodys(work.path / "m365-migrate-alice.log")
    wrapper_units(sandbox, rclone, source, destination, log, service_type)
    sandbox.up()
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(
        migration_config(
            volume,
            log,
            destination,
            f'resume_unit = "{RESUME_UNIT}"',
            unit=WRAPPER_UNIT,
            pause_below="16MiB",
            resume_above="24MiB",
        )
    )
    rig.install()
    rig.start()
    return rig, source, destination, log


def paused_for_space(rig: GuardRig, unit: str) -> float:
    return metric(rig, "spaceguard_migration_pause_info", account="alice", by="guard",
                  reason="space", unit=unit)  # fmt: skip


def test_wrapper_type_exec_is_frozen_and_thawed_nothing_lost(
    work, sandbox, venv_python, tmp_path, rclone
):
    volume = work.volume(96, "vol", options=["nodelalloc"])
    rig, source, destination, log = boot_wrapper(
        sandbox, work, tmp_path, venv_python, rclone, volume, files=24
    )
    # 48 MiB to copy, 40 MiB free: the pause at 16 MiB free comes before the disk is full
    ballast = make_ballast(volume, volume.usable_bytes // MIB - 40)
    sandbox.systemctl("start", WRAPPER_UNIT)
    assert sandbox.show(WRAPPER_UNIT, "Type") == "exec"
    wait_until(
        lambda: paused_for_space(rig, WRAPPER_UNIT) == 1,
        60,
        "the guard to pause the wrapper for space",
        on_timeout=lambda: rig.journal()[-3000:],
    )
    sandbox.wait_for(WRAPPER_UNIT, "FreezerState", "frozen")
    # the whole cgroup is frozen: the script and its rclone
    cgroup = sandbox.unit_cgroup(WRAPPER_UNIT)
    assert "frozen 1" in (cgroup / "cgroup.events").read_text()
    commands = {Path(f"/proc/{pid}/comm").read_text().strip()
                for pid in (cgroup / "cgroup.procs").read_text().split()}  # fmt: skip
    assert {"m365-migrate-to", "rclone"} <= commands, commands
    assert volume.usable_bytes > 0
    assert "pausing (freeze) because volume space is low (space)" in rig.journal()

    ballast.unlink()  # an operator frees space; the guard thaws after the hold-down
    sandbox.wait_for(WRAPPER_UNIT, "ActiveState", ("inactive", "failed"), timeout=90)
    assert sandbox.show(WRAPPER_UNIT, "Result") == "success"
    rclone_check(rclone, source, destination)
    text = log.read_text()
    assert "no space left on device" not in text
    assert "m365-migrate-to-space.sh: rclone exited with status 0" in text
    done = actions(rig)
    assert done.get('action="freeze",reason="space",result="ok"') == 1, done
    assert done.get('action="thaw",reason="released",result="ok"') == 1, done
    assert not [a for a in done if a.startswith('action="stop"')], done
    assert not incidents(rig)


def test_wrapper_type_oneshot_is_paused_by_stop_and_resume_unit_nothing_lost(
    work, sandbox, venv_python, tmp_path, rclone
):
    """A Type=oneshot wrapper cannot be frozen while it runs (its start job is pending):
    the guard says so, stops it to pause it, and starts the resume unit to resume; the
    resumed oneshot is paused again the same way. It never asks systemd to freeze it."""
    volume = work.volume(128, "vol", options=["nodelalloc"])
    # as shipped: the unprivileged guard's StopUnit of the oneshot in its start job is
    # asked of polkit like any stop (unit, verb "stop") and granted by the generated rule
    rig, source, destination, log = boot_wrapper(
        sandbox, work, tmp_path, venv_python, rclone, volume, files=40, service_type="oneshot"
    )
    assert sandbox.show(WRAPPER_UNIT, "Type") == "oneshot"
    # said before anything runs: status NOTES, check-config, the journal
    status = ctl(rig, "status")
    assert "NOTES" in status.stdout and f"{WRAPPER_UNIT} is Type=oneshot" in status.stdout
    checked = ctl(rig, "check-config")
    assert checked.returncode == 0 and "note: alice:" in checked.stdout, checked.stdout
    assert f"{WRAPPER_UNIT} is Type=oneshot: systemd refuses to freeze it" in rig.journal()

    # 80 MiB to copy, 44 MiB free: paused (stopped) at 16 MiB free
    ballast = make_ballast(volume, volume.usable_bytes // MIB - 44)
    sandbox.systemctl("start", "--no-block", WRAPPER_UNIT)
    wait_until(
        lambda: actions(rig).get('action="stop",reason="space",result="ok"') == 1,
        60,
        "the guard to pause the oneshot wrapper by stopping it",
        on_timeout=lambda: rig.journal()[-3000:],
    )
    assert sandbox.show(WRAPPER_UNIT, "ActiveState") in ("inactive", "failed")
    assert paused_for_space(rig, WRAPPER_UNIT) == 1
    assert "pausing (stop) because volume space is low (space)" in rig.journal()
    copied_before = len(list(destination.iterdir()))

    ballast.unlink()  # space is back: the guard starts the resume unit (--resume)
    wait_until(
        lambda: actions(rig).get('action="start",reason="resume",result="ok"') == 1,
        30,
        "the guard to start the resume unit",
        on_timeout=rig.journal,
    )
    sandbox.wait_for(RESUME_UNIT, "ActiveState", "activating", timeout=30)  # a oneshot runs
    # the resumed oneshot runs inside its start job, and is paused again all the same
    ballast = make_ballast(volume, volume.usable_bytes // MIB - 40)
    wait_until(
        lambda: actions(rig).get('action="stop",reason="space",result="ok"') == 2,
        60,
        "the guard to pause the resumed oneshot by stopping it",
        on_timeout=lambda: rig.journal()[-3000:],
    )
    assert sandbox.show(RESUME_UNIT, "ActiveState") in ("inactive", "failed")
    assert len(list(destination.iterdir())) > copied_before  # the resume copied more

    ballast.unlink()
    wait_until(
        lambda: actions(rig).get('action="start",reason="resume",result="ok"') == 2,
        30,
        "the guard to start the resume unit again",
        on_timeout=rig.journal,
    )
    wait_until(
        lambda: (
            log.read_text().count("rclone exited with status 0") == 1
            and sandbox.show(RESUME_UNIT, "ActiveState") == "inactive"
        ),
        120,
        "the resumed migration to finish",
        on_timeout=lambda: rig.journal()[-3000:],
    )
    assert sandbox.show(RESUME_UNIT, "Result") == "success"
    rclone_check(rclone, source, destination)
    assert "no space left on device" not in log.read_text()
    assert log.read_text().count("NOTICE: m365-migrate-to-space.sh: resuming") == 2
    # never a freeze asked of systemd, let alone retried
    done = actions(rig)
    assert not [a for a in done if a.startswith('action="freeze"')], done
    assert not incidents(rig)
