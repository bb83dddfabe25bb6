#!/usr/bin/python3
"""dbus-next 0.2.3 (made sound by the adapter: spaceguard.systemd.open_bus) against
dbus-fast 1.84.2, both as Debian 12 ships them, on one interpreter and one sandbox:
200 FreezeUnit + 200 ThawUnit calls (64 in flight), and 200 units read in full (GetAll of
their Unit and Service interfaces); wall time and this process's CPU, median of 5.

    apt-get install python3-dbus-next python3-dbus-fast
    sudo /usr/bin/python3 bench/dbus_libs.py

Prints figures; asserts nothing.
"""

# ruff: noqa: E501
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

import dbus_fast as fm  # noqa: E402
import dbus_fast.aio as fa  # noqa: E402
import dbus_next.constants as nc  # noqa: E402
import dbus_next.message as nm  # noqa: E402
from spaceguard.systemd import close_bus, open_bus  # noqa: E402

from tests.sandbox import SystemdSandbox  # noqa: E402

N = 200
SYS = "org.freedesktop.systemd1"
MP = "/org/freedesktop/systemd1"
MGR = "org.freedesktop.systemd1.Manager"


async def run(lib, address, names, paths):
    if lib == "dbus-next":
        bus = await open_bus(address).connect()
        Message = nm.Message
        ERR = nc.MessageType.ERROR
    else:
        bus = await fa.MessageBus(bus_address=address).connect()
        Message = fm.Message
        ERR = fm.MessageType.ERROR
    sem = asyncio.Semaphore(64)

    async def call(dest, path, iface, member, sig, body):
        async with sem:
            r = await bus.call(
                Message(
                    destination=dest,
                    path=path,
                    interface=iface,
                    member=member,
                    signature=sig,
                    body=body,
                )
            )
        assert r.message_type != ERR, r.body
        return r

    out = {}
    for what in ("freeze+thaw", "read"):
        walls, cpus = [], []
        for _rep in range(5):
            c0, t0 = time.process_time(), time.monotonic()
            if what == "freeze+thaw":
                await asyncio.gather(*(call(SYS, MP, MGR, "FreezeUnit", "s", [n]) for n in names))
                await asyncio.gather(*(call(SYS, MP, MGR, "ThawUnit", "s", [n]) for n in names))
            else:
                await asyncio.gather(
                    *(
                        call(SYS, p, "org.freedesktop.DBus.Properties", "GetAll", "s", [i])
                        for p in paths
                        for i in (
                            "org.freedesktop.systemd1.Unit",
                            "org.freedesktop.systemd1.Service",
                        )
                    )
                )
            walls.append((time.monotonic() - t0) * 1000)
            cpus.append((time.process_time() - c0) * 1000)
        out[what] = (statistics.median(walls), statistics.median(cpus))
    if lib == "dbus-next":
        close_bus(bus)
    else:
        bus.disconnect()
    return out


def main() -> None:
    import tempfile

    with (
        tempfile.TemporaryDirectory(prefix="spaceguard-dbus-libs-") as tmp,
        SystemdSandbox(Path(tmp) / "sb") as sb,
    ):
        names = [f"s{i}.service" for i in range(N)]
        sb.up({n: "[Service]\nType=exec\nExecStart=/bin/sleep infinity\n" for n in names})
        sb.systemctl("start", *names)

        async def paths_of():
            bus = await open_bus(sb.bus_address).connect()
            ps = []
            for n in names:
                r = await bus.call(
                    nm.Message(
                        destination=SYS,
                        path=MP,
                        interface=MGR,
                        member="LoadUnit",
                        signature="s",
                        body=[n],
                    )
                )
                ps.append(r.body[0])
            close_bus(bus)
            return ps

        paths = asyncio.run(paths_of())
        for lib in ("dbus-next", "dbus-fast", "dbus-next", "dbus-fast"):
            r = asyncio.run(run(lib, sb.bus_address, names, paths))
            print(
                f"{lib:10s} 200 freezes + 200 thaws: {r['freeze+thaw'][0]:6.1f} ms wall, {r['freeze+thaw'][1]:6.1f} ms CPU; "
                f"400 GetAll (200 units read in full): {r['read'][0]:6.1f} ms wall, {r['read'][1]:6.1f} ms CPU"
            )


if __name__ == "__main__":
    main()
