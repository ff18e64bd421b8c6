"""Event append, one event per transaction, 16 concurrent writers, on one PostgreSQL server:
this project's EventStore, raw asyncpg INSERTs of the same rows into a table with the same
columns and indexes but no lock and no hash chain (the ceiling), and the `eventsourcing`
library's PostgreSQL recorder (its own table, its own table lock).

    make bench BENCH=bench_append
    BENCH_APPEND_SECONDS=40 make bench BENCH=bench_append

Each contender has a database of its own, created for the run and dropped afterwards, and
starts from a table already holding PREFILL events and analyzed, as a table in service is
(on a table created seconds before, PostgreSQL keeps the generic plan it cached for the
store's version lookup while the table was nearly empty, a sequential scan, until
autovacuum's first ANALYZE a minute or so later). After a warm-up the contenders take turns,
round after round, so that load from other work on a shared machine falls on all three
alike; the figure is events over time summed over the rounds.
Writers append to streams of 10 events each (the expected version is checked by the store;
by the primary key for the other two). The event is a real TransferRequested; the raw rows
and the eventsourcing records carry the same payload text. The eventsourcing recorder is
synchronous (psycopg), so its 16 writers are threads, as its users would run it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

from bench.infra import analyze, database, sqlalchemy_url
from bench.report import Row, table
from bench.sample import EVENT, META, STREAM_LENGTH, fill
from libs.events.store import EventStore, events_table

WRITERS = 16
SECONDS = float(os.environ.get("BENCH_APPEND_SECONDS", "20"))  # per contender, over all rounds
ROUNDS = 5
WARMUP = 2.0
PREFILL = 20_000
PAYLOAD = json.dumps(EVENT.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
FILLER_HASH = "0" * 64

Append = Callable[[str, int], Awaitable[None]]  # (stream id, the version the event follows)
Runner = Callable[[float], Awaitable[int]]  # WRITERS writers for so many seconds: events appended


def prefill_streams() -> list[str]:
    return [f"prefill-{i}" for i in range(PREFILL // STREAM_LENGTH)]


def driver(append: Append) -> Runner:
    async def run(seconds: float) -> int:
        deadline = time.perf_counter() + seconds
        counts = [0] * WRITERS

        async def writer(w: int) -> None:
            stream = ""
            while time.perf_counter() < deadline:
                version = counts[w] % STREAM_LENGTH
                if version == 0:
                    stream = f"transfer-{uuid.uuid4()}"
                await append(stream, version)
                counts[w] += 1

        await asyncio.gather(*[writer(w) for w in range(WRITERS)])
        return sum(counts)

    return run


@asynccontextmanager
async def ours() -> AsyncIterator[Runner]:
    async with database("store") as dsn:
        store = EventStore.from_url("bench", sqlalchemy_url(dsn))
        try:
            await store.create_schema()
            await fill(store, prefill_streams())
            await analyze(dsn)

            async def append(stream: str, version: int) -> None:
                await store.append(stream, version, [EVENT], META)

            yield driver(append)
            broken = await store.verify()
            assert broken is None, broken
        finally:
            await store.close()


@asynccontextmanager
async def raw_asyncpg() -> AsyncIterator[Runner]:
    async with database("raw") as dsn:
        # The store's own DDL: the same columns, primary key and unique constraints.
        ddl = EventStore.from_url("bench", sqlalchemy_url(dsn))
        await ddl.create_schema()
        await ddl.close()
        columns = [c.name for c in events_table.columns]
        sql = (f"INSERT INTO events ({', '.join(columns)}) "
               f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})")
        positions = itertools.count(1)  # no lock: a tailing reader could skip a late commit

        def row(stream: str, version: int) -> tuple[object, ...]:
            now = datetime.now(UTC).isoformat()
            return (next(positions), str(uuid.uuid4()), stream, version + 1, EVENT.event_type,
                    EVENT.schema_version, now, now, META.actor, META.role, META.correlation_id,
                    META.causation_id, PAYLOAD, FILLER_HASH, FILLER_HASH)

        async with asyncpg.create_pool(dsn, min_size=WRITERS, max_size=WRITERS) as pool:
            await pool.executemany(sql, [row(stream, v) for stream in prefill_streams()
                                         for v in range(STREAM_LENGTH)])
            await analyze(dsn)

            async def append(stream: str, version: int) -> None:
                await pool.execute(sql, *row(stream, version))

            yield driver(append)


@asynccontextmanager
async def eventsourcing_recorder() -> AsyncIterator[Runner]:
    async with database("eventsourcing") as dsn:
        url = urlsplit(dsn)
        datastore = PostgresDatastore(
            dbname=url.path.lstrip("/"), host=url.hostname or "127.0.0.1", port=url.port or 5432,
            user=url.username or "", password="", pool_size=WRITERS)
        try:
            recorder = PostgresApplicationRecorder(datastore)
            recorder.create_table()
            state = PAYLOAD.encode()
            for _ in range(PREFILL // 1000):
                recorder.insert_events([StoredEvent(uuid.uuid4(), v + 1, EVENT.event_type, state)
                                        for _ in range(1000 // STREAM_LENGTH) for v in range(STREAM_LENGTH)])
            await analyze(dsn)

            def threads(seconds: float) -> int:
                deadline = time.perf_counter() + seconds
                counts = [0] * WRITERS

                def writer(w: int) -> None:
                    originator = uuid.uuid4()
                    while time.perf_counter() < deadline:
                        version = counts[w] % STREAM_LENGTH
                        if version == 0:
                            originator = uuid.uuid4()
                        record = StoredEvent(originator, version + 1, EVENT.event_type, state)
                        recorder.insert_events([record])
                        counts[w] += 1

                started = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
                for t in started:
                    t.start()
                for t in started:
                    t.join()
                return sum(counts)

            async def run(seconds: float) -> int:
                return await asyncio.to_thread(threads, seconds)

            yield run
        finally:
            datastore.close()


async def main() -> str:
    ours_name, raw_name = "closedloop EventStore.append", "raw asyncpg INSERT (ceiling)"
    es_name = "eventsourcing PostgresApplicationRecorder"
    async with ours() as mine, raw_asyncpg() as raw, eventsourcing_recorder() as es:
        contenders = {ours_name: mine, raw_name: raw, es_name: es}
        for run in contenders.values():
            await run(WARMUP)
        events = dict.fromkeys(contenders, 0)
        elapsed = dict.fromkeys(contenders, 0.0)
        rounds: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(ROUNDS):
            for name, run in contenders.items():
                began = time.perf_counter()
                n = await run(SECONDS / ROUNDS)
                took = time.perf_counter() - began
                events[name] += n
                elapsed[name] += took
                rounds[name].append(n / took)
    rate = {name: events[name] / elapsed[name] for name in contenders}
    rows = [Row(ours_name, rate[ours_name], "events/s", peer=(raw_name, es_name)),
            Row(raw_name, rate[raw_name], "events/s"),
            Row(es_name, rate[es_name], "events/s", peer=raw_name)]
    spread = "; ".join(f"{name}: {min(r):,.0f} to {max(r):,.0f}" for name, r in rounds.items())
    return (table(f"Event append, 1 event per transaction, {WRITERS} concurrent writers, "
                  f"{ROUNDS} rounds of {SECONDS / ROUNDS:.0f} s each (`make bench BENCH=bench_append`); "
                  "targets: >= 0.8x raw asyncpg, >= 5x eventsourcing", rows)
            + f"\nevents/s per round, lowest to highest: {spread}\n")
