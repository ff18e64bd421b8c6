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

With `compare`, nothing switches: the built generation is handed to it in step 3, under
the archive lock (nothing is archived meanwhile), then dropped. The invariant checker
(services/invariants) compares the live read models with a rebuild this way, at any time,
without changing what the views serve.

    python -m services.projection.rebuild [--order seq|store] [--page N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.contracts import registry
from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore
from services.projection.facts import SPECS, Buffer
from services.projection.tables import (
    ACTIVE,
    ARCHIVE_COLUMNS,
    Generation,
    active_generation,
    archive,
    bulk_insert,
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

Compare = Callable[[AsyncConnection, Generation], Awaitable[None]]


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
APPEND_ONLY = [name for name, spec in SPECS.items() if spec.append_only]


class _Reader:
    """Pages of archive rows in ARCHIVE_COLUMNS order. On PostgreSQL it reads through the
    asyncpg connection itself: SQLAlchemy's row layer costs a third of the read rate."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"
        self.cols = ", ".join(ARCHIVE_COLUMNS)

    async def _fetch(self, sql: str, stmt: Any, *args: Any) -> list[Any]:
        if self.pg:
            raw = await self.conn.get_raw_connection()
            return list(await raw.driver_connection.fetch(sql, *args))  # type: ignore[union-attr]
        return list(await self.conn.execute(stmt))

    async def by_seq(self, after: int, upto: int | None, page: int) -> list[Any]:
        cond = archive.c.seq > after if upto is None else and_(archive.c.seq > after, archive.c.seq <= upto)
        stmt = select(*_COLS).where(cond).order_by(archive.c.seq).limit(page)
        bound = "" if upto is None else f" AND seq <= {int(upto)}"
        sql = f"SELECT {self.cols} FROM audit_archive WHERE seq > $1{bound} ORDER BY seq LIMIT {int(page)}"
        return await self._fetch(sql, stmt, after)

    async def by_store(self, store: str, position: int, upto: int, page: int) -> list[Any]:
        stmt = (select(*_COLS).where(and_(
            archive.c.seq <= upto,
            or_(archive.c.store > store, and_(archive.c.store == store, archive.c.position > position))))
            .order_by(archive.c.store, archive.c.position).limit(page))
        sql = (f"SELECT {self.cols} FROM audit_archive WHERE seq <= $3 AND (store > $1 OR "
               f"(store = $1 AND position > $2)) ORDER BY store, position LIMIT {int(page)}")
        return await self._fetch(sql, stmt, store, position, upto)


async def _pages(reader: _Reader, order: str, upto: int, page: int) -> AsyncIterator[list[Any]]:
    """Pages in the chosen order; the next page is already being read while the caller
    folds this one (the database works on the other core meanwhile)."""
    def next_page(rows: list[Any] | None) -> Any:
        if order == "seq":
            return reader.by_seq(rows[-1][0] if rows else 0, upto, page)
        return reader.by_store(rows[-1][2] if rows else "", rows[-1][3] if rows else 0, upto, page)

    pending = asyncio.ensure_future(next_page(None))
    while rows := await pending:
        pending = asyncio.ensure_future(next_page(rows))
        yield rows
    await pending


async def rebuild(store: EventStore, *, order: str = "seq", page: int = 10_000,
                  flush_rows: int = 500_000, force: bool = False, compare: Compare | None = None) -> Report:
    """Pages of events are folded in memory (facts.Buffer). Append-only tables (one row per
    event) are written as they fill; keyed rows (a transfer, a trip, ...) gather facts from
    many events, so they are kept until the end and written once, unless there are more
    than `flush_rows` of them, when they are merged into the table by upsert."""
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
    written: set[str] = set()  # keyed tables already holding rows: later writes must merge
    current = {name: cls.schema_version for name, cls in registry.types().items()}

    async def write(part: Buffer, conn: AsyncConnection) -> None:
        fresh = Buffer({n: r for n, r in part.rows.items() if n in APPEND_ONLY or n not in written})
        merge = Buffer({n: r for n, r in part.rows.items() if n not in fresh.rows})
        await bulk_insert(conn, gen, fresh)
        await flush(conn, gen, merge)
        written.update(n for n in part.rows if n not in APPEND_ONLY)

    pending: list[asyncio.Task[None]] = []

    async def write_part(part: Buffer) -> None:
        async with write_tx(store) as wconn:
            if not store.is_sqlite:
                # Nothing reads this generation before the switch, whose commit is durable.
                await wconn.execute(text("SET LOCAL synchronous_commit = off"))
            await write(part, wconn)

    async def drain(keyed: bool) -> None:
        """Writes what the buffer holds. Append-only rows go in the background, so the
        database inserts one batch while this process folds the next pages."""
        while pending:
            await pending.pop()
        part = Buffer(buffer.take(APPEND_ONLY if not keyed else list(buffer.rows)))
        if not part.rows:
            return
        if keyed:
            await write_part(part)
        else:
            pending.append(asyncio.create_task(write_part(part)))

    def fold(rows: list[Any]) -> None:
        add = buffer.add_event
        for row in rows:
            add(ev_of_row(row, current))

    try:
        async with store.engine.connect() as rconn:
            reader = _Reader(rconn)
            async for rows in _pages(reader, order, upto, page):
                fold(rows)
                report.events += len(rows)
                if sum(len(buffer.rows.get(n, ())) for n in APPEND_ONLY) >= page * 2:
                    await drain(keyed=False)
                if buffer.size() >= flush_rows:
                    await drain(keyed=True)
            # Catch up with what the live subscription archived meanwhile.
            last = upto
            while rows := await reader.by_seq(last, None, page):
                fold(rows)
                report.caught_up += len(rows)
                last = rows[-1][0]
                if len(rows) < page:
                    break
            await drain(keyed=True)
        # The switch: live appends wait on the archive lock; whatever they archived since
        # the last read is folded here, so the new generation misses nothing.
        async with write_tx(store) as conn:
            await lock_archive(conn)
            reader = _Reader(conn)
            while rows := await reader.by_seq(last, None, page):
                fold(rows)
                report.caught_up += len(rows)
                last = rows[-1][0]
            await flush(conn, gen, buffer)
            buffer.clear()
            if compare is None:
                await set_meta(conn, ACTIVE, str(number))
            else:
                await compare(conn, gen)
            await conn.execute(meta_table.delete().where(meta_table.c.name == BUILDING))
        if compare is not None:
            async with write_tx(store) as conn:
                await drop_generation(conn, number)
    except BaseException:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
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


__all__ = ["Compare", "RebuildRunning", "Report", "generation", "rebuild"]
