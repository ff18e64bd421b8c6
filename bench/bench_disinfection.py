"""Disinfection: what the R14 sweep costs per round (it reads every pending result, so the
interval can be chosen knowing it), and how the positive-result command grows with the
exposure window (it loads every cycle back to the last negative swab). On SQLite and on
the project's PostgreSQL (CLOSEDLOOP_PG_PORT)."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import asyncpg  # type: ignore[import-untyped]

from bench.report import Row, table
from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore, Meta
from services.disinfection import contacts, handlers, sla
from services.disinfection.domain import Cycle, Sample, StageRecord
from services.disinfection.exposure import VehicleHistory
from services.disinfection.protocols import DEFAULT_RULES
from services.disinfection.schemas import ResultIn

PENDING = 300
WINDOWS = (1, 10, 100)
META = Meta(actor="bench", role="system", correlation_id="bench")
T0 = datetime.fromisoformat("2022-11-20T09:50:00+08:00")
SWABBED = T0 + timedelta(hours=2)
PG = f"postgresql://closedloop@127.0.0.1:{os.environ.get('CLOSEDLOOP_PG_PORT', '55432')}/test"


@asynccontextmanager
async def stores() -> AsyncIterator[list[tuple[str, EventStore]]]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG)
    await conn.execute(f"CREATE SCHEMA {schema}")
    with tempfile.TemporaryDirectory() as tmp:
        opened = [
            ("SQLite", EventStore.from_url("disinfection", f"sqlite+aiosqlite:///{tmp}/d.db")),
            ("PostgreSQL", EventStore.from_url(
                "disinfection", PG.replace("postgresql://", "postgresql+asyncpg://"),
                connect_args={"server_settings": {"search_path": schema}})),
        ]
        try:
            for _, store in opened:
                await store.create_schema(contacts.metadata)
            yield opened
        finally:
            for _, store in opened:
                await store.close()
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()


def stage(kind: str, start: datetime) -> StageRecord:
    end = start + timedelta(minutes=35)
    return StageRecord(kind, "chlorine", 1000, "wipe", start, end, "op", "wash", "cam", "nvr://x",
                       start - timedelta(minutes=1), end + timedelta(minutes=1))


async def swabbed_trip(store: EventStore, vehicle: str, n: int) -> None:
    """A trip, both stages and a swab awaiting its result, in one commit."""
    uow = UnitOfWork(store, META)
    cycle = Cycle.open(vehicle, f"{vehicle}-trip-{n}", f"{vehicle}-t-{n}", "bench", opened_at=T0)
    cycle.log_stage(stage("initial", T0))
    cycle.log_stage(stage("terminal", T0 + timedelta(minutes=40)))
    cycle.collect_swab(f"{vehicle}-S-{n}", ["seat", "stretcher", "handrail"], "op", SWABBED)
    history = await uow.get(VehicleHistory, vehicle) or VehicleHistory(id=vehicle)
    history.log_cycle(cycle)
    for agg in (cycle, history, Sample.claim(f"{vehicle}-S-{n}", cycle.id)):
        uow.add(agg)
    await uow.commit()


async def sweep(name: str, store: EventStore) -> list[Row]:
    for n in range(PENDING):
        await swabbed_trip(store, f"sweep-{n}", n)
    started = time.perf_counter()
    assert await sla.flag_overdue(store, SWABBED + timedelta(hours=1)) == 0
    idle = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    assert await sla.flag_overdue(store, SWABBED + timedelta(hours=7)) == PENDING
    flagging = (time.perf_counter() - started) * 1000
    quiet = f"{name}: sweep, {PENDING} pending, none due"
    return [Row(quiet, idle, "ms"), Row(f"{name}: sweep flagging all {PENDING}", flagging, "ms", peer=quiet)]


async def positive(name: str, store: EventStore) -> list[Row]:
    rows: list[Row] = []
    for k in WINDOWS:
        vehicle = f"window-{k}"
        for n in range(k):
            await swabbed_trip(store, vehicle, n)
        body = ResultIn.model_validate({"result": "positive", "lab": "lab",
                                        "reported_at": SWABBED + timedelta(hours=3)})
        uow = UnitOfWork(store, META)
        started = time.perf_counter()
        await handlers.record_result(uow, f"{vehicle}-S-0", body, DEFAULT_RULES, T0 + timedelta(days=1))
        await uow.commit()
        elapsed = (time.perf_counter() - started) * 1000
        rows.append(Row(f"{name}: positive result, {k} trips exposed", elapsed, "ms",
                        peer=f"{name}: positive result, 1 trips exposed" if k > 1 else None))
    return rows


async def main() -> str:
    rows: list[Row] = []
    async with stores() as opened:
        for name, store in opened:
            rows += await sweep(name, store) + await positive(name, store)
    return table("Disinfection: R14 sweep and exposure lists (milliseconds)", rows, higher_is_better=False)
