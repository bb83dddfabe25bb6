#!/usr/bin/env python3
"""Control-socket figures: `spaceguardctl status` round trip, and the guard's reaction to a
threshold crossing while 200 clients hammer the socket (compared with a quiet socket).

    sudo .venv/bin/python bench/control_latency.py [--trials 10] [--clients 200]

Real parts: the guard as a unit in a sandboxed systemd, its real control socket, a 1 GiB
ext4 volume (nodelalloc) and an unthrottled writer (see bench/space_reaction.py).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from space_reaction import run_trials

from tests.guardrig import REPO, GuardRig

REQUEST = json.dumps({"v": 1, "verb": "status", "args": {}}).encode() + b"\n"


def round_trip(path: Path) -> float:
    """One status request on a fresh connection, as spaceguardctl does it (seconds)."""
    started = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(REQUEST)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            reply += chunk
    elapsed = time.perf_counter() - started
    if not json.loads(reply)["ok"]:
        raise RuntimeError(reply)
    return elapsed


class Hammer:
    """N clients, each on its own connection, sending status requests back to back."""

    def __init__(self, path: Path, clients: int) -> None:
        self.path, self.clients = path, clients
        self.stop = threading.Event()
        self.requests = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.settimeout(10)
                    client.connect(str(self.path))
                    reader = client.makefile("rb")
                    while not self.stop.is_set():
                        client.sendall(REQUEST)
                        if not reader.readline():
                            break
                        self.requests += 1
            except OSError as error:
                self.errors += 1
                kind = type(error).__name__ + (f" {error.errno}" if error.errno else "")
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
                time.sleep(0.01)

    def __enter__(self) -> Hammer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--clients", type=int, default=200)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="spaceguard-bench-") as tmp:
        work = Path(tmp)
        for name in ("quiet", "busy"):
            (work / name).mkdir()

        latencies: list[float] = []
        ctl_times: list[float] = []

        def measure_status(rig: GuardRig) -> None:
            for _ in range(200):
                latencies.append(round_trip(rig.host_socket))
                time.sleep(0.01)  # one operator at a time, not a burst
            env = {"PYTHONPATH": str(REPO / "daemon")}
            for _ in range(5):
                started = time.perf_counter()
                subprocess.run(
                    [python, "-m", "spaceguard.ctl", "--socket", str(rig.host_socket), "status"],
                    check=True,
                    capture_output=True,
                    env=env,
                )
                ctl_times.append(time.perf_counter() - started)

        quiet, *_ = run_trials(
            python, args.trials, "0s", work / "quiet", [], before_trials=measure_status
        )
        print(
            f"status round trip over the socket (200 requests): median "
            f"{statistics.median(latencies) * 1000:.2f} ms, worst {max(latencies) * 1000:.2f} ms"
        )
        print(
            f"`spaceguardctl status` as a command (Python start-up included): median "
            f"{statistics.median(ctl_times) * 1000:.0f} ms"
        )

        hammers: list[Hammer] = []

        def start_hammer(rig: GuardRig) -> None:
            hammer = Hammer(rig.host_socket, args.clients)
            hammers.append(hammer.__enter__())
            time.sleep(1)

        def stop_hammer() -> None:
            for hammer in hammers:
                hammer.__exit__()

        try:
            busy, *_ = run_trials(
                python,
                args.trials,
                "0s",
                work / "busy",
                [],
                before_trials=start_hammer,
                after_trials=stop_hammer,
            )
        finally:
            stop_hammer()
        requests = sum(h.requests for h in hammers)
        print(f"reaction, threshold crossing -> frozen, {args.trials} trials each (predict off):")
        if quiet:
            print(
                f"  quiet socket:                 median {statistics.median(quiet):.1f} ms, "
                f"worst {max(quiet):.1f} ms"
            )
        if busy:
            print(
                f"  {args.clients} clients hammering status: median "
                f"{statistics.median(busy):.1f} ms, worst {max(busy):.1f} ms "
                f"({requests} requests answered meanwhile, "
                f"{sum(h.errors for h in hammers)} client errors: "
                f"{hammers[0].error_kinds if hammers else {}})"
            )
        if quiet and busy:
            ratio = statistics.median(busy) / statistics.median(quiet)
            print(f"  degradation of the median: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
