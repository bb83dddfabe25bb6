"""A throwaway, real systemd (with a real system bus) and real ext4 loop volumes.

Used by the integration tests, the bench scripts and the demo, so it imports nothing
from pytest at module level (only `require` does, when it is called).

A sandbox is a real ``/lib/systemd/systemd`` booted as PID 1 of its own PID, mount and
cgroup namespaces, in a cgroup of its own under the host's cgroup v2 hierarchy:

    with LoopVolume(tmp / "vol", 64) as vol, SystemdSandbox(tmp / "sb") as sb:
        sb.up({"x.service": "[Service]\\nExecStart=/bin/sleep infinity\\n"})
        sb.systemctl("start", "x.service")
        print(sb.bus_address)   # for dbus-next: MessageBus(bus_address=...)

Facts to remember (see shared/SANDBOX.md):

* The sandbox shares the host's file system except ``/run`` (its ``/run`` is
  ``DIR/run`` on the host), so units can run the project's Python.
* Mount propagation is private: mount volumes on the host BEFORE ``up()``. A host mount
  made later is invisible inside, and a mount made inside is invisible to the host.
* ``down()`` kills everything inside by cgroup (``cgroup.kill``), never by name.

Every cgroup and volume image made here carries an owner tag (PID and start time of the
process that made it), so :func:`cleanup_stale` only removes what a dead run of ours
left behind and never touches another live run's (or another person's) sandboxes.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NoReturn

__all__ = [
    "WRITER_SCRIPT",
    "LoopVolume",
    "SandboxError",
    "SystemdSandbox",
    "UnitSource",
    "cgroup_root",
    "cleanup_stale",
    "exec_line",
    "in_ci",
    "missing_for_sandbox",
    "missing_for_volumes",
    "require",
    "writer_service",
]

SYSTEMD = "/lib/systemd/systemd"
SYSTEM_UNIT_DIR = Path("/lib/systemd/system")
WRITER_SCRIPT = Path(__file__).resolve().parent / "integration" / "writer.py"

CGROUP_PREFIX = "sandbox-spaceguard-"
IMAGE_SUFFIX = ".sgvol.img"

# Units a sandbox always needs; copied from the host unless the caller supplies them.
_CORE_UNITS = (
    "dbus.socket",
    "dbus.service",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
# Standard targets that other units (and systemd itself) refer to: empty stand-ins.
_STANDIN_TARGETS = (
    "sysinit",
    "basic",
    "sockets",
    "timers",
    "paths",
    "slices",
    "local-fs",
    "shutdown",
    "multi-user",
    "network",
    "network-online",
    "swap",
    "umount",
    "graphical",
)

UnitSource = Mapping[str, str] | Iterable[str | os.PathLike[str]]


# --------------------------------------------------------------------------- CI / skips


def in_ci() -> bool:
    """True when running under CI (env ``CI=true``): the one place this is decided."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require(condition: bool, why: str) -> None:
    """Go on if ``condition``; else fail the test under CI, skip it elsewhere.

    Integration tests must not silently skip in CI when a real component cannot start.
    """
    if condition:
        return
    import pytest  # only here: bench scripts and the demo import this module too

    if in_ci():
        pytest.fail(
            f"{why} (CI=true: a real component that cannot start is a failure)", pytrace=False
        )
    pytest.skip(why)


class SandboxError(RuntimeError):
    """The sandbox (or a volume) could not be set up; the message says why."""


# --------------------------------------------------------------------------- host facts


def cgroup_root() -> Path:
    """The host's cgroup v2 mount (``/sys/fs/cgroup/unified`` in hybrid mode)."""
    unified = Path("/sys/fs/cgroup/unified")
    if (unified / "cgroup.procs").exists():
        return unified
    return Path("/sys/fs/cgroup")


def _is_cgroup2(path: Path) -> bool:
    return (path / "cgroup.procs").exists() and (path / "cgroup.subtree_control").exists()


