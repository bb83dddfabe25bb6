"""The guard as shipped: unprivileged (User=spaceguard, every hardening line of
systemd/spaceguard.service), its freezer helper (systemd/spaceguard-freezer.service), the
real system bus and a real polkitd that loads the shipped rule, in a systemd sandbox.

The package's files are installed as the package installs them (tests/installed.py); the
units are copied unchanged and a drop-in only points paths at the test (config file,
state directory, and where the program is). Everything lives under /var/lib/spaceguard-test
(not /tmp, which the guard's PrivateTmp= hides; not /root or /home, which ProtectHome=
hides), readable by the spaceguard user.

Shown here: the guard freezes and thaws a migration (through the helper: systemd 252 lets
only root freeze), stops one and starts its resume unit, stops a failed one, starts its
verify_unit and retries it (through polkit); the spaceguard user, trying directly over
D-Bus, is refused everything else; the helper refuses unconfigured units and any other
peer; a rule made by `spaceguard polkit-rule` grants exactly its config; and
`systemd-analyze security` scores both units.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guardrig import free_port, read_status, wait_until, writer_unit
from tests.installed import BASE, FREEZER, GUARD, PYTHON, Installation
from tests.installed import missing as missing_for_install
from tests.sandbox import (
    LoopVolume,
    SandboxError,
    SystemdSandbox,
    missing_for_sandbox,
    missing_for_volumes,
    require,
)
from tests.unit.test_alertmanager_real import NotificationRecorder

MIB = 1024 * 1024
_SEQ = itertools.count(1)

DBUS_TRY = """\
import asyncio, json, sys
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    results = []
    for method, *args in json.loads(sys.argv[1]):
        if method == "StartTransientUnit":
            signature = "ssa(sv)a(sa(sv))"
            props = [["ExecStart", Variant("a(sasb)", [["/bin/true", ["/bin/true"], False]])]]
            body = [args[0], "fail", props, []]
        else:
            signature, body = "s" * len(args), args
        reply = await bus.call(Message(
            destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
            interface="org.freedesktop.systemd1.Manager", member=method,
            signature=signature, body=body))
        error = reply.error_name if reply.message_type == MessageType.ERROR else None
        results.append([method, *args, error])
    print(json.dumps(results))

asyncio.run(main())
"""

FREEZER_TRY = """\
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect("/run/spaceguard-freezer/freezer.sock")
try:
    sock.sendall(sys.argv[1].encode() + b"\\n")
except BrokenPipeError:
    pass  # refused at once: the helper's one line is still there to read
