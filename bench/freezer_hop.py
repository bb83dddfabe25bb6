#!/usr/bin/env python3
"""What the freezer helper adds to a freeze: FreezeUnit round trips of the same idle unit,
sent directly by root and sent by the spaceguard user through spaceguard-freezer, in
alternating rounds, in a sandboxed systemd with the shipped units.

    sudo .venv/bin/python bench/freezer_hop.py [--rounds 4] [--calls 100] [--load 2]

--load N runs N busy loops on the host meanwhile (a migration writing at full speed keeps
a core busy; the helper must then be scheduled on the reaction path). Each call is a
freeze (timed) and a thaw (not timed) of a `sleep infinity` unit. Prints figures; asserts
nothing. The reaction figures with a real writer are bench/space_reaction.py's
(--as-shipped against without).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.installed import FREEZER, PYTHON, Installation, shipped_workdir
from tests.sandbox import SystemdSandbox

UNIT = "sleeper@hop.service"
CLIENT = """\
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from spaceguard.freezer import FreezerClient

UNIT, CALLS = sys.argv[4], int(sys.argv[3])

async def main():
    if sys.argv[1] == "helper":
        client = FreezerClient(Path("/run/spaceguard-freezer/freezer.sock"))
        await client.connect()
        async def op(verb):
            await client.request(verb, UNIT)
    else:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        async def op(verb):
            member = {"freeze": "FreezeUnit", "thaw": "ThawUnit"}[verb]
            reply = await bus.call(Message(
                destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
                interface="org.freedesktop.systemd1.Manager", member=member,
                signature="s", body=[UNIT]))
            assert reply.message_type != MessageType.ERROR, reply.body
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        await op("freeze")
        times.append((time.perf_counter() - started) * 1000)
        await op("thaw")
        await asyncio.sleep(0.005)
    print(json.dumps(times))

asyncio.run(main())
"""


def figures(times: list[float]) -> str:
    ordered = sorted(times)
    return (
        f"median {statistics.median(ordered):.2f} ms, p90 {ordered[int(len(ordered) * 0.9)]:.2f}"
        f" ms, worst {ordered[-1]:.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--load", type=int, default=0, help="busy loops on the host meanwhile")
    args = parser.parse_args()
    work = shipped_workdir("hop-")
    install = Installation(work, f"hop-{work.name}")
    sandbox = SystemdSandbox(work / "sandbox")
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        install.install_host_files()
        install.write_config(
            f'[guard]\nstate_dir = "{install.state_dir}"\n'
            '[volumes.v]\npath = "/"\nrequire_mount = false\n'
            f'[[migrations]]\naccount = "hop"\nunit = "{UNIT}"\nvolume = "v"\n'
        )
        client = work / "client.py"
        client.write_text(CLIENT)
        client.chmod(0o644)
        install.install_units(sandbox)
        sandbox.add_units({UNIT: "[Service]\nExecStart=/bin/sleep infinity\n"})
        sandbox.up()
        sandbox.systemctl("start", UNIT, FREEZER)
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)
        ]
        results: dict[str, list[float]] = {"direct": [], "helper": []}
        for _ in range(args.rounds):
            for path in ("direct", "helper"):
                as_user = (
                    ["setpriv", "--reuid=spaceguard", "--regid=spaceguard", "--init-groups"]
                    if path == "helper"
                    else []
                )
                out = sandbox.exec(
                    *as_user,
                    PYTHON,
                    str(client),
                    path,
                    str(install.package_dir),
                    str(args.calls),
                    UNIT,
                    timeout=600,
                )
                if out.returncode != 0:
                    raise SystemExit(f"{path} client failed: {out.stderr[-2000:]}")
                results[path] += json.loads(out.stdout)
        print(
            f"FreezeUnit of an idle unit, {args.rounds} x {args.calls} calls each way, "
            f"{args.load} busy loops on the host:"
        )
        print(f"  direct (root, over D-Bus):            {figures(results['direct'])}")
        print(f"  through the helper (user spaceguard): {figures(results['helper'])}")
        added = statistics.median(results["helper"]) - statistics.median(results["direct"])
        print(f"  the helper adds {added:+.2f} ms to the median")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        sandbox.down()
        install.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
