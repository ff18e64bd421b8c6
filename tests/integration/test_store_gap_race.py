"""The classic gap bug of sequence-numbered event tables, reproduced, and shown not to
happen in our store.

Transaction A takes position N and commits late; transaction B takes N+1 and commits
first. A reader that tails by position sees N+1, moves its cursor past N, and never sees
N. The control test shows the race on a naive bigserial table; the store tests run the
same interleaving (and a randomized version of it) and show nothing is skipped.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.contracts import Event, registry
from libs.events.store import Commit, Meta, NewEvent, StreamAppend
from tests.conftest import PG_DSN, pg_store

pytestmark = pytest.mark.postgres
META = Meta(actor="racer", role="system", correlation_id="race")


@registry.register
class RacePosted(Event):
    writer: int
    n: int


async def test_control_a_naive_sequence_table_skips_an_event(pg_schema: str) -> None:
    setup = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    await setup.execute("CREATE TABLE naive (position bigserial PRIMARY KEY, body text)")
    a = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    b = await asyncpg.connect(PG_DSN, server_settings={"search_path": pg_schema})
    try:
        ta = a.transaction()
        await ta.start()
        await a.execute("INSERT INTO naive (body) VALUES ('A')")  # takes position 1
        await b.execute("INSERT INTO naive (body) VALUES ('B')")  # position 2, commits now
        seen = [r["position"] for r in await setup.fetch("SELECT position FROM naive WHERE position > 0")]
        cursor = max(seen)
        await ta.commit()
        later = [r["position"] for r in await setup.fetch(
            "SELECT position FROM naive WHERE position > $1", cursor)]
        assert seen == [2] and later == []  # position 1 was never seen: the race is real
    finally:
        for conn in (a, b, setup):
            await conn.close()


async def test_store_reader_never_skips_a_late_commit(pg_schema: str) -> None:
    replica_a, replica_b, reader = (pg_store("race", pg_schema) for _ in range(3))
    await replica_a.create_schema()
    try:
        a_inside = asyncio.Event()
        let_a_commit = asyncio.Event()

        async def stall(conn: AsyncConnection) -> None:
            a_inside.set()
            await let_a_commit.wait()  # A holds position 1, uncommitted

        a = asyncio.create_task(replica_a.commit(Commit(
            meta=META, writes=[stall],
            appends=[StreamAppend("race-a", 0, [NewEvent(RacePosted(writer=0, n=0))])])))
        await a_inside.wait()
        b = asyncio.create_task(replica_b.append("race-b", 0, [RacePosted(writer=1, n=0)], META))
        await asyncio.sleep(0.3)
        assert not b.done(), "B must wait until A commits: commit order is position order"
        assert await reader.read_all(0) == []  # nothing visible yet, so nothing to skip
        let_a_commit.set()
        await asyncio.gather(a, b)
        assert [e.position for e in await reader.read_all(0)] == [1, 2]
    finally:
        for s in (replica_a, replica_b, reader):
            await s.close()


async def test_tailing_reader_sees_every_position_under_random_late_commits(pg_schema: str) -> None:
    writers = [pg_store("race", pg_schema) for _ in range(8)]
    await writers[0].create_schema()
    reader = pg_store("race", pg_schema)
    rng = random.Random(7)
    per_writer = 25
    total = len(writers) * per_writer
    seen: list[int] = []

    async def write(i: int) -> None:
        for n in range(per_writer):
            delay = rng.random() * 0.01

            async def late(_: AsyncConnection, d: float = delay) -> None:
                await asyncio.sleep(d)  # commit late, after others took later positions

            await writers[i].commit(Commit(meta=META, writes=[late], appends=[
                StreamAppend(f"race-{i}", n, [NewEvent(RacePosted(writer=i, n=n))])]))

    async def tail() -> None:
        cursor = 0
        while len(seen) < total:
            batch = await reader.read_all(cursor, 7)
            seen.extend(e.position for e in batch)
            cursor = batch[-1].position if batch else cursor
            await asyncio.sleep(0)

    try:
        await asyncio.wait_for(asyncio.gather(tail(), *[write(i) for i in range(len(writers))]), 120)
        assert seen == list(range(1, total + 1))
        assert await reader.verify() is None
    finally:
        for s in (*writers, reader):
            await s.close()
