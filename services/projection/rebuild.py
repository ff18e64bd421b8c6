"""Rebuild every read model from the archive without downtime: build beside, then switch.

1. Pick the next generation number and create its tables (the active one keeps serving
   reads and taking live events).
2. Fold the archive into it in pages: a page of events is merged in memory
   (facts.Buffer) and written in bulk (COPY on PostgreSQL), not one write per event. On
   PostgreSQL, worker processes fold slices of the archive side by side (the fold is
   Python, bound to one core each); their keyed rows are merged here in slice order.
3. Evaluate the findings of every scope over the fact rows (violations.build).
4. Catch up with what arrived meanwhile, then, holding the archive lock (live appends
   wait a moment), fold the last few events, re-evaluate the findings they touch and
   switch `active_generation` in the same transaction. Reads move to the new tables at
   their next query.

`order="store"` folds store after store in position order instead of in the order the
events were applied live: the result must still be identical, which is what shows that
the read models do not depend on how Kafka interleaved the streams.

    python -m services.projection.rebuild [--order seq|store] [--page N] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.contracts import registry
from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore
from services.projection import violations
from services.projection.facts import SPECS, Buffer, Ev
from services.projection.findings import registry_types
from services.projection.tables import (
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
    findings: int = 0
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

    async def by_store(self, store: str, after: int, upto: int, seq_upto: int, page: int) -> list[Any]:
        """A store's events with positions in (after, upto], among those archived up to seq_upto."""
        stmt = (select(*_COLS).where(and_(
            archive.c.store == store, archive.c.position > after, archive.c.position <= upto,
            archive.c.seq <= seq_upto)).order_by(archive.c.position).limit(page))
        sql = (f"SELECT {self.cols} FROM audit_archive WHERE store = $1 AND position > $2 "
               f"AND position <= $3 AND seq <= $4 ORDER BY position LIMIT {int(page)}")
        return await self._fetch(sql, stmt, store, after, upto, seq_upto)


@dataclass(frozen=True)
class Part:
    """A slice of the archive folded on its own: seq in (lo, hi], or (order "store") the
    positions (lo, hi] of one store among the events archived up to `seq_upto`. Slices
    merge in their order like one fold (facts.Buffer.merge), since each keeps every
    stream's own order."""

    order: str
    lo: int
    hi: int
    store: str = ""
    seq_upto: int = 0


