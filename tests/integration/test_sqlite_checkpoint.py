"""SQLite (the embedded default): WAL checkpoints run beside the writers, not inside the
commit that crosses the WAL's size limit (that commit used to take 5-7 times as long as
the others: the dispatch decision's p99, issue 3)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sqlalchemy import text

from libs.events.store import EventStore, Meta
from tests.integration.test_store_contract import things

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
