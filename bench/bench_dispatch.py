"""Issue 3: dispatch decision time with 1,000 vehicles, 100 facilities and 5,000 queued
transfers (request in, routed, assignment decided and appended), p50 and p99, on SQLite and
PostgreSQL, and requests/s through the HTTP API; the target is p99 under 10 ms."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx

from bench.report import Row, table
from libs.events.aggregate import UnitOfWork
from libs.events.bus import StoreTailSource
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from libs.events.store import EventStore, Meta
from services.dispatch import handlers
from services.dispatch.domain import Facility, Transfer, Vehicle
from services.dispatch.schemas import TransferIn
from services.runtime import Runtime
from services.settings import Settings

VEHICLES, FACILITIES, QUEUED, DECISIONS = 1000, 100, 5000, 400
PG_DSN = f"postgresql://closedloop@127.0.0.1:{os.environ.get('CLOSEDLOOP_PG_PORT', '55432')}/test"
META = Meta(actor="bench", role="dispatcher", correlation_id="bench")
rng = random.Random(3)


def spot() -> dict[str, float]:
    return {"lat": 38.2 + rng.random() * 0.4, "lon": 106.0 + rng.random() * 0.4}


def request(name: str, critical: bool) -> TransferIn:
    return TransferIn.model_validate({
        "patient": {"name": name}, "risk_category": "home_monitoring",
        "condition": {"critical": True, "kind": "shock"} if critical else {},
        "origin": {"kind": "home", "name": "家", "location": spot()}, "purpose": "outpatient_visit",
        "requested_by": {"channel": "community"}})


async def seed(store: EventStore, vehicles: int = VEHICLES, queued: int = QUEUED) -> None:
    """100 facilities; 1,000 dedicated cars, free; 5,000 critical patients queued (they need
    life support, which no free vehicle has), so each decision scans a full fleet and queue.
    (bench_e2e seeds a bigger fleet and no queue.)"""
    await store.create_schema()
    uow = UnitOfWork(store, META)
    roles = ["fever_clinic", "designated", "county_hospital", "specialty_cardio_cerebro", "fangcang"]
    for i in range(FACILITIES):
        uow.add(Facility.register(ev.FacilityRegistered(
            facility_id=f"f{i:03d}", name=f"医院{i}", roles=[roles[i % len(roles)]],
            location=Location(**spot()), fever_clinic_capacity=100)))
    await uow.commit()
    for first in range(0, vehicles, 1000):  # commits of a bounded size, for a fleet of any size
        uow = UnitOfWork(store, META)
        for i in range(first, min(first + 1000, vehicles)):
            uow.add(Vehicle.register(ev.VehicleRegistered(
                vehicle_id=f"v{i:04d}", plate=f"宁A{i}", kind="dedicated_vehicle", dedicated_pool=True,
                life_support=False, station="站", location=Location(**spot()))))
        await uow.commit()
    for batch in range(queued // 500):
        uow = UnitOfWork(store, META)
        for i in range(500):
            body = request(f"危重{batch}-{i}", critical=True).model_dump(mode="json", exclude_none=True)
            t = Transfer.request(ev.TransferRequested(
                transfer_id=str(uuid.uuid4()), patient=body["patient"], risk_category=body["risk_category"],
                condition=body["condition"], origin=body["origin"], purpose=body["purpose"],
                return_required=False, requested_by=body["requested_by"]),
                requested_at=f"2022-11-20T01:{batch:02d}:{i % 60:02d}+00:00")
            t.queue("bench: needs life support")
            uow.add(t)
        await uow.commit()


async def decide(store: EventStore, n: int) -> list[float]:
    timings = []
    for i in range(n):
        started = time.perf_counter()
        uow = UnitOfWork(store, META)
        transfer, _ = await handlers.request_transfer(uow, str(uuid.uuid4()), request(f"居家{i}", False))
        await uow.commit()
        timings.append((time.perf_counter() - started) * 1000)
        assert transfer.vehicle_id is not None
    return timings


@asynccontextmanager
async def pg_store() -> AsyncIterator[EventStore]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f"CREATE SCHEMA {schema}")
    store = EventStore.from_url("dispatch", PG_DSN.replace("postgresql://", "postgresql+asyncpg://"),
                                connect_args={"server_settings": {"search_path": schema}})
    try:
        yield store
    finally:
        await store.close()
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@asynccontextmanager
async def sqlite_store() -> AsyncIterator[EventStore]:
    with tempfile.TemporaryDirectory() as d:
        store = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{d}/dispatch.db")
        yield store
        await store.close()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def caught_up(settings: Settings) -> None:
    """Runs the embedded dispatch until its subscriptions have read every seeded event (its
    checkpoints are durable), so the load meets a server in its steady state, not one
    catching up on 20,000 events."""
    runtime = Runtime(settings, ["dispatch"])
    await runtime.start()
    try:
        for sub in runtime.subscriptions:
            tail = sub.source
            assert isinstance(tail, StoreTailSource)
            while await sub.store.checkpoint(tail.name) < await tail.source.head():  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # (the checkpoint is a row in the store: polled)
    finally:
        await runtime.stop()


async def http_rate(seconds: float = 10.0, concurrency: int = 16) -> tuple[float, float]:
    """Requests/s and p99 of POST /transfers through real HTTP to the embedded server
    (SQLite) in its own process, as `make run` serves it, seeded the same way; the clients
    run in this process."""
    with tempfile.TemporaryDirectory() as d:
        seeded = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{d}/dispatch.db")
        await seed(seeded)
        await seeded.close()
        settings = Settings(mode="embedded", data_dir=Path(d))
        await caught_up(settings)
        issuer = settings.local_issuer()  # its key, made here, is the one the server reads
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.runtime", "--service", "dispatch", "--port", str(port),
            env={**os.environ, "CLOSEDLOOP_MODE": "embedded", "CLOSEDLOOP_DATA_DIR": d},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await c.get("/readyz")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
            latencies: list[float] = []
            deadline = time.perf_counter() + seconds

            async def worker(w: int) -> None:
                # A dispatcher each, as at a real console (and within the per-client write limit).
                token = issuer.issue(f"bench-dispatcher-{w}", "dispatcher")
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30,
                                             headers={"Authorization": f"Bearer {token}"}) as c:
                    i = 0
                    while time.perf_counter() < deadline:
                        started = time.perf_counter()
                        body = request(f"w{w}-{i}", False).model_dump(mode="json")
                        r = await c.post("/transfers", json=body)
                        assert r.status_code in (200, 201), r.text
                        latencies.append((time.perf_counter() - started) * 1000)
                        i += 1

            began = time.perf_counter()
            await asyncio.gather(*[worker(w) for w in range(concurrency)])
            elapsed = time.perf_counter() - began
        finally:
            server.terminate()
            await server.wait()
        return len(latencies) / elapsed, pct(latencies, 99)


async def main() -> str:
    rows = [Row("target: p99 decision", 10.0, "ms")]
    for name, opened in (("SQLite", sqlite_store), ("PostgreSQL", pg_store)):
        async with opened() as store:
            await seed(store)
            await decide(store, 20)  # warm up
            cpu = time.process_time()
            t = await decide(store, DECISIONS)
            cpu = (time.process_time() - cpu) / DECISIONS * 1000
        rows += [Row(f"{name}: decision p50", statistics.median(t), "ms", peer="target: p99 decision"),
                 Row(f"{name}: decision p99", pct(t, 99), "ms", peer="target: p99 decision"),
                 # What this process spent per decision (the database's own work not counted):
                 # steadier than wall time when others share the cores.
                 Row(f"{name}: bench process CPU per decision", cpu, "ms")]
    rate, p99 = await http_rate()
    rows += [Row("HTTP POST /transfers (embedded server process, 16 clients)", rate, "req/s"),
             Row("HTTP POST /transfers p99 (16 clients)", p99, "ms", peer="target: p99 decision")]
    return table(f"Dispatch decisions: {VEHICLES} vehicles, {FACILITIES} facilities, {QUEUED} queued, "
                 f"{DECISIONS} decisions (`make bench BENCH=bench_dispatch`)", rows, higher_is_better=False)