sock.settimeout(10)
print(sock.makefile("rb").readline().decode().strip())
"""


@dataclass
class Shipped:
    sandbox: SystemdSandbox
    install: Installation
    volume: LoopVolume
    workdir: Path
    status: Path
    metrics_port: int
    generated_unit: str
    webhook: NotificationRecorder
    rule_user: str

    def journal(self, unit: str = GUARD) -> str:
        return self.sandbox.journal(unit)

    def metrics(self) -> dict[str, float]:
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def action(self, action: str, result: str = "ok") -> float:
        return sum(
            value
            for name, value in self.metrics().items()
            if name.startswith("spaceguard_actions_total{")
            and f'action="{action}"' in name
            and f'result="{result}"' in name
        )

    def as_user(self, user: str, *command: str, groups: str = "") -> str:
        """Run `command` inside the sandbox as `user` (its groups: `groups`, or its own)."""
        group = "nogroup" if user == "nobody" else user
        ids = ["--groups", groups] if groups else ["--init-groups"]
        result = self.sandbox.exec(
            "setpriv", f"--reuid={user}", f"--regid={group}", *ids, *command, timeout=60
        )
        if result.returncode != 0:
            raise AssertionError(f"{command} as {user} failed: {result.stderr}")
        return result.stdout.strip()

    def dbus_as(self, user: str, *calls: list[str]) -> dict[str, str | None]:
        script = self.workdir / "dbus_try.py"
        out = self.as_user(user, PYTHON, str(script), json.dumps(list(calls)))
        return {" ".join(call[:-1]): call[-1] for call in json.loads(out)}

    def freezer_as(self, user: str, line: str, groups: str = "") -> str:
        script = self.workdir / "freezer_try.py"
        if user == "root":
            return self.sandbox.exec(PYTHON, str(script), line, timeout=30).stdout.strip()
        return self.as_user(user, PYTHON, str(script), line, groups=groups)

    def wait_for(self, unit: str, prop: str, value: str, timeout: float = 60) -> None:
        try:
            self.sandbox.wait_for(unit, prop, value, timeout=timeout)
        except SandboxError as error:
            raise AssertionError(
                f"{error}\n--- guard ---\n{self.journal()[-4000:]}\n"
                f"--- helper ---\n{self.journal(FREEZER)[-2000:]}"
            ) from None

    def proc_status(self, unit: str) -> dict[str, str]:
        pid = self.sandbox.show(unit, "MainPID")
        text = self.sandbox.exec("cat", f"/proc/{pid}/status").stdout
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _make_ballast(volume: LoopVolume, mib: int) -> Path:
    path = volume.mountpoint / "ballast.bin"
    with path.open("wb") as handle:
        for _ in range(mib):
            handle.write(b"\0" * MIB)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def _guard_config(
    install: Installation, volume: LoopVolume, workdir: Path, port: int, webhook: str
) -> str:
    return textwrap.dedent(f"""\
        [guard]
        state_dir = "{install.state_dir}"
        control_socket = "/run/spaceguard/control.sock"
        metrics_listen = "127.0.0.1:{port}"
        reader_group = "spaceguard-readers"
        admin_group = "spaceguard-admin"
        log_level = "debug"

        [volumes.space]
        path = "{volume.mountpoint}"
        pause_below = "32MiB"
        resume_above = "64MiB"
        resume_after = "1s"

        [volumes.root]
        path = "{workdir}"
        require_mount = false
        pause_below = "1MiB"
        resume_above = "2MiB"

        [[migrations]]
        account = "alice"
        unit = "m365-migrate@alice.service"
        volume = "space"
        pause = "freeze"

        [[migrations]]
        account = "bob"
        unit = "m365-migrate@bob.service"
        resume_unit = "m365-migrate-resume@bob.service"
        volume = "space"
        pause = "stop"

        [[migrations]]
        account = "carol"
        unit = "m365-migrate@carol.service"
        volume = "root"
        verify_unit = "m365-verify@carol.service"
        max_retries = 1
        retry_backoff = "1s"
        log = "{workdir}/logs/carol.log"

        # on localhost: reachable under the unit's IPAddressAllow=localhost
        [[alerts.receivers]]
        name = "hook"
        kind = "webhook"
        url = "{webhook}"
        timeout = "2s"
        """)


def _rule_user() -> str:
    """A system user of this session only, for the generated rule under test: the rule
    refuses its user every other unit, so it must not be spaceguard (the guard's real units;
    other sessions' tests) nor anyone another session's rule is about. Stale ones (their
    session is gone) are removed."""
    for entry in pwd.getpwall():
        pid = entry.pw_name.removeprefix("sgpk")
        if entry.pw_name.startswith("sgpk") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["userdel", entry.pw_name], capture_output=True, check=False)
    name = f"sgpk{os.getpid()}"
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        return name
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return name


def _generated_rule(workdir: Path, unit: str, user: str) -> str:
    """`spaceguard polkit-rule` for a config naming one unit the shipped rule does not, for
    `user` (a rule for spaceguard would refuse the guard its real units)."""
    config = workdir / "generated.toml"
    config.write_text(
        textwrap.dedent(f"""\
        [volumes.space]
        path = "/space"
        [[migrations]]
        account = "gen"
        unit = "{unit}"
        volume = "space"
        """)
    )
    result = subprocess.run(
        [sys.executable, "-m", "spaceguard", "polkit-rule", "--any-unit", f"--user={user}", config],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "daemon")},
    )
    return result.stdout


@pytest.fixture(scope="module")
def shipped() -> Iterator[Shipped]:
    problems = missing_for_sandbox() + missing_for_volumes() + missing_for_install()
    require(not problems, "cannot run the shipped units: " + "; ".join(problems))
    tag = f"{os.getpid()}-{next(_SEQ)}"
    workdir = BASE / tag
    workdir.mkdir(parents=True)
    for path in (BASE, workdir):
        path.chmod(0o755)  # the spaceguard user reaches its config and the volume
    generated_unit = f"sggen{tag.replace('-', 'x')}.service"
    rule_path = Path(f"/etc/polkit-1/rules.d/49-spaceguard-test-{tag}.rules")
    # a later, looser rule: the generated one must have the last word all the same
    looser_path = Path(f"/etc/polkit-1/rules.d/51-spaceguard-test-{tag}.rules")
    looser_units = [generated_unit, f"sgnot{tag.replace('-', 'x')}.service"]
    install = Installation(workdir, tag)
    volume = LoopVolume(workdir / "vol", 256, options=["nodelalloc"])
    sandbox = SystemdSandbox(workdir / "sandbox")
    webhook = NotificationRecorder()
    rule_user = ""
    try:
        install.install_host_files()
        rule_user = _rule_user()
        rule_path.write_text(_generated_rule(workdir, generated_unit, rule_user))
        looser_path.write_text(
            "polkit.addRule(function (action, subject) {\n"
            f"    var units = {json.dumps(looser_units)};\n"
            f'    if (subject.user === "{rule_user}" && '
            'units.indexOf(action.lookup("unit")) >= 0) {\n'
            "        return polkit.Result.YES;\n"
            "    }\n"
            "    return polkit.Result.NOT_HANDLED;\n"
            "});\n"
        )
        for path in (rule_path, looser_path):
            path.chmod(0o644)
        volume.mount()
        (volume.mountpoint / "alice").mkdir()
        status = workdir / "alice.status"
        # the migrations' logs as README "Migration logs" says: a setgid directory of group
        # spaceguard-logs (2750), files 0640: the guard reads them without adm
        logs = workdir / "logs"
        logs.mkdir()
        log_group = grp.getgrnam("spaceguard-logs").gr_gid
        os.chown(logs, 0, log_group)
        logs.chmod(0o2750)
        (logs / "carol.log").touch(mode=0o640)
        port = free_port()
        install.write_config(_guard_config(install, volume, workdir, port, webhook.url))
        for name, text in (("dbus_try.py", DBUS_TRY), ("freezer_try.py", FREEZER_TRY)):
            (workdir / name).write_text(text)
            (workdir / name).chmod(0o644)
        sleeper = "[Service]\nExecStart=/bin/sleep infinity\n"
        install.install_units(sandbox)
        sandbox.add_units(
            {
                "m365-migrate@alice.service": writer_unit(
                    sys.executable, volume.mountpoint / "alice", "120M", status
                ),
                "m365-migrate@bob.service": sleeper,
                "m365-migrate-resume@bob.service": sleeper,
                "m365-migrate@carol.service": (
                    "[Service]\nUMask=0027\nExecStart=/bin/sh -c 'echo \"2024/05/01 10:00:00 "
                    f"INFO  : carol: starting\" >> {logs}/carol.log; sleep 0.5; exit 5'\n"
                ),
                "m365-verify@carol.service": (
                    "[Service]\nType=oneshot\nExecStart=/bin/echo carol verified\n"
                ),
                "other.service": sleeper,
                generated_unit: sleeper,
                looser_units[1]: sleeper,
                "sgother.service": sleeper,
            }
        )
        try:
            sandbox.up()
        except SandboxError as error:
            require(False, f"sandbox did not boot: {error}")
        started = sandbox.systemctl("start", "polkit.service", check=False, timeout=60)
        require(
            started.returncode == 0 and sandbox.show("polkit.service", "ActiveState") == "active",
            f"polkitd did not start in the sandbox: {started.stderr.strip()}\n"
            f"{sandbox.journal('polkit.service')[-2000:]}",
        )
        result = sandbox.systemctl("start", GUARD, check=False, timeout=90)
        if result.returncode != 0:
            raise AssertionError(
                f"the shipped guard did not start: {result.stderr}\n"
                f"{sandbox.journal(GUARD)[-4000:]}\n{sandbox.journal(FREEZER)[-2000:]}"
            )
        yield Shipped(
            sandbox, install, volume, workdir, status, port, generated_unit, webhook, rule_user
        )
    finally:
        webhook.stop()
        sandbox.down()
        volume.umount()
        rule_path.unlink(missing_ok=True)
        looser_path.unlink(missing_ok=True)
        if rule_user:
            subprocess.run(["userdel", rule_user], capture_output=True, check=False)
        install.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_units_run_as_shipped(shipped: Shipped) -> None:
    sandbox = shipped.sandbox
    guard = shipped.proc_status(GUARD)
    uid = str(shipped.install.uid())
    assert guard["Uid"].split()[:2] == [uid, uid], guard["Uid"]
    assert int(guard["CapEff"], 16) == 0 and int(guard["CapBnd"], 16) == 0
    assert guard["NoNewPrivs"] == "1" and guard["Seccomp"] == "2"
    groups = {int(g) for g in guard["Groups"].split()}
    assert grp.getgrnam("spaceguard-logs").gr_gid in groups
    assert grp.getgrnam("adm").gr_gid not in groups  # the host's logs stay unreadable
    # only paths are changed: the drop-ins hold nothing else
    for unit in (GUARD, FREEZER):
        for dropin in (sandbox.units_dir / f"{unit}.d").glob("*.conf"):
            keys = {
                line.split("=", 1)[0] for line in dropin.read_text().splitlines() if "=" in line
            }
            assert keys <= {"ExecStartPre", "ExecStart", "Environment", "StateDirectory"}, keys
    assert sandbox.show(GUARD, "User") == "spaceguard"
    if shipped.install.mode != "files":  # the package's own program, not the checkout's
        assert shipped.install.program()[0] in sandbox.show(GUARD, "ExecStart")
        assert (shipped.install.root / "usr/bin/spaceguard").exists()
    assert sandbox.show(GUARD, "ProtectSystem") == "strict"
    assert sandbox.show(GUARD, "PrivateTmp") == "yes"
    # the guard found it may not freeze, and connected to the helper at start-up
    journal = shipped.journal()
    assert "freezing through the helper at /run/spaceguard-freezer/freezer.sock" in journal
    assert "AccessDenied" in journal
    wait_until(
        lambda: sandbox.show(FREEZER, "ActiveState") == "active", 30, "the helper to be running"
    )
    helper = shipped.proc_status(FREEZER)
    assert helper["Uid"].split()[:2] == ["0", "0"]
    assert int(helper["CapEff"], 16) == 0 and int(helper["CapBnd"], 16) == 0
    status = sandbox.exec(
        "env",
        f"PYTHONPATH={shipped.install.package_dir}",
        PYTHON,
        "-c",
        "import sys; from spaceguard.ctl import main; sys.exit(main(['status']))",
    )
    assert status.returncode == 0, status.stderr
    assert "freezing through spaceguard-freezer" in status.stdout


def test_the_unprivileged_guard_freezes_thaws_stops_starts_and_verifies(shipped: Shipped) -> None:
    sandbox, volume = shipped.sandbox, shipped.volume
    ballast = _make_ballast(volume, 140)
    sandbox.systemctl("start", "m365-migrate@bob.service")
    sandbox.systemctl("start", "m365-migrate@alice.service")
    # space runs low: alice frozen through the helper, bob stopped through polkit
    shipped.wait_for("m365-migrate@alice.service", "FreezerState", "frozen", timeout=60)
    shipped.wait_for("m365-migrate@bob.service", "ActiveState", "inactive", timeout=60)
    assert "ENOSPC" not in [word for word, _ in read_status(shipped.status)]
    freezer_log = shipped.journal(FREEZER)
    assert "freezer: freeze m365-migrate@alice.service: done" in freezer_log
    # the pause alert reached the webhook on localhost (IPAddressAllow=localhost)
    wait_until(
        lambda: "SpaceguardMigrationPaused" in json.dumps(shipped.webhook.notifications),
        30,
        "the pause alert at the local webhook",
        on_timeout=lambda: shipped.journal()[-3000:],
    )
    # space is back: alice thawed (helper), bob's resume unit started (polkit)
    ballast.unlink()
    shipped.wait_for("m365-migrate@alice.service", "FreezerState", "running", timeout=60)
    shipped.wait_for("m365-migrate-resume@bob.service", "ActiveState", "active", timeout=60)
    shipped.wait_for("m365-migrate@alice.service", "ActiveState", "inactive", timeout=120)
    assert sandbox.show("m365-migrate@alice.service", "Result") == "success"
    assert "freezer: thaw m365-migrate@alice.service: done" in shipped.journal(FREEZER)
    # a failure: stopped, verified by its verify_unit, retried (all through polkit)
    sandbox.systemctl("start", "m365-migrate@carol.service")
    wait_until(
        lambda: (
            shipped.metrics().get(
                'spaceguard_migration_retries_total{account="carol",unit="m365-migrate@carol.service"}'
            )
            == 1
        ),
        60,
        "the guard to retry carol",
        on_timeout=lambda: shipped.journal()[-3000:],
    )
    wait_until(lambda: shipped.action("verify") >= 1, 30, "a verification")
    # it read carol's log through the spaceguard-logs group (the directory is 2750)
    wait_until(
        lambda: shipped.metrics().get('spaceguard_log_lines_total{account="carol"}', 0) >= 1,
        30,
        "the guard to read carol's log",
        on_timeout=lambda: shipped.journal()[-3000:],
    )
    assert "carol verified" in sandbox.journal("m365-verify@carol.service")
    for action in ("freeze", "thaw", "stop", "start", "verify"):
        assert shipped.action(action) >= 1, action
    for action in ("freeze", "thaw", "verify"):
        assert shipped.action(action, "error") == 0, (action, shipped.journal()[-3000:])


def test_the_spaceguard_user_cannot_touch_other_units(shipped: Shipped) -> None:
    sandbox = shipped.sandbox
    sandbox.systemctl("start", "other.service", "sgother.service")
    denied = "org.freedesktop.DBus.Error.AccessDenied"
    interactive = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
    results = shipped.dbus_as(
        "spaceguard",
        ["StopUnit", "other.service", "replace"],
        ["StartUnit", "sgother.service", "replace"],
        ["RestartUnit", "other.service", "replace"],
        ["StopUnit", FREEZER, "replace"],
        ["StopUnit", "polkit.service", "replace"],
        ["FreezeUnit", "other.service"],
        # not even a migration unit: freezing is root's alone on systemd 252
        ["FreezeUnit", "m365-migrate@bob.service"],
        ["StartTransientUnit", "sg-transient.service"],
        # the shipped rule's verbs are exact: start and stop, not restart
        ["RestartUnit", "m365-migrate-resume@bob.service", "replace"],
        # what it may do (polkit is really asked: this is granted)
        ["StopUnit", "m365-migrate-resume@bob.service", "replace"],
    )
    assert results == {
        "StopUnit other.service replace": interactive,
        "StartUnit sgother.service replace": interactive,
        "RestartUnit other.service replace": interactive,
        f"StopUnit {FREEZER} replace": interactive,
        "StopUnit polkit.service replace": interactive,
        "FreezeUnit other.service": denied,
        "FreezeUnit m365-migrate@bob.service": denied,
        "StartTransientUnit sg-transient.service": interactive,
        "RestartUnit m365-migrate-resume@bob.service replace": interactive,
        "StopUnit m365-migrate-resume@bob.service replace": None,
    }, results
    for unit in ("other.service", "sgother.service", "polkit.service", FREEZER):
        assert sandbox.show(unit, "ActiveState") == "active", unit
    assert sandbox.show("other.service", "FreezerState") == "running"
    assert sandbox.show("sg-transient.service", "LoadState") in ("not-found", "")


def test_the_helper_refuses_other_units_and_other_peers(shipped: Shipped) -> None:
    sandbox = shipped.sandbox
    sandbox.systemctl("start", "other.service")
    as_guard = [
        shipped.freezer_as("spaceguard", line)
        for line in (
            "1 freeze other.service",
            "2 freeze m365-verify@carol.service",
            "3 freeze spaceguard.service",
            "4 stop m365-migrate@bob.service",
        )
    ]
    config = shipped.install.config_path
    assert as_guard == [
        f"1 error refused: other.service is not a migration unit in {config}",
        f"2 error refused: m365-verify@carol.service is not a migration unit in {config}",
        f"3 error refused: spaceguard.service is not a migration unit in {config}",
        "- error bad request: unknown verb 'stop' (only freeze, thaw)",
    ]
    spaceguard_gid = str(grp.getgrnam("spaceguard").gr_gid)
    nobody = shipped.freezer_as("nobody", "1 freeze m365-migrate@alice.service", spaceguard_gid)
    root = shipped.freezer_as("root", "1 freeze m365-migrate@alice.service")
    for reply in (nobody, root):
        assert reply.startswith("- error forbidden: only user spaceguard may use this socket")
    assert sandbox.show("other.service", "FreezerState") == "running"
    assert sandbox.show("m365-migrate@alice.service", "FreezerState") == "running"
    log = shipped.journal(FREEZER)
    assert re.search(r"refused a connection from uid 65534 \(pid \d+\)", log)
    assert re.search(r"refused a connection from uid 0 \(pid \d+\)", log)


def test_a_generated_rule_grants_exactly_its_config(shipped: Shipped) -> None:
    """The rule `spaceguard polkit-rule` made (for a user of this session) grants start and stop of
    its one unit, and refuses the rest even where a later rule would grant it."""
    sandbox = shipped.sandbox
    unit = shipped.generated_unit
    other = unit.replace("sggen", "sgnot")
    sandbox.systemctl("start", unit, other, "sgother.service")
    results = shipped.dbus_as(
        shipped.rule_user,
        ["RestartUnit", unit, "replace"],  # the later rule would grant it
        ["StopUnit", other, "replace"],  # the later rule would grant it
        ["StopUnit", "sgother.service", "replace"],
        ["StopUnit", unit, "replace"],
        ["StartUnit", unit, "replace"],
    )
    denied = "org.freedesktop.DBus.Error.AccessDenied"
    assert results == {
        f"RestartUnit {unit} replace": denied,
        f"StopUnit {other} replace": denied,
        "StopUnit sgother.service replace": denied,
        f"StopUnit {unit} replace": None,
        f"StartUnit {unit} replace": None,
    }, results
    assert sandbox.show(other, "ActiveState") == "active"


def test_security_exposure(shipped: Shipped) -> None:
    scores = {}
    for unit in (GUARD, FREEZER):
        result = shipped.sandbox.exec("systemd-analyze", "security", "--no-pager", unit)
        match = re.search(
            rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", result.stdout
        )
        assert match, result.stdout[-2000:] + result.stderr
        scores[unit] = float(match.group(1))
    print(f"systemd-analyze security: {scores}")
    assert scores[GUARD] <= 1.5, scores
    assert scores[FREEZER] <= 1.5, scores
