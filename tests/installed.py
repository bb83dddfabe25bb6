"""Install spaceguard the way its Debian package does, for tests that run the shipped units.

Three ways, chosen with ``SPACEGUARD_TEST_INSTALL``:

* ``deb`` (the default): the files of the package ``scripts/build-deb.sh`` builds
  (``tests.debpackage``: one build, reused while the sources are the same), unpacked with
  ``dpkg-deb -x`` and put where installing it puts them: its units into the sandbox's unit
  directory (the sandbox's /lib/systemd/system), its polkit rule into
  /usr/share/polkit-1/rules.d, its user and groups made by ``systemd-sysusers`` from its
  sysusers file; its /usr/bin/spaceguard runs from the unpacked tree on Debian's
  /usr/bin/python3 and python3-* libraries.
* ``files``: the same from this checkout, without building (quicker while editing).
* ``dpkg``: ``dpkg -i`` of the built package (or of the .deb ``SPACEGUARD_TEST_DEB`` names)
  on this host: the real maintainer scripts, but it changes the host's /usr and /etc.

Either way the units are the shipped ones, unchanged; a drop-in only points paths at the
test: the config file, the state directory, and (``deb``, ``files``) where the program is.
``DropIn`` refuses any other key, so no test can switch off the user or the hardening.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

from tests.guardrig import GuardRig
from tests.sandbox import SYSTEM_UNIT_DIR, SandboxError, SystemdSandbox

REPO = Path(__file__).resolve().parents[1]
GUARD = "spaceguard.service"
FREEZER = "spaceguard-freezer.service"
# where tests and benches keep what the shipped guard must see (not /tmp, not /home)
BASE = Path("/var/lib/spaceguard-test")
POLKIT_RULE = Path("/usr/share/polkit-1/rules.d/50-spaceguard.rules")
PYTHON = "/usr/bin/python3"  # what the package's /usr/bin/spaceguard runs
DEBIAN_LIBRARIES = ("dbus_next", "sdnotify", "pyinotify", "prometheus_client")
# What a test drop-in may set: paths only (README, "Tests").
ALLOWED_KEYS = frozenset({"ExecStartPre", "ExecStart", "Environment", "StateDirectory"})
MODES = ("deb", "files", "dpkg")


def mode() -> str:
    chosen = os.environ.get("SPACEGUARD_TEST_INSTALL", "").strip() or "deb"
    if chosen not in MODES:
        raise SandboxError(
            f"SPACEGUARD_TEST_INSTALL={chosen!r}: expected one of {', '.join(MODES)}"
        )
    return chosen


def missing() -> list[str]:
    """What this host lacks to run the shipped units (empty when all is there)."""
    problems = []
    if (
        not (SYSTEM_UNIT_DIR / "polkit.service").exists()
        or not Path("/usr/lib/polkit-1/polkitd").exists()
    ):
        problems.append("no polkitd (apt-get install polkitd)")
    if shutil.which("systemd-sysusers") is None:
        problems.append("no systemd-sysusers (apt-get install systemd)")
    if mode() in ("deb", "dpkg") and not os.environ.get("SPACEGUARD_TEST_DEB"):
        from tests.debpackage import missing_for_build

        problems += missing_for_build()
    probe = subprocess.run(
        [PYTHON, "-c", "import " + ", ".join(DEBIAN_LIBRARIES)],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        problems.append(
            f"{PYTHON} lacks Debian's libraries (apt-get install python3-dbus-next "
            f"python3-sdnotify python3-pyinotify python3-prometheus-client): "
            f"{probe.stderr.strip().splitlines()[-1:]}"
        )
    return problems


def built_deb() -> Path:
    """The .deb to install: SPACEGUARD_TEST_DEB, or scripts/build-deb.sh's."""
    named = os.environ.get("SPACEGUARD_TEST_DEB", "")
    if named:
        return Path(named)
    from tests.debpackage import PackageError, build_package

    try:
        return build_package().deb
    except PackageError as error:
        raise SandboxError(str(error)) from None