async def _plan(conn: AsyncConnection, order: str, upto: int, slices: int) -> list[Part]:
    if order == "seq":
        step = max(1, -(-upto // slices))
        return [Part("seq", lo, min(lo + step, upto)) for lo in range(0, upto, step)]
    tops = (await conn.execute(select(archive.c.store, func.max(archive.c.position)).where(
        archive.c.seq <= upto).group_by(archive.c.store).order_by(archive.c.store))).all()
    step = max(1, -(-upto // slices))
    return [Part("store", lo, min(lo + step, top), store, upto)
            for store, top in tops for lo in range(0, top, step)]


async def _pages(reader: _Reader, part: Part, page: int) -> AsyncIterator[list[Any]]:
    """The part's pages in order; the next page is already being read while the caller
    folds this one (the database works on the other core meanwhile)."""
    def next_page(rows: list[Any] | None) -> Any:
        if part.order == "seq":
            return reader.by_seq(rows[-1][0] if rows else part.lo, part.hi, page)
        return reader.by_store(part.store, rows[-1][3] if rows else part.lo, part.hi, part.seq_upto, page)

    pending = asyncio.ensure_future(next_page(None))
    while rows := await pending:
        pending = asyncio.ensure_future(next_page(rows))
        yield rows
    await pending


def _versions() -> dict[str, int]:
    return {name: cls.schema_version for name, cls in registry.types().items()}


class _AppendWriter:
    """Writes the append-only rows (one per event) as pages fill the buffer, in the
    background, so the database inserts one batch while this process folds the next."""

    def __init__(self, store: EventStore, gen: Generation, page: int) -> None:
        self.store, self.gen, self.page = store, gen, page
        self.pending: asyncio.Task[None] | None = None

    async def drain(self, buffer: Buffer, force: bool = False) -> None:
        if not force and sum(len(buffer.rows.get(n, ())) for n in APPEND_ONLY) < self.page * 2:
            return
        await self.wait()
        part = Buffer(buffer.take(APPEND_ONLY))
        if part.rows:
            self.pending = asyncio.create_task(_write_fresh(self.store, self.gen, part))

    async def wait(self) -> None:
        if self.pending is not None:
            task, self.pending = self.pending, None
            await task

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.cancel()


async def _write_fresh(store: EventStore, gen: Generation, part: Buffer) -> None:
    async with write_tx(store) as conn:
        if not store.is_sqlite:
            # Nothing reads this generation before the switch, whose commit is durable.
            await conn.execute(text("SET LOCAL synchronous_commit = off"))
        await bulk_insert(conn, gen, part)


async def _fold_part(store: EventStore, part: Part, page: int, buffer: Buffer, writer: _AppendWriter,
                     spill: Callable[[], Awaitable[None]] | None = None) -> None:
    current = _versions()
    async with store.engine.connect() as rconn:
        async for rows in _pages(_Reader(rconn), part, page):
            add = buffer.add_event
            for row in rows:
                add(ev_of_row(row, current))
            await writer.drain(buffer)
            if spill is not None:
                await spill()


def fold_in_process(url: str, search_path: str, number: int, part: Part, page: int) -> tuple[
        dict[str, dict[tuple[Any, ...], dict[str, Any]]], int, int]:
    """A worker process's part: folded, its append-only rows written, its keyed rows (a
    transfer, a trip, ...) returned, since they may take facts from other parts too."""
    async def run() -> tuple[dict[str, dict[tuple[Any, ...], dict[str, Any]]], int, int]:
        store = EventStore.from_url("projection", url, pool_size=2, max_overflow=2,
                                    connect_args={"server_settings": {"search_path": search_path}})
        writer = _AppendWriter(store, generation(number), page)
        buffer = Buffer()
        try:
            await _fold_part(store, part, page, buffer, writer)
            await writer.drain(buffer, force=True)
            await writer.wait()
        finally:
            writer.cancel()
            await store.close()
        return buffer.rows, buffer.events, buffer.unreadable

    return asyncio.run(run())


async def _fold_in_workers(store: EventStore, conn: AsyncConnection, gen: Generation, order: str,
                           upto: int, page: int, workers: int) -> Buffer:
    parts = await _plan(conn, order, upto, workers * 2)
    url = store.engine.url.render_as_string(hide_password=False)
    search_path = str(await conn.scalar(text("SHOW search_path")))
    loop = asyncio.get_running_loop()
    merged = Buffer()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [loop.run_in_executor(pool, fold_in_process, url, search_path, gen.number, part, page)
                   for part in parts]
        try:
            for future in futures:  # merged in the parts' order
                rows, events, unreadable = await future
                merged.merge(Buffer(rows, events, unreadable))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return merged


def default_workers(store: EventStore) -> int:
    """Worker processes for a rebuild: one per core on PostgreSQL (the fold is Python,
    bound to a core; the database works beside it), none on SQLite (one writer)."""
    return 1 if store.is_sqlite else max(1, min(4, os.cpu_count() or 1))


async def rebuild(store: EventStore, *, order: str = "seq", page: int = 10_000,
                  flush_rows: int = 500_000, force: bool = False, workers: int | None = None) -> Report:
    """Pages of events are folded in memory (facts.Buffer). Append-only tables (one row per
    event) are written as they fill; keyed rows (a transfer, a trip, ...) gather facts from
    many events, so they are kept until the end and written once. With worker processes
    (PostgreSQL), each folds a slice of the archive and the keyed rows are merged here;
    in this process alone, keyed rows are merged into the table by upsert whenever more
    than `flush_rows` of them are held."""
    if order not in ("seq", "store"):
        raise ValueError("order is seq or store")
    workers = default_workers(store) if workers is None else workers
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
    known = registry_types()
    current = _versions()
    written: set[str] = set()  # keyed tables already holding rows: later writes must merge
    writer = _AppendWriter(store, gen, page)
    buffer = Buffer()

    async def write_keyed() -> None:
        """The keyed rows held: inserted into a table that has none yet, else merged."""
        part = Buffer(buffer.take(list(buffer.rows)))
        async with write_tx(store) as wconn:
            await bulk_insert(wconn, gen, Buffer({n: r for n, r in part.rows.items() if n not in written}))
            await flush(wconn, gen, Buffer({n: r for n, r in part.rows.items() if n in written}))
        written.update(part.rows)

    async def spill() -> None:
        """Keyed rows beyond `flush_rows` go to the table (one process only)."""
        if buffer.size() >= flush_rows:
            await writer.wait()
            await write_keyed()

    def fold(rows: list[Any]) -> list[Ev]:
        evs = [ev_of_row(row, current) for row in rows]
        add = buffer.add_event
        for ev in evs:
            add(ev)
        return evs

    try:
        if workers > 1:
            async with store.engine.connect() as pconn:
                buffer = await _fold_in_workers(store, pconn, gen, order, upto, page, workers)
        else:
            async with store.engine.connect() as pconn:
                parts = await _plan(pconn, order, upto, 1)
            for part in parts:
                await _fold_part(store, part, page, buffer, writer, spill)
        report.events = buffer.events
        async with store.engine.connect() as rconn:
            # Catch up with what the live subscription archived meanwhile.
            reader = _Reader(rconn)
            last = upto
            while rows := await reader.by_seq(last, None, page):
                fold(rows)
                report.caught_up += len(rows)
                last = rows[-1][0]
                await writer.drain(buffer)
                if len(rows) < page:
                    break
        await writer.drain(buffer, force=True)
        await writer.wait()
        await write_keyed()
        # The findings of every scope, from the fact rows just written.
        async with write_tx(store) as conn:
            report.findings = await violations.build(conn, gen, known, last)
        # The switch: live appends wait on the archive lock; whatever they archived since
        # the last read is folded here, with the findings it touches, as the live path
        # does, so the new generation misses nothing.
        async with write_tx(store) as conn:
            await lock_archive(conn)
            reader = _Reader(conn)
            late: list[Ev] = []
            while rows := await reader.by_seq(last, None, page):
                late += fold(rows)
                report.caught_up += len(rows)
                last = rows[-1][0]
            await flush(conn, gen, buffer)
            buffer.clear()
            vehicles: set[str] = set()
            transfers: set[str] = set()
            for ev in late:
                v, t = await violations.touched(conn, gen, ev.type, ev.position, ev.payload)
                vehicles |= v
                transfers |= t
            await violations.refresh(conn, gen, known, vehicles=vehicles, transfers=transfers)
            await violations.advance_queue(conn, gen, known)
            await set_meta(conn, "active_generation", str(number))
            await conn.execute(meta_table.delete().where(meta_table.c.name == BUILDING))
    except BaseException:
        writer.cancel()
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
    parser.add_argument("--workers", type=int, default=None,
                        help="processes folding slices of the archive (default: one per core on PostgreSQL)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    async def run() -> None:
        settings = Settings()
        store = EventStore.from_url("projection", settings.store_url("projection"))
        try:
            await store.create_schema(metadata)
            report = await rebuild(store, order=args.order, page=args.page, force=args.force,
                                   workers=args.workers)
            print(report.view())
        finally:
            await store.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()


__all__ = ["RebuildRunning", "Report", "generation", "rebuild"]
