"""Fault (issue 12): crowds on the guard's endpoints while a freeze must happen.

Hundreds of idle connections and slowloris clients (a byte a second) on /metrics and on
the control socket, while a real writer fills a real ext4 loop volume at full speed: the
real guard (a Type=notify unit in the sandbox systemd) still freezes it before ENOSPC.
Each client of the crowd is answered or refused cleanly (a 503 or a closed connection on
/metrics; a reply, "busy" or "timeout" on the control socket), none is held beyond the
guard's deadlines, and both endpoints serve again afterwards.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

from tests.guardrig import GuardRig, read_status, wait_until
from tests.installed import ShippedRig
from tests.integration.test_space_guard import (
    freeze_migration,
    make_ballast,
    setup_writer,
    space_config,
)

IDLE = 300  # of each kind; the guard allows 32 on /metrics, 256 on the control socket
DRIPPERS = 10
WRITER = "writer@alice.service"


def scrape_status(rig: GuardRig) -> int:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{rig.metrics_port}/metrics", timeout=10
        ) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def control(rig: GuardRig, verb: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(rig.host_socket))
        # a guard at its client limit answers "busy" and closes at once: the send may
        # then fail, and the answer is still there to read (spaceguardctl does the same)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps({"v": 1, "verb": verb}).encode() + b"\n")
        reply: dict[str, object] = json.loads(sock.makefile("rb").readline())
    return reply


def first_bytes(sock: socket.socket, timeout: float) -> bytes:
    """What the guard sends before it closes (b"" for a plain close), within `timeout`."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_crowded_endpoints_do_not_stop_a_freeze(loop_volume, sandbox, venv_python, tmp_path):
    volume = loop_volume(256, options=["nodelalloc"])
    ballast = make_ballast(volume, 140)
    status = tmp_path / "writer.status"
    rig = ShippedRig(sandbox, tmp_path, venv_python)
    rig.write_config(space_config(volume, freeze_migration()))
    setup_writer(sandbox, rig, volume, status, "120M", venv_python)
    rig.start()
    pid = rig.main_pid()
    metrics_at = ("127.0.0.1", rig.metrics_port)

    idle_http = [socket.create_connection(metrics_at, timeout=10) for _ in range(IDLE)]
    idle_ctl = []
    for _ in range(IDLE):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(rig.host_socket))
        idle_ctl.append(sock)
    stop = threading.Event()
    drip_results: dict[str, list[bytes]] = {"http": [], "ctl": []}

    def drip(kind: str) -> None:
        if kind == "http":
            sock = socket.create_connection(metrics_at, timeout=10)
            payload = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 1000
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(rig.host_socket))
            payload = b'{"v": 1, "verb": "status", "pad": "' + b"a" * 1000
        sock.setblocking(False)
        got = b""
        with sock:
            for byte in payload:  # a byte a second until the guard answers or closes
                if stop.is_set():
                    break
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break  # closed by the guard
                deadline = time.monotonic() + 1.0
                closed = False
                while time.monotonic() < deadline:
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        time.sleep(0.05)
                        continue
                    except OSError:
                        closed = True
                        break
                    if not chunk:
                        closed = True
                        break
                    got += chunk
                if closed or got.endswith(b"\n"):
                    break
        drip_results[kind].append(got)

    drippers = [
        threading.Thread(target=drip, args=(kind,))
        for kind in ("http", "ctl")
        for _ in range(DRIPPERS)
    ]
    for thread in drippers:
        thread.start()
    try:
        # The freeze must happen while the crowd is there.
        sandbox.systemctl("start", WRITER)
        sandbox.wait_for(WRITER, "FreezerState", "frozen", timeout=30)
        assert not [e for e in read_status(status) if e[0] == "ENOSPC"], (
            "the writer hit ENOSPC before the guard froze it"
        )
        assert volume.usable_bytes > 0
        # Meanwhile, fresh clients are served or refused cleanly.
        assert scrape_status(rig) in (200, 503)
        reply = control(rig, "status")
        assert reply["ok"] or reply["error"]["code"] == "busy", reply  # type: ignore[index]

        # Every idle client was told and let go within the guard's deadlines (5 s).
        http_seen = [first_bytes(sock, 20) for sock in idle_http]
        ctl_seen = [first_bytes(sock, 20) for sock in idle_ctl]
    finally:
        stop.set()
        for thread in drippers:
            thread.join(30)
        for sock in [*idle_http, *idle_ctl]:
            sock.close()
    refused_http = [b for b in http_seen if b.startswith(b"HTTP/1.0 503 Service Unavailable")]
    assert len(refused_http) + http_seen.count(b"") == IDLE, set(http_seen)
    assert len(refused_http) >= IDLE - 32  # at most 32 at once: the rest were refused
    codes = [json.loads(line)["error"]["code"] for line in ctl_seen]
    assert set(codes) <= {"busy", "timeout"}, set(codes)
    assert codes.count("busy") >= IDLE - 256
    # The drippers: cut off (metrics) or told "timeout" (control) while still dripping.
    assert len(drip_results["http"]) == DRIPPERS and len(drip_results["ctl"]) == DRIPPERS
    assert all(got == b"" or got.startswith(b"HTTP/1.0 503") for got in drip_results["http"]), (
        drip_results["http"]
    )
    assert all(
        json.loads(got)["error"]["code"] in ("timeout", "busy") for got in drip_results["ctl"]
    ), drip_results["ctl"]

    # Both endpoints serve again; the guard was never restarted.
    wait_until(lambda: scrape_status(rig) == 200, 10, "/metrics to serve again")
    assert control(rig, "status")["ok"]
    metrics = rig.metrics()
    frozen_ok = [
        value
        for name, value in metrics.items()
        if name.startswith("spaceguard_actions_total{")
        and 'action="freeze"' in name
        and 'result="ok"' in name
    ]
    assert frozen_ok == [1.0], frozen_ok
    assert rig.main_pid() == pid
    journal = rig.journal()
    assert "internal task failed" not in journal
    assert "out of system resource" not in journal
    ballast.unlink()
    sandbox.wait_for(WRITER, "FreezerState", "running", timeout=30)