class DropIn:
    """A drop-in that may only point paths; any other key is a test bug, refused here."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.lines: list[str] = ["[Service]"]

    def set(self, key: str, *values: str) -> DropIn:
        if key not in ALLOWED_KEYS:
            raise SandboxError(f"a test drop-in may only point paths, not set {key}=")
        self.lines += [f"{key}={value}" for value in values]
        return self

    def write(self, sandbox: SystemdSandbox) -> Path:
        directory = sandbox.units_dir / f"{self.unit}.d"
        directory.mkdir(exist_ok=True)
        path = directory / "test-paths.conf"
        path.write_text("\n".join(self.lines) + "\n")
        return path


class Installation:
    """The package's files on this host and in one sandbox; see the module doc."""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.workdir = workdir
        self.tag = tag
        self.mode = mode()
        self.config_path = workdir / "spaceguard.toml"
        # StateDirectory= is relative to /var/lib; the config's state_dir must match it
        self.state_name = f"spaceguard-test/{tag}/state"
        self.state_dir = Path("/var/lib") / self.state_name
        # where the files come from: / (dpkg), the unpacked .deb (deb), the checkout (files)
        self.root = Path("/")
        self.deb: Path | None = None
        self.package_dir = workdir / "python"  # PYTHONPATH of the program (not for dpkg)

    # -- on the host (before the sandbox boots)

    def install_host_files(self) -> None:
        if self.mode == "dpkg":
            self.deb = built_deb()
            self._run(["dpkg", "-i", str(self.deb)])
            return
        if self.mode == "deb":
            self.deb = built_deb()
            self.root = self.workdir / "package"
            self.root.mkdir()
            self._run(["dpkg-deb", "-x", str(self.deb), str(self.root)])
            self.package_dir = self.root / "usr" / "lib" / "python3" / "dist-packages"
            sysusers = self.root / "usr" / "lib" / "sysusers.d" / "spaceguard.conf"
            rule = (self.root / POLKIT_RULE.relative_to("/")).read_bytes()
        else:
            self._copy_package()
            sysusers = REPO / "packaging" / "sysusers" / "spaceguard.conf"
            rule = (REPO / "packaging" / "polkit" / "50-spaceguard.rules").read_bytes()
        self._run(["systemd-sysusers", str(sysusers)])
        current = b""
        with contextlib.suppress(FileNotFoundError):
            current = POLKIT_RULE.read_bytes()
        if current != rule:
            POLKIT_RULE.parent.mkdir(parents=True, exist_ok=True)
            partial = POLKIT_RULE.with_name(f".{POLKIT_RULE.name}.{os.getpid()}")
            partial.write_bytes(rule)
            partial.chmod(0o644)
            partial.replace(POLKIT_RULE)  # atomic: a polkitd reading it sees all or nothing

    def _copy_package(self) -> None:
        target = self.package_dir / "spaceguard"
        shutil.copytree(
            REPO / "daemon" / "spaceguard", target, ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in [self.package_dir, *self.package_dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)

    def write_config(self, text: str) -> None:
        """The config as the package installs it: 0640 root:spaceguard."""
        self.config_path.write_text(text)
        os.chown(self.config_path, 0, grp.getgrnam("spaceguard").gr_gid)
        self.config_path.chmod(0o640)

    # -- in the sandbox

    def unit_files(self) -> list[Path]:
        if self.mode == "files":
            directory = REPO / "systemd"
        else:
            directory = self.root / "lib" / "systemd" / "system"
            if not directory.is_dir():
                directory = self.root / "usr" / "lib" / "systemd" / "system"
        return sorted(
            p
            for p in directory.iterdir()
            if p.suffix in (".service", ".socket") and p.name.startswith("spaceguard")
        )

    def program(self) -> list[str]:
        if self.mode == "files":
            return [PYTHON, "-m", "spaceguard"]
        return [str(self.root / "usr" / "bin" / "spaceguard")]

    def install_units(self, sandbox: SystemdSandbox) -> None:
        """The shipped units, unchanged, plus polkitd's own unit and the path drop-ins."""
        units = self.unit_files()
        if not any(p.name == GUARD for p in units):
            raise SandboxError(f"no {GUARD} among the installed units {units}")
        for path in units:
            shutil.copy(path, sandbox.units_dir / path.name)
        shutil.copy(SYSTEM_UNIT_DIR / "polkit.service", sandbox.units_dir / "polkit.service")
        program = self.program()
        environment = [] if self.mode == "dpkg" else [f"PYTHONPATH={self.package_dir}"]
        config = str(self.config_path)
        guard = DropIn(GUARD).set("ExecStartPre", "", " ".join([*program, "check-config", config]))
        guard.set("ExecStart", "", " ".join([*program, "run", "--config", config]))
        guard.set("StateDirectory", "", self.state_name)
        freezer = DropIn(FREEZER).set(
            "ExecStart",
            "",
            " ".join([*program, "freezer", "--config", config, "--user", "spaceguard"]),
        )
        for dropin in (guard, freezer):
            if environment:
                dropin.set("Environment", *environment)
            dropin.write(sandbox)

    def uid(self) -> int:
        return pwd.getpwnam("spaceguard").pw_uid

    def cleanup(self) -> None:
        """Remove this test's state directory (the system user and the rule stay, as the
        package leaves them until purge; other runs may be using them)."""
        shutil.rmtree(self.state_dir.parent, ignore_errors=True)

    @staticmethod
    def _run(command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SandboxError(
                f"{' '.join(command)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )


class ShippedRig(GuardRig):
    """GuardRig's interface (benches, tests) for the guard as shipped: the package's units
    unchanged, unprivileged, freezing through its helper. `workdir` must be readable by the
    spaceguard user and outside /tmp and /home (the guard's PrivateTmp= and ProtectHome=
    hide those): under BASE, for instance."""

    _seq = itertools.count(1)

    def __init__(
        self,
        sandbox: SystemdSandbox,
        workdir: Path,
        python: str,
        watchdog_sec: int = 10,
        log_level: str = "debug",
    ) -> None:
        super().__init__(sandbox, workdir, python, watchdog_sec, log_level)
        tag = f"{os.getpid()}-{next(self._seq)}"
        self.installation = Installation(workdir, tag)
        # tests name their own units (writer@alice.service): grant exactly those
        self.grant_configured_units = True
        self.rule_path = RULES_DIR / f"49-spaceguard-test-{tag}.rules"
        LIVE_RIGS.append(self)
        self.state_dir = self.installation.state_dir
        self.config_path = self.installation.config_path
        self._host_files = False

    def write_config(self, body: str) -> None:
        if not self._host_files:  # the spaceguard group must exist before the config
            self.installation.install_host_files()
            self._host_files = True
        self.installation.write_config(self.guard_section() + "\n" + textwrap.dedent(body))
        if self.grant_configured_units:
            self._grant()
        self._share_logs()

    def _share_logs(self) -> None:
        """What README's "Migration logs" says for logs outside /var/log/m365-migrate: an
        ACL for the group spaceguard-logs, inherited by the files made here later (rclone
        creates its log 0640; the test's units run as root or nobody)."""
        if shutil.which("setfacl") is None:
            raise SandboxError("setfacl not found (Debian package acl)")
        self.installation._run(
            [
                "setfacl",
                "-m",
                "g:spaceguard-logs:rX",
                "-d",
                "-m",
                "g:spaceguard-logs:rX",
                str(self.workdir),
            ]
        )

    def _grant(self) -> None:
        """What an operator whose units the shipped rule does not name does (README,
        "Privileges"): `spaceguard polkit-rule CONFIG` into /etc/polkit-1/rules.d."""
        program = self.installation.program()
        environment = dict(os.environ)
        if self.installation.mode != "dpkg":
            environment["PYTHONPATH"] = str(self.installation.package_dir)
        result = subprocess.run(
            [*program, "polkit-rule", "--any-unit", "--user=spaceguard", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
            env=environment,
        )
        if result.returncode != 0:
            raise SandboxError(f"spaceguard polkit-rule failed: {result.stderr.strip()}")
        # The generated rule refuses the user's every other unit, so two of them (tests of
        # two pytest sessions at once) would refuse each other's: here, what is not this
        # test's is left to the next rule (the shipped one). test_privilege.py tests the
        # generated rule as it is.
        strict = "return polkit.Result.NO;"
        if strict not in result.stdout:
            raise SandboxError("spaceguard polkit-rule printed no final refusal to relax")
        rule = result.stdout.replace(strict, "return polkit.Result.NOT_HANDLED;")
        refusing = refusing_rules("spaceguard", self.rule_path.name)
        if refusing:
            raise SandboxError(
                f"{', '.join(map(str, refusing))}: an unrelaxed `spaceguard polkit-rule` for "
                f"user spaceguard, run by polkitd before {self.rule_path.name}: its final NO "
                "would refuse this test's starts and stops (AccessDenied)"
            )
        self.rule_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.rule_path.with_name(f".{self.rule_path.name}.tmp")
        partial.write_text(rule)
        partial.chmod(0o644)
        partial.replace(self.rule_path)

    def install(self) -> None:
        self.installation.install_units(self.sandbox)
        if self.sandbox.is_up:
            self.sandbox.daemon_reload()

    def cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.rule_path.unlink()
        self.installation.cleanup()


LIVE_RIGS: list[ShippedRig] = []  # cleaned up after each test (tests/integration/conftest.py)
RULES_DIR = Path("/etc/polkit-1/rules.d")


def cleanup_rigs() -> None:
    while LIVE_RIGS:
        LIVE_RIGS.pop().cleanup()


def refusing_rules(user: str, before: str) -> list[Path]:
    """Generated rules for `user` that keep their final refusal and that polkitd runs before
    a rule named `before` (it runs the files of both rules directories in the order of
    their names). Each answers NO for every unit of `user` it does not name, so no later
    rule is asked: a test's own rule after it grants nothing. Measured (systemd 252,
    polkitd 122): with such a rule of another session in place, every StopUnit of the
    user fails with AccessDenied, of a oneshot in its start job and of an active unit alike
    (what kept the Type=oneshot wrapper test on the root rig: README, Tests)."""
    found = []
    subject = f"subject.user !== {json.dumps(user)}"
    for directory in (RULES_DIR, POLKIT_RULE.parent):
        for path in sorted(directory.glob("*.rules")):
            if path.name >= before:
                continue
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue  # removed meanwhile (another session's teardown)
            if subject in text and "return polkit.Result.NO;" in text:
                found.append(path)
    return found


def remove_stale_rules() -> list[str]:
    """Rules that crashed test runs left (each grants a test's units to spaceguard)."""
    removed = []
    for path in RULES_DIR.glob("49-spaceguard-test-*.rules"):
        pid = path.name.removeprefix("49-spaceguard-test-").split("-")[0]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue  # a pytest session that still runs
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed


def shipped_workdir(prefix: str) -> Path:
    """A fresh directory under BASE that the spaceguard user can traverse."""
    BASE.mkdir(parents=True, exist_ok=True)
    BASE.chmod(0o755)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=BASE))
    path.chmod(0o755)
    return path
