"""Runs the services as separate processes on PostgreSQL and Kafka, as `make up` does,
with fresh databases and topics, and routes one client to them like a gateway would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx

from services.settings import Settings
from tests.actors import Acting
from tests.conftest import KAFKA, PG_DSN
from tests.e2e.invariants import invariants_hold

SERVICES = ("dispatch", "transfer", "disinfection", "projection")
ROUTES = (("/api/v1/trips", "transfer"), ("/api/v1/disinfection", "disinfection"),
          ("/api/v1/audit", "projection"), ("/", "dispatch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RoutingTransport(httpx.AsyncBaseTransport):
    """Sends each path to the service that owns it."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = next(s for prefix, s in ROUTES if request.url.path.startswith(prefix))
        request.url = request.url.copy_with(host="127.0.0.1", port=self.ports[service])
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Cluster:
    run_id: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        urls = {s: f"http://127.0.0.1:{self.port(s)}" for s in SERVICES}
        return {**os.environ, "CLOSEDLOOP_MODE": "distributed",
                "CLOSEDLOOP_PG_URL": f"{base}/{{service}}_{self.run_id}",
                "CLOSEDLOOP_KAFKA_BOOTSTRAP": KAFKA, "CLOSEDLOOP_TOPIC_PREFIX": f"e2e{self.run_id}",
                "CLOSEDLOOP_DATA_DIR": str(self.log_dir / "data"),
                "CLOSEDLOOP_SERVICE_URLS": json.dumps(urls), **self.extra_env}

    def port(self, service: str) -> int:
        """Chosen before any service starts, so each one knows where the others answer."""
        return self.ports.setdefault(service, free_port())

    async def start(self, service: str) -> None:
        port = self.port(service)
        log = open(self.log_dir / f"{service}.log", "ab")  # noqa: SIM115 (the process owns it)
        self.procs[service] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.runtime", "--service", service, "--port", str(port),
            env=self.env, stdout=log, stderr=log)
        await self.ready(service)

    async def ready(self, service: str, timeout: float = 120) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with httpx.AsyncClient() as c:
            while True:
                proc = self.procs[service]
                if proc.returncode is not None:
                    raise RuntimeError(f"{service} exited: {self.tail(service)}")
                try:
                    r = await c.get(f"http://127.0.0.1:{self.ports[service]}/readyz")
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"{service} not ready: {self.tail(service)}")
                await asyncio.sleep(0.1)

    async def kill(self, service: str) -> None:
        proc = self.procs.pop(service)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def tail(self, service: str, lines: int = 40) -> str:
        path = self.log_dir / f"{service}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    @property
    def settings(self) -> Settings:
        """Where the services' stores are, for the invariant checker."""
        return Settings(mode="distributed", pg_url=self.env["CLOSEDLOOP_PG_URL"])

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=RoutingTransport(self.ports), base_url="http://cluster",
                                 timeout=30, auth=self.acting)

    @property
    def acting(self) -> Acting:
        """Tokens from the local issuer the cluster's processes share (under its data dir)."""
        return Acting.for_settings(Settings(data_dir=self.log_dir / "data"))


async def for_each_database(run_id: str, sql: str) -> None:
    """Runs `sql` (with {db}) for each service's database of this run."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        for service in SERVICES:
            await conn.execute(sql.format(db=f"{service}_{run_id}"))
    finally:
        await conn.close()


@asynccontextmanager
async def running_cluster(log_dir: Path, env: dict[str, str] | None = None,
                          check_invariants: bool = True, *, ports: Mapping[str, int] | None = None,
                          before_start: Callable[[Cluster], Awaitable[None]] | None = None,
                          ) -> AsyncIterator[Cluster]:
    """The cluster for one test; when the test passed, the invariant checker runs before
    the services stop. `ports`: where services listen (else free ports); `before_start`
    runs on the fresh, empty databases (a benchmark seeds a store there)."""
    run_id = uuid.uuid4().hex[:8]
    await for_each_database(run_id, 'CREATE DATABASE "{db}"')
    cluster = Cluster(run_id, log_dir, env or {}, dict(ports or {}))
    try:
        if before_start is not None:
            await before_start(cluster)
        await asyncio.gather(*[cluster.start(s) for s in SERVICES])
        yield cluster
        if check_invariants:
            await invariants_hold(cluster.settings)
    finally:
        await cluster.stop()
        await for_each_database(run_id, 'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