def missing_for_sandbox() -> list[str]:
    """What this host lacks to boot a sandbox (empty when all is there)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not root (a sandbox needs root: namespaces, cgroups)")
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            missing.append(f"no `{tool}` (apt-get install util-linux)")
    if not os.access(SYSTEMD, os.X_OK):
        missing.append(f"no {SYSTEMD} (apt-get install systemd)")
    if shutil.which("dbus-daemon") is None or not (SYSTEM_UNIT_DIR / "dbus.service").exists():
        missing.append("no dbus-daemon / dbus.service (apt-get install dbus)")
    root = cgroup_root()
    if not _is_cgroup2(root):
        missing.append(f"no cgroup v2 hierarchy at {root}")
    elif not _has_cgroup_kill(root):
        missing.append("kernel without cgroup.kill (needs Linux >= 5.14)")
    return missing


def _has_cgroup_kill(root: Path) -> bool:
    """The root cgroup has no cgroup.kill file: look in a child (a probe if none exists)."""
    if any(root.glob("*/cgroup.kill")):
        return True
    probe = root / f"sandbox-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return (probe / "cgroup.kill").exists()
    finally:
        probe.rmdir()


def missing_for_volumes() -> list[str]:
    """What this host lacks to make loop volumes (empty when all is there)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not root (loop mounts need root)")
    for tool in ("mkfs.ext4", "mount", "umount", "losetup"):
        if shutil.which(tool) is None:
            missing.append(f"no `{tool}` (apt-get install e2fsprogs util-linux)")
    if not Path("/dev/loop-control").exists():
        missing.append("no /dev/loop-control (no loop devices)")
    return missing


# --------------------------------------------------------------------------- ownership

_SEQ = itertools.count(1)


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}x{_start_time(pid)}"


def _owner_alive(tag: str) -> bool:
    pid_s, _, start = tag.partition("x")
    if not pid_s.isdigit():
        return True  # not ours to judge
    return _start_time(int(pid_s)) == start


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in procs.read_text().split())
    return pids


def _populated(cgroup: Path) -> bool:
    try:
        return "populated 1" in (cgroup / "cgroup.events").read_text()
    except OSError:
        return False


