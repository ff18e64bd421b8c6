"""What clients saw during a fault test, recorded by the HTTP transport every load generator
sends through (`RetryingTransport`; the simulator's client is built on it), so whatever
drives the load is counted the same way. It routes each path to its service's balancer as
the simulator routes it (sim.api.ROUTES).

The transport behaves as a careful client of a replicated service would: a request that
failed on the way (connection refused or reset, a timeout, a 5xx, a 409 `concurrent_update`)
is sent again after a short wait, with the same Idempotency-Key, so a retry can never
double an effect. It adds an Idempotency-Key to every POST that has none. It records every
attempt, and every transfer it saw acknowledged with a 201, which the end-of-test check
then looks for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import httpx

from sim.api import ROUTES

RETRY_STATUSES = {500, 502, 503, 504}
# decoded by the first read: the copy handed back is plain bytes
HOP_HEADERS = {"content-encoding", "transfer-encoding", "content-length"}


@dataclass(frozen=True)
class Attempt:
    started: float  # time.monotonic()
    ended: float
    method: str
    path: str
    outcome: str  # "ok", an HTTP status ("503"), or a transport error's class name
    retried: bool = False  # a failed attempt sent again (else given up on)

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


@dataclass
class Ledger:
    attempts: list[Attempt] = field(default_factory=list)
    transfers: dict[str, float] = field(default_factory=dict)  # transfer id acknowledged (201) -> when

    def between(self, t0: float, t1: float) -> list[Attempt]:
        """Attempts that overlap [t0, t1)."""
        return [a for a in self.attempts if a.started < t1 and a.ended >= t0]

    def failed_between(self, t0: float, t1: float) -> list[Attempt]:
        return [a for a in self.between(t0, t1) if a.failed]

    @property
    def gave_up(self) -> list[Attempt]:
        return [a for a in self.attempts if a.failed and not a.retried]


def service_of(path: str) -> str:
    return next(service for prefix, service in ROUTES if path.startswith(prefix))


class RetryingTransport(httpx.AsyncBaseTransport):
    """Sends each path to its service's balancer, retrying what failed on the way."""

    def __init__(self, ports: dict[str, int], ledger: Ledger, retry_for_s: float = 180.0) -> None:
        self.ports = ports
        self.ledger = ledger
        self.retry_for_s = retry_for_s
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=200))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        if request.method == "POST" and "Idempotency-Key" not in request.headers:
            request.headers["Idempotency-Key"] = str(uuid.uuid4())
        port = self.ports[service_of(request.url.path)]
        url = request.url.copy_with(host="127.0.0.1", port=port)
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.1
        while True:
            started = time.monotonic()
            attempt = httpx.Request(request.method, url, headers=request.headers, content=request.content,
                                    extensions=request.extensions)
            retry_after: float | None = None
            response: httpx.Response | None = None
            try:
                raw = await self.inner.handle_async_request(attempt)
                body = await raw.aread()
                await raw.aclose()
                headers = [(k, v) for k, v in raw.headers.multi_items() if k.lower() not in HOP_HEADERS]
                response = httpx.Response(raw.status_code, headers=headers, content=body, request=request)
                outcome = "ok" if raw.status_code not in RETRY_STATUSES else str(raw.status_code)
                if raw.status_code == 409 and b'"concurrent_update"' in body:
                    outcome = "409 concurrent_update"
                if raw.headers.get("Retry-After", "").isdigit():
                    retry_after = float(raw.headers["Retry-After"])
            except httpx.TransportError as exc:
                outcome = type(exc).__name__
            retry = outcome != "ok" and time.monotonic() + delay < deadline
            self.ledger.attempts.append(Attempt(started, time.monotonic(), request.method,
                                                request.url.path, outcome, retry))
            if outcome == "ok" and response is not None:
                if request.method == "POST" and request.url.path == "/api/v1/transfers" \
                        and response.status_code == 201:
                    self.ledger.transfers[response.json()["id"]] = time.monotonic()
                return response
            if not retry:
                if response is not None:
                    return response
                raise httpx.ConnectError(f"gave up after {self.retry_for_s} s: {outcome}", request=request)
            await asyncio.sleep(min(retry_after or delay, 2.0))
            delay = min(delay * 2, 2.0)

    async def aclose(self) -> None:
        await self.inner.aclose()
