"""Smoke tests of the test infrastructure itself: sandbox, D-Bus, loop volumes, writer."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType

from tests.sandbox import (
    WRITER_SCRIPT,
    LoopVolume,
    SystemdSandbox,
    cgroup_root,
    writer_service,
)

SYSTEMD_BUS = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"

SLEEPER = "[Unit]\nDescription=sleeper\n\n[Service]\nExecStart=/bin/sleep infinity\n"


def _status_lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _wait_status(path: Path, word: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for fields in _status_lines(path):
            if fields[0] == word:
                return fields
        time.sleep(0.05)
    raise AssertionError(f"no {word} in {path} after {timeout}s: {_status_lines(path)}")


def test_boots_with_bus_and_journal(sandbox: SystemdSandbox) -> None:
    sandbox.up({"hello.service": "[Service]\nType=oneshot\nExecStart=/bin/echo hello-sandbox\n"})
    assert sandbox.bus_socket.is_socket()
    assert sandbox.bus_address == f"unix:path={sandbox.bus_socket}"
    state = sandbox.systemctl("is-system-running", check=False).stdout.strip()
    assert state in {"running", "degraded"}, state
    # the sandbox lives in its own cgroup on the host, with systemd as its PID 1
    assert sandbox.cgroup.parent == cgroup_root()
    assert sandbox.pid in [
        int(p) for p in (sandbox.cgroup / "init.scope" / "cgroup.procs").read_text().split()
    ]
    sandbox.systemctl("start", "hello.service")
    assert "hello-sandbox" in sandbox.journal("hello.service")
    cgroup = sandbox.cgroup
    sandbox.down()
    assert not cgroup.exists()
    assert not sandbox.is_up


def test_units_added_after_boot(sandbox: SystemdSandbox) -> None:
    sandbox.up()
    sandbox.add_unit("late.service", SLEEPER)
    sandbox.daemon_reload()
    sandbox.systemctl("start", "late.service")
    assert sandbox.wait_for("late.service", "ActiveState", "active") == "active"
    sandbox.systemctl("stop", "late.service")
    assert sandbox.show("late.service", "ActiveState") == "inactive"


async def _freeze_thaw(bus_address: str, unit_name: str) -> tuple[str, str, str]:
    bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
    try:
        intro = await bus.introspect(SYSTEMD_BUS, SYSTEMD_PATH)
        manager = bus.get_proxy_object(SYSTEMD_BUS, SYSTEMD_PATH, intro).get_interface(
            "org.freedesktop.systemd1.Manager"
        )
        await manager.call_start_unit(unit_name, "replace")  # type: ignore[attr-defined]
        path = await manager.call_get_unit(unit_name)  # type: ignore[attr-defined]
        unit_intro = await bus.introspect(SYSTEMD_BUS, path)
        unit = bus.get_proxy_object(SYSTEMD_BUS, path, unit_intro).get_interface(
            "org.freedesktop.systemd1.Unit"
        )
        for _ in range(100):
            if await unit.get_active_state() == "active":  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.02)
        before = await unit.get_freezer_state()  # type: ignore[attr-defined]
        await manager.call_freeze_unit(unit_name)  # type: ignore[attr-defined]
        frozen = await unit.get_freezer_state()  # type: ignore[attr-defined]
        await manager.call_thaw_unit(unit_name)  # type: ignore[attr-defined]
        thawed = await unit.get_freezer_state()  # type: ignore[attr-defined]
        return before, frozen, thawed
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]


def test_freeze_and_thaw_over_dbus_from_host(sandbox: SystemdSandbox) -> None:
    sandbox.up({"sleeper.service": SLEEPER})
    before, frozen, thawed = asyncio.run(
        asyncio.wait_for(_freeze_thaw(sandbox.bus_address, "sleeper.service"), 10)
    )
    assert (before, frozen, thawed) == ("running", "frozen", "running")
    # the kernel agrees: the unit's cgroup on the host is thawed again, still populated
    events = (sandbox.unit_cgroup("sleeper.service") / "cgroup.events").read_text()
    assert "frozen 0" in events and "populated 1" in events
    sandbox.systemctl("freeze", "sleeper.service")
    events = (sandbox.unit_cgroup("sleeper.service") / "cgroup.events").read_text()
    assert "frozen 1" in events
    assert sandbox.show("sleeper.service", "FreezerState") == "frozen"
    # down() must cope with a frozen unit (cgroup.kill kills frozen tasks too)


def test_volume_mounted_before_up_is_writable_inside(
    loop_volume: Callable[..., LoopVolume],
    sandbox: SystemdSandbox,
    venv_python: str,
    tmp_path: Path,
) -> None:
    vol = loop_volume(32, options=["nodelalloc"])
    # mkfs -m 0: no root reserve (ext4 still holds back ~2% for itself: f_bavail < f_bfree)
    assert vol.usable_bytes > 0.9 * vol.total_bytes
    status = tmp_path / "writer.status"
    size = 3 * 1024 * 1024 + 123
    sandbox.up({"writer.service": writer_service(vol.mountpoint, size, status, python=venv_python)})
    sandbox.systemctl("start", "writer.service")
    sandbox.wait_for("writer.service", "ActiveState", {"inactive", "failed"})
    assert sandbox.show("writer.service", "Result") == "success", sandbox.journal("writer.service")
    assert _status_lines(status)[-1][:2] == ["DONE", str(size)]
    assert (vol.mountpoint / "writer.bin").stat().st_size == size
    assert "writer: done" in sandbox.journal("writer.service")


def test_volume_after_up_is_refused(
    loop_volume: Callable[..., LoopVolume], sandbox: SystemdSandbox
) -> None:
    sandbox.up()
    try:
        loop_volume(8)
    except RuntimeError as exc:
        assert "before sandbox.up()" in str(exc)
    else:
        raise AssertionError("a volume mounted after up() must be refused")


def test_writer_survives_enospc_and_finishes(
    loop_volume: Callable[..., LoopVolume], venv_python: str, tmp_path: Path
) -> None:
    vol = loop_volume(16)
    filler = vol.mountpoint / "filler"
    with filler.open("wb") as f:  # leave ~2 MiB free
        f.write(b"\0" * max(0, vol.usable_bytes - 2 * 1024 * 1024))
        f.flush()
    status = tmp_path / "w.status"
    size = 6 * 1024 * 1024
    proc = subprocess.Popen(
        [venv_python, str(WRITER_SCRIPT), str(vol.mountpoint), str(size), "--status", str(status)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stalled = _wait_status(status, "ENOSPC")
        assert 0 < int(stalled[1]) < size
        # space is back: the same process finishes its file (RESUMED, DONE below), so it
        # waited for space rather than exit
        filler.unlink()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    words = [fields[0] for fields in _status_lines(status)]
    assert words == ["START", "ENOSPC", "RESUMED", "DONE"], words
    assert (vol.mountpoint / "writer.bin").stat().st_size == size
    assert proc.stdout is not None and "ENOSPC" in proc.stdout.read()


def test_watchdog_kills_a_service_that_stops_pinging(sandbox: SystemdSandbox) -> None:
    unit = (
        "[Service]\nType=notify\nNotifyAccess=all\nWatchdogSec=2\n"
        "ExecStart=/bin/sh -c 'systemd-notify --ready; "
        "for i in 1 2 3; do sleep 0.3; systemd-notify WATCHDOG=1; done; exec sleep 60'\n"
    )
    sandbox.up({"dog.service": unit})
    sandbox.systemctl("start", "dog.service")  # returns once READY=1 arrived
    assert sandbox.show("dog.service", "ActiveState") == "active"
    assert sandbox.wait_for("dog.service", "Result", "watchdog", timeout=30) == "watchdog"
    assert sandbox.wait_for("dog.service", "ActiveState", "failed") == "failed"
    assert "dog.service: Watchdog timeout (limit 2s)!" in sandbox.journal("dog.service")