def _kill_cgroup(cgroup: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``cgroup`` (and below), wait, remove the cgroup tree."""
    if not cgroup.is_dir():
        return
    deadline = time.monotonic() + timeout
    kill_file = cgroup / "cgroup.kill"
    while _populated(cgroup) and time.monotonic() < deadline:
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:  # pre-5.14 kernel: kill each process of the cgroup, repeatedly
            for pid in _cgroup_pids(cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for _ in range(20):
            if not _populated(cgroup):
                break
            time.sleep(0.025)
    if _populated(cgroup):
        raise SandboxError(
            f"cgroup {cgroup} still has processes after {timeout:.0f}s: {_cgroup_pids(cgroup)}"
        )
    # remove the tree bottom-up; the kernel may need a moment after the last exit
    while True:
        dirs = sorted(
            (p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        try:
            for d in [*dirs, cgroup]:
                d.rmdir()
            return
        except FileNotFoundError:
            continue
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SandboxError(f"cannot remove cgroup {cgroup}: {exc}") from exc
            time.sleep(0.05)


def _loop_mounts() -> list[tuple[str, str, str]]:
    """(device, mount point, backing file) of each loop mount in our mount namespace."""
    result: list[tuple[str, str, str]] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, mnt = line.split()[:2]
            if not dev.startswith("/dev/loop"):
                continue
            backing = Path("/sys/block") / Path(dev).name / "loop" / "backing_file"
            with contextlib.suppress(OSError):
                result.append((dev, mnt.replace("\\040", " "), backing.read_text().strip()))
    return result


def cleanup_stale() -> list[str]:
    """Remove what crashed earlier runs of this module left: sandboxes, then volumes.

    Only cgroups named ``sandbox-spaceguard-<owner>-*`` and loop mounts of images named
    ``*-<owner>-*.sgvol.img`` whose owner process is gone are touched; processes are
    killed by cgroup, never by name. Returns what was cleaned, for a log line.
    """
    cleaned: list[str] = []
    root = cgroup_root()
    for cg in sorted(root.glob(CGROUP_PREFIX + "*")):
        owner = cg.name[len(CGROUP_PREFIX) :].split("-", 1)[0]
        if cg.is_dir() and not _owner_alive(owner):
            _kill_cgroup(cg)
            cleaned.append(str(cg))
    for _dev, mnt, backing in _loop_mounts():
        name = Path(backing.removesuffix(" (deleted)")).name
        if not name.endswith(IMAGE_SUFFIX):
            continue
        owner = name.removesuffix(IMAGE_SUFFIX).rsplit("-", 2)[-2]
        if not _owner_alive(owner):
            subprocess.run(["umount", mnt], capture_output=True, check=False)
            cleaned.append(mnt)
    return cleaned


# --------------------------------------------------------------------------- sandbox


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    if len(text) > limit:
        text = "...\n" + text[-limit:]
    return text.strip() or "(empty)"


class SystemdSandbox:
    """A real systemd + system bus in namespaces of their own; see the module doc.

    ``directory`` holds everything of the sandbox: ``units/`` (its only unit path),
    ``run/`` (its ``/run``: bus socket at ``run/dbus/system_bus_socket``), ``init``,
    ``systemd.out`` (systemd's own log) and ``pid`` (its PID 1 as seen from the host).
    """

    _live: ClassVar[weakref.WeakSet[SystemdSandbox]] = weakref.WeakSet()

    def __init__(self, directory: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.units_dir = self.directory / "units"
        self.run_dir = self.directory / "run"
        self.log_path = self.directory / "systemd.out"
        self.name = name or f"{CGROUP_PREFIX}{_owner_tag()}-{next(_SEQ)}"
        self.cgroup = cgroup_root() / self.name
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.units_dir.mkdir(exist_ok=True)

    # -- state

    @classmethod
    def live(cls) -> list[SystemdSandbox]:
        """Sandboxes of this process that are up."""
        return [sb for sb in cls._live if sb.is_up]

    @property
    def is_up(self) -> bool:
        return self._pid is not None

    @property
    def pid(self) -> int:
        """PID 1 of the sandbox as seen from the host."""
        if self._pid is None:
            raise SandboxError("sandbox is not up")
        return self._pid

    @property
    def bus_socket(self) -> Path:
        return self.run_dir / "dbus" / "system_bus_socket"

    @property
    def bus_address(self) -> str:
        """The sandbox's system bus, for ``MessageBus(bus_address=...)`` on the host."""
        if not self.is_up:
            raise SandboxError("sandbox is not up")
        return f"unix:path={self.bus_socket}"

    def host_path(self, path: str) -> Path:
        """Host path of a file the sandbox sees under ``/run`` (else the same path)."""
        p = Path(path)
        if p == Path("/run") or Path("/run") in p.parents:
            return self.run_dir / p.relative_to("/run")
        return p

    # -- units

    def add_unit(self, name: str, text: str) -> Path:
        """Write a unit file; call :meth:`daemon_reload` afterwards if already up."""
        if "/" in name or not name:
            raise ValueError(f"bad unit name {name!r}")
        path = self.units_dir / name
        path.write_text(text if text.endswith("\n") else text + "\n")
        return path

    def add_units(self, units: UnitSource) -> None:
        """Add units from a ``{name: text}`` mapping, or from unit files / directories."""
        if isinstance(units, Mapping):
            for name, text in units.items():
                self.add_unit(name, text)
            return
        for src in units:
            p = Path(src)
            if p.is_dir():
                shutil.copytree(p, self.units_dir, dirs_exist_ok=True)
            elif p.is_file():
                shutil.copy(p, self.units_dir / p.name)
            else:
                raise SandboxError(f"no unit file or directory {p}")

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def _prepare_units(self) -> None:
        for t in _STANDIN_TARGETS:
            path = self.units_dir / f"{t}.target"
            if not path.exists():
                path.write_text(f"[Unit]\nDescription={t} (sandbox)\n")
        default = self.units_dir / "default.target"
        if not default.exists():
            default.write_text(
                "[Unit]\nDescription=sandbox default\n"
                "Requires=basic.target dbus.socket systemd-journald.socket\n"
                "Wants=systemd-journald.service\n"  # up at boot: journal() can --sync
                "After=basic.target systemd-journald.service\n"
            )
        for unit in _CORE_UNITS:
            if not (self.units_dir / unit).exists():
                shutil.copy(SYSTEM_UNIT_DIR / unit, self.units_dir / unit)

    def _write_init(self) -> Path:
        q = shlex.quote
        init = self.directory / "init"
        kmsg = self.directory / "kmsg"
        kmsg.unlink(missing_ok=True)
        os.mkfifo(kmsg)
        # systemd logs to its journal once journald runs, to kmsg before (and if
        # journald fails). Inside, /dev/kmsg is a FIFO that a `cat` (holding it open
        # read-write, so it never sees EOF) copies into systemd.out: early messages land
        # there, not in the host's kernel log, and can be shown when a boot fails.
        # journald is told not to read kmsg (drop-in under the sandbox's /run).
        init.write_text(
            "#!/bin/sh\n"
            "set -e\n"
            f"mount --bind {q(str(self.run_dir))} /run\n"
            "mkdir -p /run/dbus\n"
            "mount -t cgroup2 none /sys/fs/cgroup\n"
            f"cat 0<>{q(str(kmsg))} >>{q(str(self.log_path))} 2>&1 &\n"
            f"mount --bind {q(str(kmsg))} /dev/kmsg\n"
            f"export container=spaceguard-sandbox SYSTEMD_UNIT_PATH={q(str(self.units_dir))}\n"
            "export SYSTEMD_LOG_COLOR=0 SYSTEMD_COLORS=0\n"
            f"exec {SYSTEMD} --system --log-target=journal-or-kmsg --show-status=false"
            f" </dev/null >>{q(str(self.log_path))} 2>&1\n"
        )
        init.chmod(0o755)
        dropin = self.run_dir / "systemd" / "journald.conf.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "sandbox.conf").write_text("[Journal]\nReadKMsg=no\n")
        return init

    # -- lifecycle

    def up(self, units: UnitSource | None = None, *, timeout: float = 20.0) -> SystemdSandbox:
        """Boot systemd with ``units`` (plus any added before) and wait until it runs.

        Raises :class:`SandboxError` (with systemd's own output) when it does not boot;
        nothing of the failed attempt is left running.
        """
        if self.is_up:
            raise SandboxError("sandbox is already up")
        missing = missing_for_sandbox()
        if missing:
            raise SandboxError("cannot boot a systemd sandbox: " + "; ".join(missing))
        if units is not None:
            self.add_units(units)
        self._prepare_units()
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)  # a stale bus socket must not fool the wait below
        self.run_dir.mkdir()
        self.log_path.write_text("")
        init = self._write_init()
        (self.directory / "pid").unlink(missing_ok=True)
        self.cgroup.mkdir()
        out = (self.directory / "unshare.out").open("wb")
        try:
            # The shell moves itself into the sandbox's cgroup, then becomes `unshare`;
            # its child (PID 1 inside) becomes systemd. We keep the Popen to reap it.
            self._proc = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    'echo $$ > "$0" && exec "$@"',
                    str(self.cgroup / "cgroup.procs"),
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--mount-proc",
                    "--cgroup",
                    "--propagation",
                    "private",
                    str(init),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        SystemdSandbox._live.add(self)
        try:
            self._wait_booted(timeout)
        except BaseException:
            with contextlib.suppress(SandboxError):
                self.down()
            raise
        return self

    def _boot_failure(self, what: str) -> NoReturn:
        raise SandboxError(
            f"systemd sandbox in {self.directory} did not boot: {what}\n"
            f"--- systemd.out ---\n{_tail(self.log_path)}\n"
            f"--- unshare.out ---\n{_tail(self.directory / 'unshare.out')}"
        )

    def _find_systemd(self) -> int | None:
        assert self._proc is not None
        try:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text()
        except OSError:
            return None
        for child in children.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return None

    def _wait_booted(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        pid: int | None = None
        while True:
            if self._proc.poll() is not None:
                self._boot_failure(f"unshare exited with {self._proc.returncode}")
            if pid is None:
                pid = self._find_systemd()
            if pid is not None and self.bus_socket.is_socket():
                break
            if time.monotonic() > deadline:
                self._boot_failure(
                    f"no systemd process / bus socket after {timeout:.0f}s (systemd pid: {pid})"
                )
            time.sleep(0.02)
        self._pid = pid
        (self.directory / "pid").write_text(f"{pid}\n")
        left = max(1.0, deadline - time.monotonic())
        try:
            res = self.exec("systemctl", "is-system-running", "--wait", timeout=left)
        except subprocess.TimeoutExpired:
            self._boot_failure("`systemctl is-system-running --wait` timed out")
        state = res.stdout.strip()
        if state not in {"running", "degraded"}:
            self._boot_failure(f"system state {state!r}: {res.stderr.strip()}")

    def down(self, timeout: float = 10.0) -> None:
        """Kill everything inside (by cgroup), remove the cgroup tree, reap ``unshare``.

        Idempotent; safe to call after a failed ``up``.
        """
        self._pid = None
        error: SandboxError | None = None
        try:
            _kill_cgroup(self.cgroup, timeout)
        except SandboxError as exc:
            error = exc
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        (self.directory / "pid").unlink(missing_ok=True)
        SystemdSandbox._live.discard(self)
        if error is not None:
            raise error

    def __enter__(self) -> SystemdSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- commands inside

    def exec(
        self,
        *cmd: str,
        check: bool = False,
        timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the sandbox's PID + mount namespaces (its /run, its bus)."""
        env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", PAGER="cat")
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-p", "-m", *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
            env=env,
        )

    def systemctl(
        self, *args: str, check: bool = True, timeout: float | None = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl --no-pager ARGS`` inside; raises SandboxError if it fails and check."""
        res = self.exec("systemctl", "--no-pager", *args, timeout=timeout)
        if check and res.returncode != 0:
            raise SandboxError(
                f"systemctl {' '.join(args)} failed ({res.returncode}): "
                f"{res.stderr.strip() or res.stdout.strip()}"
            )
        return res

    def journal(self, unit: str | None = None, *args: str) -> str:
        """The journal (of ``unit``, if given) as plain message lines."""
        self.exec("journalctl", "--sync", timeout=10)
        cmd = ["journalctl", "--no-pager", "-q", "-o", "cat", *args]
        if unit is not None:
            cmd += ["-u", unit]
        return self.exec(*cmd, timeout=30).stdout

    def show(self, unit: str, prop: str) -> str:
        """One property of ``unit`` (``systemctl show -p PROP --value``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def wait_for(
        self,
        unit: str,
        prop: str,
        values: str | Iterable[str],
        timeout: float = 10.0,
        interval: float = 0.05,
    ) -> str:
        """Poll ``prop`` of ``unit`` until it is one of ``values``; return it.

        Raises SandboxError (with the unit's status and journal) on timeout.
        """
        wanted = {values} if isinstance(values, str) else set(values)
        deadline = time.monotonic() + timeout
        while True:
            value = self.show(unit, prop)
            if value in wanted:
                return value
            if time.monotonic() > deadline:
                status = self.systemctl("status", unit, check=False).stdout
                raise SandboxError(
                    f"{unit}: {prop}={value!r}, wanted {sorted(wanted)} within {timeout}s\n"
                    f"{status}\n--- journal ---\n{self.journal(unit)[-3000:]}"
                )
            time.sleep(interval)

    def unit_cgroup(self, unit: str) -> Path:
        """Host path of ``unit``'s cgroup (e.g. to read its ``cgroup.events``)."""
        cg = self.show(unit, "ControlGroup")
        if not cg:
            raise SandboxError(f"{unit} has no cgroup (not running?)")
        return self.cgroup / cg.lstrip("/")

    def __repr__(self) -> str:
        state = f"up pid={self._pid}" if self.is_up else "down"
        return f"<SystemdSandbox {self.directory} {self.name} {state}>"


# --------------------------------------------------------------------------- volumes


class LoopVolume:
    """A small real ext4 volume in an image file, loop-mounted on the host.

    Made with ``mkfs.ext4 -m 0`` (no root reserve, so ``f_bavail == f_bfree``) unless
    ``reserved_percent`` says otherwise. Mount it BEFORE booting a sandbox that must see
    it. ``umount()`` detaches the loop device (``-o loop`` auto-clears) and deletes the
    image unless ``keep_image``.
    """

    def __init__(
        self,
        mountpoint: str | os.PathLike[str],
        size_mib: int = 64,
        *,
        options: Sequence[str] = (),
        image: str | os.PathLike[str] | None = None,
        reserved_percent: int = 0,
        inodes: int | None = None,
        keep_image: bool = False,
    ) -> None:
        if size_mib < 2:
            raise ValueError("an ext4 loop volume needs at least 2 MiB")
        self.mountpoint = Path(mountpoint).resolve()
        self.size_mib = size_mib
        self.options = tuple(options)
        if image is None:
            image = self.mountpoint.parent / (
                f"{self.mountpoint.name}-{_owner_tag()}-{next(_SEQ)}{IMAGE_SUFFIX}"
            )
        self.image = Path(image).resolve()
        self.reserved_percent = reserved_percent
        self.inodes = inodes
        self.keep_image = keep_image
        self.mounted = False

    def mount(self) -> LoopVolume:
        if self.mounted:
            return self
        missing = missing_for_volumes()
        if missing:
            raise SandboxError("cannot make a loop volume: " + "; ".join(missing))
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with self.image.open("wb") as f:
            f.truncate(self.size_mib * 1024 * 1024)
        mkfs = ["mkfs.ext4", "-q", "-F", "-m", str(self.reserved_percent)]
        if self.inodes is not None:
            mkfs += ["-N", str(self.inodes)]
        self._run([*mkfs, str(self.image)])
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        opts = ",".join(("loop", *self.options))
        self._run(["mount", "-t", "ext4", "-o", opts, str(self.image), str(self.mountpoint)])
        self.mounted = True
        return self

    def umount(self) -> None:
        if self.mounted:
            deadline = time.monotonic() + 10
            while True:
                res = subprocess.run(
                    ["umount", str(self.mountpoint)], capture_output=True, text=True, check=False
                )
                if res.returncode == 0 or not os.path.ismount(self.mountpoint):
                    break
                if time.monotonic() > deadline:
                    raise SandboxError(f"umount {self.mountpoint}: {res.stderr.strip()}")
                time.sleep(0.1)
            self.mounted = False
        if not self.keep_image:
            self.image.unlink(missing_ok=True)

    @staticmethod
    def _run(cmd: list[str]) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SandboxError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.mountpoint)

    @property
    def usable_bytes(self) -> int:
        """Bytes an unprivileged writer can still use (``f_bavail``)."""
        st = self.statvfs()
        return st.f_bavail * st.f_frsize

    @property
    def total_bytes(self) -> int:
        st = self.statvfs()
        return st.f_blocks * st.f_frsize

    def __enter__(self) -> LoopVolume:
        return self.mount()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.umount()

    def __fspath__(self) -> str:
        return str(self.mountpoint)

    def __repr__(self) -> str:
        return f"<LoopVolume {self.mountpoint} {self.size_mib}MiB mounted={self.mounted}>"


# --------------------------------------------------------------------------- helpers


def exec_line(args: Sequence[str]) -> str:
    """A command line for ``ExecStart=``: quoted, with systemd's ``%`` and ``$`` escaped."""
    return " ".join(shlex.quote(a).replace("%", "%%").replace("$", "$$") for a in args)


def writer_service(
    directory: str | os.PathLike[str],
    nbytes: int,
    status: str | os.PathLike[str],
    *,
    python: str | None = None,
    name: str = "writer.bin",
    rate: int | None = None,
    resume: bool = False,
    fsync: bool = False,
    extra: str = "",
) -> str:
    """Text of a ``.service`` that runs ``writer.py`` (a stand-in for a migration).

    ``status`` must not be on the volume being filled (an ENOSPC note would not fit).
    ``extra`` is appended to the ``[Service]`` section (e.g. ``"User=nobody\\n"``).
    """
    args = [
        python or sys.executable,
        str(WRITER_SCRIPT),
        str(directory),
        str(nbytes),
        "--status",
        str(status),
        "--name",
        name,
    ]
    if rate is not None:
        args += ["--rate", str(rate)]
    if resume:
        args.append("--resume")
    if fsync:
        args.append("--fsync")
    return (
        "[Unit]\nDescription=spaceguard test writer\n\n"
        "[Service]\nType=exec\n"
        f"ExecStart={exec_line(args)}\n"
        "Environment=PYTHONUNBUFFERED=1\n"
        f"{extra}"
    )


_READABLE_PACKAGE: Path | None = None


def readable_package_dir() -> Path:
    """A copy of the spaceguard package that any uid can import (PYTHONPATH for tests that
    run spaceguardctl as another user: the checkout may sit under a 0700 directory)."""
    global _READABLE_PACKAGE
    if _READABLE_PACKAGE is None or not _READABLE_PACKAGE.exists():
        source = Path(__file__).resolve().parents[1] / "daemon" / "spaceguard"
        target = Path(tempfile.mkdtemp(prefix="spaceguard-pkg-"))
        shutil.copytree(source, target / "spaceguard", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [target, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _READABLE_PACKAGE = target
        atexit.register(shutil.rmtree, target, True)
    return _READABLE_PACKAGE


def terminate(process: subprocess.Popen[Any]) -> None:
    """Stop a helper process (SIGTERM, then SIGKILL after 10 s) and reap it."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
