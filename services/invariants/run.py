"""Running every check over the four stores: wait for the consumers to catch up, read each
store once for the rule, loop and delivery checks, then verify the hash chains and compare
the live read models with a rebuild."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore, events_table, tracking_table
from services.invariants.delivery import Consumer, Delivery, consumers
from services.invariants.history import pages
from services.invariants.loops import loops
from services.invariants.report import Check, EventRef, Item, Report
from services.invariants.rules import Fold
from services.projection import queries
from services.projection.consumers import SOURCES
from services.projection.rebuild import RebuildRunning, rebuild
from services.projection.tables import Generation
from services.projection.tables import metadata as projection_tables
from services.settings import Settings

STORES = ("dispatch", "transfer", "disinfection", "projection")


async def _count(store: EventStore, where: Any) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(events_table).where(where)) or 0)


async def settle(stores: Mapping[str, EventStore], cons: list[Consumer], timeout: float,
                 interval: float = 0.2) -> tuple[bool, dict[str, int]]:
    """Waits until every consumer has a tracking row per event it handles and no store
    moved between two looks. Returns whether it got there, and the stores' heads then."""
    deadline = time.monotonic() + timeout
    previous: dict[str, int] | None = None
    while True:
        heads = {name: await store.head() for name, store in stores.items()}
        behind = False
        for c in cons:
            expected = 0
            for source, types in c.reads.items():
                if source in stores:
                    expected += await _count(stores[source], events_table.c.type.in_(types)
                                             if types is not None else events_table.c.position > 0)
            async with stores[c.store].engine.connect() as conn:
                tracked = int(await conn.scalar(select(func.count()).select_from(tracking_table)
                                                .where(tracking_table.c.consumer == c.name)) or 0)
            behind = behind or tracked < expected
        if not behind and heads == previous:
            return True, heads
        if time.monotonic() > deadline:
            return False, heads
        previous = heads
        await asyncio.sleep(interval)


async def tracked_ids(store: EventStore, consumer: str) -> set[str]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(tracking_table.c.event_id).where(tracking_table.c.consumer == consumer))
        return {r[0] for r in rows}


async def chains(stores: Mapping[str, EventStore], heads: Mapping[str, int]) -> list[Check]:
    """Each store's chain from its first event (EventStore.verify), and the projection's copy
    of each producing store: its chain, and the same hash as the store at the position the
    consumers had caught up to (the chain makes that one hash stand for every event before)."""
    checks = []
    for name, store in stores.items():
        check = Check("chains", f"store:{name}", f"the {name} store's hash chain verifies")
        check.count("events", await store.head())
        broken = await store.verify()
        if broken is not None:
            check.add(Item("chain_broken", f"{name} position {broken.position}: {broken.reason}", (), None,
                           {"store": name, "position": broken.position, "event_id": broken.event_id}))
        checks.append(check)
    if "projection" not in stores:
        return checks
    for source in SOURCES:
        if source not in stores:
            continue
        check = Check("chains", f"copy:{source}", f"the projection's copy of {source}: its chain verifies, "
                      "and it holds the store's events")
        async with stores["projection"].engine.connect() as conn:
            count, _, broken = await queries.verify_copy(conn, source)
            head = heads.get(source, 0)
            copied = (await queries.copy_hashes(conn, source, [head])).get(head) if head else None
        check.count("events", count)
        if broken is not None:
            check.add(Item("chain_broken", f"copy of {source}, position {broken.position}: {broken.reason}",
                           (), None, {"store": source, "position": broken.position}))
        if head:
            async with stores[source].engine.connect() as conn:
                original = await conn.scalar(
                    select(events_table.c.hash).where(events_table.c.position == head))
            if copied != original:
                check.add(Item("copy_differs", f"copy of {source} at position {head}: "
                               + ("missing" if copied is None else "a different hash than the store's"),
                               (), None, {"store": source, "position": head}))
        checks.append(check)
    return checks


