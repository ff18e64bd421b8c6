"""Rebuild every read model from the archive without downtime: build beside, then switch.

1. Pick the next generation number and create its tables (the active one keeps serving
   reads and taking live events).
2. Fold the archive into it in pages: a page of events is merged in memory
   (facts.Buffer) and written as one upsert per row, not one write per event.
3. Catch up with what arrived meanwhile, then, holding the archive lock (live appends
   wait a moment), fold the last few events and switch `active_generation` in the same
   transaction. Reads move to the new tables at their next query.

`order="store"` folds store after store in position order instead of in the order the
events were applied live: the result must still be identical, which is what shows that
the read models do not depend on how Kafka interleaved the streams.

    python -m services.projection.rebuild [--order seq|store] [--page N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore
from services.projection.facts import Buffer
from services.projection.tables import (
    ARCHIVE_COLUMNS,
    active_generation,
    archive,
    create_generation,
    drop_generation,
    ensure_active,
    ev_of_row,
    flush,
    generation,
    generations_present,
    lock_archive,
    meta_table,
    set_meta,
)

BUILDING = "building_generation"
STALE_SECONDS = 3600


class RebuildRunning(Exception):
    """Another rebuild is building a generation right now."""


@dataclass
class Report:
    generation: int
    previous: int | None
    order: str
    events: int = 0
    caught_up: int = 0
    seconds: float = 0.0
    events_per_second: float = 0.0
    started_at: str = field(default_factory=lambda: iso(utcnow()))
    finished_at: str | None = None

    def view(self) -> dict[str, Any]:
        return asdict(self)


@asynccontextmanager
async def write_tx(store: EventStore) -> AsyncIterator[AsyncConnection]:
    async with store.engine.connect() as conn:
        if store.is_sqlite:
            conn = await conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        async with conn.begin():
            yield conn


_COLS = [archive.c[c] for c in ARCHIVE_COLUMNS]


async def _pages(conn: AsyncConnection, order: str, upto: int, page: int) -> AsyncIterator[list[Any]]:
    if order == "seq":
        after = 0
        while True:
            rows = list(await conn.execute(
                select(*_COLS).where(and_(archive.c.seq > after, archive.c.seq <= upto))
                .order_by(archive.c.seq).limit(page)))
            if not rows:
                return
            yield rows
            after = rows[-1].seq
    else:
        store, position = "", 0
        while True:
            rows = list(await conn.execute(
                select(*_COLS).where(and_(
                    archive.c.seq <= upto,
                    or_(archive.c.store > store,
                        and_(archive.c.store == store, archive.c.position > position))))
                .order_by(archive.c.store, archive.c.position).limit(page)))
            if not rows:
                return
            yield rows
            store, position = rows[-1].store, rows[-1].position


async def _tail(conn: AsyncConnection, after: int, page: int) -> list[Any]:
    return list(await conn.execute(
        select(*_COLS).where(archive.c.seq > after).order_by(archive.c.seq).limit(page)))


async def rebuild(store: EventStore, *, order: str = "seq", page: int = 10_000,
                  flush_rows: int = 100_000, force: bool = False) -> Report:
    if order not in ("seq", "store"):
        raise ValueError("order is seq or store")
    started = time.perf_counter()
    async with write_tx(store) as conn:
        await lock_archive(conn)
        active = (await ensure_active(conn)).number
        building = await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == BUILDING))
        if building and not force:
            number_s, _, since = building.partition("@")
            age = (utcnow() - datetime.fromisoformat(since)).total_seconds()
            if age < STALE_SECONDS:
                raise RebuildRunning(f"generation {number_s} is being built since {since}")
        present = await generations_present(conn)
        number = max([*present, active]) + 1
        # Keep the active generation and the one before it (readers may still be on it).
        for old in present:
            if old < active - 1 or old > active:
                await drop_generation(conn, old)
        gen = await create_generation(conn, number)
        await set_meta(conn, BUILDING, f"{number}@{iso(utcnow())}")
        upto = int(await conn.scalar(select(func.max(archive.c.seq))) or 0)
    report = Report(generation=number, previous=active, order=order)
    buffer = Buffer()

    async def drain() -> None:
        if buffer.rows:
            async with write_tx(store) as wconn:
                await flush(wconn, gen, buffer)
            buffer.clear()

    try:
        async with store.engine.connect() as rconn:
            async for rows in _pages(rconn, order, upto, page):
                for row in rows:
                    buffer.add_event(ev_of_row(row))
                report.events += len(rows)
                if buffer.size() >= flush_rows:
                    await drain()
            await drain()
            # Catch up with what the live subscription archived meanwhile.
            last = upto
            while rows := await _tail(rconn, last, page):
                for row in rows:
                    buffer.add_event(ev_of_row(row))
                report.caught_up += len(rows)
                last = rows[-1].seq
                if len(rows) < page:
                    break
            await drain()
        # The switch: live appends wait on the archive lock; whatever they archived since
        # the last read is folded here, so the new generation misses nothing.
        async with write_tx(store) as conn:
            await lock_archive(conn)
            while rows := await _tail(conn, last, page):
                for row in rows:
                    buffer.add_event(ev_of_row(row))
                report.caught_up += len(rows)
                last = rows[-1].seq
            await flush(conn, gen, buffer)
            buffer.clear()
            await set_meta(conn, "active_generation", str(number))
            await conn.execute(meta_table.delete().where(meta_table.c.name == BUILDING))
    except BaseException:
        async with write_tx(store) as conn:
            await conn.execute(meta_table.delete().where(meta_table.c.name == BUILDING))
            if await active_generation(conn) != number:
                await drop_generation(conn, number)
        raise
    report.seconds = time.perf_counter() - started
    report.events_per_second = (report.events + report.caught_up) / report.seconds if report.seconds else 0.0
    report.finished_at = iso(utcnow())
    return report


def main() -> None:
    import logging

    from services.projection.tables import metadata
    from services.settings import Settings

    parser = argparse.ArgumentParser(description="Rebuild the projection's read models beside, then switch")
    parser.add_argument("--order", choices=("seq", "store"), default="seq")
    parser.add_argument("--page", type=int, default=10_000)
    parser.add_argument("--force", action="store_true", help="even if another rebuild seems to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    async def run() -> None:
        settings = Settings()
        store = EventStore.from_url("projection", settings.store_url("projection"))
        try:
            await store.create_schema(metadata)
            report = await rebuild(store, order=args.order, page=args.page, force=args.force)
            print(report.view())
        finally:
            await store.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()


__all__ = ["RebuildRunning", "Report", "generation", "rebuild"]
