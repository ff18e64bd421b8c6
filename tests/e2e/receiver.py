"""A real HTTP endpoint on loopback standing in for the county health bureau's system:
it records what it receives and answers 503 to the first `fail_first` requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    fail_first: int = 0
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/report"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[1:]
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.received.append(Received(headers, body))
        status = "503 Service Unavailable" if len(self.received) <= self.fail_first else "200 OK"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()


def dispatch_env(receiver: Receiver) -> dict[str, str]:
    """Points dispatch's 报备 delivery at the receiver, with quick retries and scheduling."""
    from tests.scenarios_dispatch import REPORT_SECRET

    return {"CLOSEDLOOP_DISPATCH_REPORT_WEBHOOK_URL": receiver.url,
            "CLOSEDLOOP_DISPATCH_REPORT_WEBHOOK_SECRET": REPORT_SECRET,
            "CLOSEDLOOP_DISPATCH_REPORT_RETRY_BASE_S": "0.05",
            "CLOSEDLOOP_DISPATCH_SCHEDULE_INTERVAL_S": "0.2"}
