"""A small TCP load balancer for the distributed topology (`make up SCALE=city`): one listener
per service in front of its replicas, round-robin per connection, failing over to the next
replica when one does not accept.

Why this and not nginx: it needs nothing installed beyond the project's own Python, it
stays a plain process beside the services in deploy/local, and it counts what the fault
tests report (connections moved to another replica, connections no replica took). Why
per connection (layer 4) and not per request: a request is never re-sent by the balancer
once its bytes went to a replica (a POST is not safe to repeat; the client's
Idempotency-Key retry is), so nothing is gained by parsing HTTP; clients keep several
connections, which spreads them.

    python -m deploy.local.balancer --route 8001=8101,8201 --route 8002=8102,8202 \\
        [--host 127.0.0.1] [--health /readyz] [--status 127.0.0.1:8000]

A replica that refuses a connection, or whose health path does not answer 200, is passed
over for DOWN_FOR_S; when none is live, every one is tried all the same, and when none
accepts, the client gets a 503 problem (code `no_live_replica`, Retry-After: 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("balancer")

CONNECT_TIMEOUT_S = 1.0
DOWN_FOR_S = 2.0
HEALTH_EVERY_S = 1.0
CHUNK = 64 * 1024


@dataclass
class Backend:
    host: str
    port: int
    down_until: float = 0.0  # monotonic; passed over until then
    connections: int = 0
    failures: int = 0  # connections it did not accept

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def live(self, now: float) -> bool:
        return now >= self.down_until

    def mark_down(self, now: float) -> None:
        self.down_until = now + DOWN_FOR_S


@dataclass
class Route:
    """One service: a listening port and its replicas."""

    port: int
    backends: list[Backend]
    connections: int = 0
    failovers: int = 0  # connections sent on to another replica after one did not accept
    refused: int = 0  # connections no replica accepted
    _next: int = field(default=0, repr=False)

    def order(self, now: float) -> list[Backend]:
        """Round-robin start, live replicas first; the others last, in case all are marked."""
        start = self._next % len(self.backends)
        self._next += 1
        rotated = self.backends[start:] + self.backends[:start]
        return [b for b in rotated if b.live(now)] + [b for b in rotated if not b.live(now)]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for n, backend in enumerate(self.order(time.monotonic())):
                try:
                    up_reader, up_writer = await asyncio.wait_for(
                        asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT_S)
                except (OSError, TimeoutError) as exc:
                    backend.failures += 1
                    backend.mark_down(time.monotonic())
                    log.warning("port %d: %s did not accept (%s)", self.port, backend.name,
                                type(exc).__name__)
                    continue
                backend.connections += 1
                self.failovers += int(n > 0)
                await splice(reader, writer, up_reader, up_writer)
                return
            self.refused += 1
            await refuse(reader, writer)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"connections": self.connections, "failovers": self.failovers, "refused": self.refused,
                "backends": {b.name: {"live": b.live(now), "connections": b.connections,
                                      "failures": b.failures} for b in self.backends}}


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
    """Bytes both ways until either side closes; then both are closed, so a client whose
    replica died sees its connection end (and retries) instead of hanging."""
    tasks = [asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            up_writer.close()
            await up_writer.wait_closed()


NO_REPLICA = json.dumps({
    "type": "https://closedloop.example/problems/no_live_replica", "title": "Service unavailable",
    "status": 503, "code": "no_live_replica", "detail": "no replica of this service accepted the connection",
    "message_zh": "该服务暂无可用实例，请稍后重试"}, ensure_ascii=False).encode()


async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A 503 problem, after reading what the client already sent (closing a socket with
    unread data would reset it and lose the answer)."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(reader.read(CHUNK), 0.2)
    head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(NO_REPLICA))
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(head + NO_REPLICA)
        await writer.drain()


async def healthy(backend: Backend, path: str) -> bool:
    """One GET of the health path: True on a 200."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(backend.host, backend.port),
                                                CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {backend.name}\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 2 * CONNECT_TIMEOUT_S)
        return status.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def check_health(routes: list[Route], path: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        backends = [b for r in routes for b in r.backends]
        results = await asyncio.gather(*[healthy(b, path) for b in backends])
        now = time.monotonic()
        for backend, ok in zip(backends, results, strict=True):
            backend.down_until = 0.0 if ok else now + DOWN_FOR_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEALTH_EVERY_S)


async def serve_status(routes: list[Route], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    """Any request to the status port gets the counters as JSON."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(reader.read(CHUNK), 1.0)
    body = json.dumps({str(r.port): r.view() for r in routes}).encode()
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    writer.close()


def parse_route(text: str, host: str) -> Route:
    """`8001=8101,8201` or `8001=127.0.0.1:8101,127.0.0.1:8201`."""
    listen, _, backends = text.partition("=")
    if not backends:
        raise argparse.ArgumentTypeError(f"--route {text!r}: want PORT=BACKEND[,BACKEND...]")
    parsed = []
    for b in backends.split(","):
        h, _, p = b.rpartition(":")
        parsed.append(Backend(h or host, int(p)))
    return Route(int(listen), parsed)


async def run(routes: list[Route], host: str, health: str | None, status: str | None,
              stop: asyncio.Event) -> None:
    servers = [await asyncio.start_server(r.handle, host, r.port, backlog=1024) for r in routes]
    if status:
        s_host, _, s_port = status.rpartition(":")
        servers.append(await asyncio.start_server(
            lambda rd, wr: serve_status(routes, rd, wr), s_host or host, int(s_port)))
    for r in routes:
        log.info("listening on %s:%d -> %s", host, r.port, ", ".join(b.name for b in r.backends))
    checker = asyncio.create_task(check_health(routes, health, stop)) if health else None
    await stop.wait()
    for server in servers:
        server.close()
    if checker:
        await checker
    log.info("stopped: %s", json.dumps({str(r.port): r.view() for r in routes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="where to listen and the replicas' default host")
    parser.add_argument("--route", action="append", required=True,
                        help="PORT=BACKEND[,BACKEND...]: a listening port and its replicas (repeatable)")
    parser.add_argument("--health", default="/readyz", help="health path checked every second ('' for none)")
    parser.add_argument("--status", help="HOST:PORT answering any request with the counters as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    routes = [parse_route(r, args.host) for r in args.route]

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(routes, args.host, args.health or None, args.status, stop)

    asyncio.run(go())


if __name__ == "__main__":
    main()
