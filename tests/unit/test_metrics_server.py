"""MetricsServer on a real TCP socket: bounded by design. At most max_connections at once
(the next is answered 503 at once, its request unread), a whole-request deadline that a
client dripping its headers cannot stretch, and the slots free again afterwards."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry
from spaceguard.metrics import MetricsServer


def run(body) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(body(), timeout=60))


async def get(port: int, path: str = "/metrics") -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_connections_beyond_the_cap_are_refused_at_once() -> None:
    async def body() -> None:
        server = MetricsServer(
            CollectorRegistry(), "127.0.0.1:0", max_connections=4, request_deadline=30
        )
        await server.start()
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        await until(lambda: server.connections == 4)
        status, text = await get(server.port)  # the fifth: told at once, not after 30 s
        assert status == "HTTP/1.0 503 Service Unavailable"
        assert text == b"more than 4 connections at once; try again\n"
        assert server.refused == 1
        for _, writer in idle:
            writer.close()
        await until(lambda: server.connections == 0)
        status, text = await get(server.port)
        assert status == "HTTP/1.0 200 OK"
        await server.close()

    run(body)


def test_a_dripping_client_is_cut_off_at_the_request_deadline() -> None:
    async def body() -> None:
        server = MetricsServer(CollectorRegistry(), "127.0.0.1:0", request_deadline=0.5)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        closed = asyncio.create_task(reader.read())
        request = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 10_000
        sent = 0
        # one byte every 50 ms: a deadline per byte would never come; the close comes
        # while the client is still dripping
        while not closed.done():
            writer.write(request[sent : sent + 1])
            sent += 1
            await asyncio.sleep(0.05)
        assert await closed == b""
        assert sent < len(request)
        writer.close()
        await until(lambda: server.connections == 0)
        assert (await get(server.port))[0] == "HTTP/1.0 200 OK"
        await server.close()

    run(body)
