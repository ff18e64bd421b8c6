"""The balancer in front of service replicas (deploy/local/balancer.py): round-robin per
connection, failing over to a live replica, a 503 problem when none takes the connection.
Plain sockets on loopback; no service needed."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from deploy.local.balancer import Backend, Route, run


async def replica(name: str) -> asyncio.Server:
    """A stand-in replica: answers every request with its name."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            body = name.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(guarded, "127.0.0.1", 0)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def two() -> AsyncIterator[tuple[Route, list[asyncio.Server]]]:
    servers = [await replica("r1"), await replica("r2")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        front = int(s.getsockname()[1])
    route = Route(front, [Backend("127.0.0.1", port_of(s)) for s in servers])
    stop = asyncio.Event()
    task = asyncio.create_task(run([route], "127.0.0.1", None, None, stop))
    await asyncio.sleep(0.05)
    yield route, servers
    stop.set()
    await task
    for s in servers:
        s.close()


async def ask(port: int) -> httpx.Response:
    # a new connection each time: the balancer chooses per connection
    async with httpx.AsyncClient() as c:
        return await c.get(f"http://127.0.0.1:{port}/readyz")


async def test_connections_go_round_robin(two: tuple[Route, list[asyncio.Server]]) -> None:
    route, _ = two
    answers = [(await ask(route.port)).text for _ in range(4)]
    assert answers == ["r1", "r2", "r1", "r2"]


async def test_a_dead_replica_is_passed_over_and_counted(two: tuple[Route, list[asyncio.Server]]) -> None:
    route, servers = two
    servers[0].close()
    await servers[0].wait_closed()
    answers = [(await ask(route.port)).text for _ in range(4)]
    assert answers == ["r2"] * 4
    # it refused once, then was skipped while marked down
    assert route.failovers == 1 and route.backends[0].failures == 1


async def test_no_live_replica_is_a_503_problem(two: tuple[Route, list[asyncio.Server]]) -> None:
    route, servers = two
    for s in servers:
        s.close()
        await s.wait_closed()
    resp = await ask(route.port)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    problem = json.loads(resp.content)
    assert problem["code"] == "no_live_replica" and problem["message_zh"]
    assert route.refused == 1
