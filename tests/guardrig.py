"""Run the real guard as a Type=notify unit inside a systemd sandbox.

Shared by the integration tests, the benchmarks and the demo. The shipped
`systemd/spaceguard.service` is installed as is; a drop-in only points it at this
checkout's Python, the test config and state directory, runs it as root (the sandbox has
no polkit to grant an unprivileged user anything), and shortens the watchdog.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.sandbox import SandboxError, SystemdSandbox

REPO = Path(__file__).resolve().parents[1]
GUARD_UNIT = "spaceguard.service"
WRITER = REPO / "tests" / "integration" / "writer.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def writer_unit(
    python: str,
    directory: Path,
    size: str,
    status: Path,
    *,
    resume: bool = False,
    rate: str | None = None,
    description: str = "migration stand-in",
) -> str:
    """A migration stand-in: writes SIZE into DIRECTORY, surviving ENOSPC."""
    args = [python, str(WRITER), str(directory), size, "--status", str(status)]
    if resume:
        args.append("--resume")
    if rate:
        args += ["--rate", rate]
    return textwrap.dedent(f"""\
        [Unit]
        Description={description}
        [Service]
        Type=simple
        ExecStart={" ".join(args)}
        """)


class GuardRig:
    def __init__(
        self,
        sandbox: SystemdSandbox,
        workdir: Path,
        python: str,
        watchdog_sec: int = 3,
        log_level: str = "debug",
    ) -> None:
        self.sandbox = sandbox
        self.workdir = workdir
        self.python = python
        self.watchdog_sec = watchdog_sec
        self.log_level = log_level  # benchmarks use "info": debug lines cost time
        self.config_path = workdir / "spaceguard.toml"
        self.state_dir = workdir / "state"
        self.metrics_port = free_port()
        self.socket_path = "/run/spaceguard/control.sock"

    @property
    def host_socket(self) -> Path:
        return self.sandbox.host_path(self.socket_path)

    def guard_section(self) -> str:
        return textwrap.dedent(f"""\
            [guard]
            state_dir = "{self.state_dir}"
            control_socket = "{self.socket_path}"
            metrics_listen = "127.0.0.1:{self.metrics_port}"
            log_level = "{self.log_level}"
            """)

    def write_config(self, body: str) -> None:
        """`body` is everything after [guard] (volumes, migrations, ...)."""
        self.config_path.write_text(self.guard_section() + "\n" + textwrap.dedent(body))

    def install(self) -> None:
        """Add the shipped unit plus the test drop-in (before or after sandbox.up())."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shipped = (REPO / "systemd" / GUARD_UNIT).read_text()
        self.sandbox.add_unit(GUARD_UNIT, shipped)
        dropin_dir = self.sandbox.units_dir / f"{GUARD_UNIT}.d"
        dropin_dir.mkdir(exist_ok=True)
        command = f"{self.python} -m spaceguard"
        (dropin_dir / "test.conf").write_text(
            textwrap.dedent(f"""\
            [Service]
            User=
            Group=
            SupplementaryGroups=
            Environment=PYTHONPATH={REPO / "daemon"}
            ExecStartPre=
            ExecStartPre={command} check-config {self.config_path}
            ExecStart=
            ExecStart={command} run --config {self.config_path}
            WatchdogSec={self.watchdog_sec}s
            RestartSec=200ms
            # tests keep their files under /tmp and /root
            PrivateTmp=no
            ProtectHome=no
            ReadWritePaths={self.workdir}
            """)
        )
        if self.sandbox.is_up:
            self.sandbox.daemon_reload()

    def start(self) -> None:
        """Start the guard; with Type=notify this returns once it sent READY=1."""
        try:
            self.sandbox.systemctl("start", GUARD_UNIT, timeout=60)
        except SandboxError as error:
            raise SandboxError(
                f"{error}\n--- guard journal ---\n{self.journal()[-4000:]}"
            ) from None

    def stop(self) -> None:
        self.sandbox.systemctl("stop", GUARD_UNIT, timeout=60)

    def journal(self) -> str:
        return self.sandbox.journal(GUARD_UNIT)

    def main_pid(self) -> int:
        return int(self.sandbox.show(GUARD_UNIT, "MainPID") or 0)

    def status_text(self) -> str:
        return self.sandbox.show(GUARD_UNIT, "StatusText")

    def metrics_text(self) -> str:
        """The guard's /metrics page, as Prometheus scrapes it."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            return str(response.read().decode())

    def metrics(self) -> dict[str, float]:
        """Scrape the guard: {'name{labels}': value}."""
        text = self.metrics_text()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def saved_state(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.state_dir / "state.json").read_text())
        return data


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.05,
    on_timeout: Callable[[], str] | None = None,
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")
        time.sleep(interval)


def read_status(path: Path) -> list[tuple[str, int]]:
    """The writer's status file as [(word, bytes)]."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        word, written, *_ = line.split()
        entries.append((word, int(written)))
    return entries


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