async def _diff(conn: AsyncConnection, live: Generation, built: Generation, check: Check,
                shown: int = 20) -> None:
    """Every table of the generation: the fact tables and what is kept from them (the
    findings, the checks that failed, the folds kept between events)."""
    for name, a in live.tables.items():
        b = built[name]
        key = [c.name for c in a.primary_key.columns]
        check.count("rows", int(await conn.scalar(select(func.count()).select_from(a)) or 0))
        only: dict[str, dict[tuple[Any, ...], Any]] = {}
        for side, mine, other in (("live", a, b), ("rebuild", b, a)):
            rows = select(mine).except_(select(other))
            n = int(await conn.scalar(select(func.count()).select_from(rows.subquery())) or 0)
            shown_rows: list[Any] = list(await conn.execute(rows.limit(shown))) if n else []
            only[side] = {tuple(r._mapping[k] for k in key): r for r in shown_rows}
            check.count(f"only_{side}", n)
        for at in dict.fromkeys([*only["live"], *only["rebuild"]]):
            mine_row, rebuilt = only["live"].get(at), only["rebuild"].get(at)
            if mine_row is not None and rebuilt is not None:
                columns = [c for c in mine_row._mapping if mine_row._mapping[c] != rebuilt._mapping[c]]
                detail = f"{name} {at}: live and rebuilt rows differ in {', '.join(columns)}"
            else:
                detail = f"{name} {at}: only in the {'live read model' if rebuilt is None else 'rebuild'}"
            check.add(Item("row_differs", detail, (), None, {"table": name, "key": list(at)}))


async def read_models(projection: EventStore) -> Check:
    """The live generation against one rebuilt beside it from the archive, compared under the
    archive lock (services/projection/rebuild.py), then dropped: nothing switches."""
    check = Check("read_models", "rebuild", "the live read models identical to a rebuild from the archive")

    async def compare(conn: AsyncConnection, built: Generation) -> None:
        live = await queries.current(conn)
        if live is None:
            check.error = "no active generation"
            return
        await _diff(conn, live, built, check)

    try:
        report = await rebuild(projection, compare=compare)
        check.count("events", report.events + report.caught_up)
    except RebuildRunning as exc:
        check.error = f"could not rebuild: {exc}"
    return check


async def run(stores: Mapping[str, EventStore], *, mode: str, settle_s: float = 30.0,
              max_open_age: float | None = None, compare_read_models: bool = True,
              now: datetime | None = None) -> Report:
    """Every check over these stores (any of dispatch, transfer, disinfection, projection)."""
    started = time.perf_counter()
    report = Report(mode=mode, started_at=iso(utcnow()))
    cons = [c for c in consumers() if c.store in stores]
    report.settled, heads = await settle(stores, cons, settle_s)
    tracked = {c.name: await tracked_ids(stores[c.store], c.name) for c in cons}
    fold, delivery = Fold(), Delivery(cons, tracked, heads)
    for name in (s for s in STORES if s in stores):
        report.events[name] = 0
        async for page in pages(stores[name]):
            for ev in page:
                fold.feed(ev)
                delivery.feed(ev)
            report.events[name] += len(page)
    report.checks += fold.finish()
    report.checks += loops(fold, now or utcnow(), max_open_age, heads)
    report.checks += delivery.finish()
    if compare_read_models and "projection" in stores:
        report.checks.append(await read_models(stores["projection"]))
    report.checks += await chains(stores, heads)
    report.seconds = time.perf_counter() - started
    return report


def open_stores(settings: Settings, names: tuple[str, ...] = STORES) -> dict[str, EventStore]:
    """Each service's store as the runtime opens it: {data_dir}/{service}.db when embedded,
    the service's database when distributed."""
    return {name: EventStore.from_url(name, settings.store_url(name)) for name in names}


async def check(settings: Settings, **options: Any) -> Report:
    """Opens the stores the settings name, runs every check, closes them."""
    stores = open_stores(settings)
    try:
        for name, store in stores.items():  # what a service that never started would lack
            await store.create_schema(projection_tables if name == "projection" else None)
        return await run(stores, mode=settings.mode, **options)
    finally:
        for store in stores.values():
            await store.close()


__all__ = ["EventRef", "check", "open_stores", "run", "settle"]
