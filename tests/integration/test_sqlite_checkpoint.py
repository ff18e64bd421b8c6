"""SQLite (the embedded default): WAL checkpoints run beside the writers, not inside the
commit that crosses the WAL's size limit (that commit used to take 5-7 times as long as
the others: the dispatch decision's p99, issue 3)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from sqlalchemy import text

from libs.events.store import EventStore, Meta
from tests.conftest import take_write_lock
from tests.integration.test_store_contract import ThingHappened, things

META = Meta(actor="tester", role="dispatcher", correlation_id="checkpoint")


async def test_commits_leave_checkpoints_to_the_background(tmp_path: Path) -> None:
    store = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{tmp_path}/dispatch.db")
    try:
        await store.create_schema()
        async with store.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
        database = tmp_path / "dispatch.db"
        await asyncio.sleep(0.6)  # past the schema's own checkpoint
        before = database.stat().st_size
        for n in range(60):
            await store.append(f"thing-{n}", 0, things(*range(20)), META)
        # Only a checkpoint writes pages into the database file (commits write the WAL):
        # far below the 1,000-page limit at which a commit would have done it itself.
        deadline = time.monotonic() + 5
        while database.stat().st_size == before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert database.stat().st_size > before
        assert await store.verify() is None
    finally:
        await store.close()


def test_a_cancelled_commit_leaves_no_lock_behind_when_the_loop_ends(tmp_path: Path) -> None:
    """A commit cancelled inside its transaction, the store closed and the loop ended at
    once (as a lifespan ends: its tasks cancelled, then its stores closed). SQLAlchemy then
    closed the connection in a task the ending loop dropped, and the file stayed
    write-locked for the rest of the process: a second app on the same data dir (the
    schemathesis suite, after its seeding app) had every write to it wait 30 s and fail.
    Before the fix about one run in ten left the lock; the cancel lands at random points."""
    database = tmp_path / "projection.db"
    rng = random.Random(20261124)
    payload = [ThingHappened(n=n, note="x" * 2000) for n in range(30)]

    async def cancelled_at(delay: float, n: int) -> None:
        store = EventStore.from_url("projection", f"sqlite+aiosqlite:///{database}")
        await store.create_schema()
        caller = asyncio.create_task(store.append(f"thing-{n}", 0, payload, META))
        await asyncio.sleep(delay)
        caller.cancel()
        await asyncio.sleep(0)
        await store.close()

    for n in range(60):
        asyncio.run(cancelled_at(rng.uniform(0.001, 0.03), n))
        take_write_lock(database, timeout=0.2)  # raises "database is locked" if one was left
