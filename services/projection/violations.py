"""The findings as a maintained read model: `g<N>_findings`, one row per finding, paged
by time.

Findings are not computed when asked (over a million events that took seconds): each
delivered batch re-evaluates the scopes its events touch, once each, in the transaction
that archives it.

- A vehicle's checks (findings.VEHICLE) read its own stream, its trips, cycles and swabs
  and the overrides that name it; every event carrying its `vehicle_id` re-evaluates
  them.
- A transfer's checks (findings.TRANSFER) read its decisions, trips and return leg, and
  the vehicles, facilities and facility loads these name; every event carrying its
  `transfer_id` re-evaluates them, and so do the vehicle's registration, the facility's
  registration and the load reports that come before its destination decision.
- R4 (findings.QueueFold) folds dispatch's decisions in dispatch's store order, as far
  as the archive holds that store without a gap, keeping its small state in `g<N>_folds`.

Re-evaluating a scope deletes its rows and writes what the checks find now. A rebuild
evaluates every scope at once over the same rows (`build`), which gives the same rows:
each check's findings depend only on its scope's rows (the tests compare live and
rebuilt tables). A finding whose `at` (a deadline) is still ahead is kept but not shown.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, delete, func, insert, or_, select, union
from sqlalchemy.ext.asyncio import AsyncConnection

from services.projection import findings as checks
from services.projection.data import AuditData
from services.projection.facts import Records, Rows
from services.projection.keyset import Keyset
from services.projection.queries import (
    SCOPE_TABLES,
    fetch,
    folded_queue,
    folded_scope,
    load_folded,
    load_scope,
    parse_rows,
)
from services.projection.tables import Generation, archive, copy_records

log = logging.getLogger(__name__)

QUEUE_FOLD = "r4_queue"
DISPATCH_STORE = "dispatch"
MAX_PAGE = 1000


# -- which scopes an event touches ------------------------------------------------------


async def touched(conn: AsyncConnection, gen: Generation, type_: str, position: int,
                  p: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(vehicle ids, transfer ids) whose findings an event (its type, its position in its
    store, its payload) may change."""
    vehicles = {v for v in (p.get("vehicle_id"),) if isinstance(v, str) and v}
    transfers = {t for t in (p.get("transfer_id"), p.get("return_of"))
                 if isinstance(t, str) and t}
    d = gen["decisions"]
    if type_ == "VehicleRegistered" and vehicles:
        transfers |= set(await _scalars(conn, select(d.c.transfer_id).where(
            and_(d.c.vehicle_id.in_(vehicles), d.c.type == "VehicleAssigned"))))
    elif type_ == "FacilityRegistered" and p.get("facility_id"):
        # Its own decisions, and its backups' (R7: they take patients while it overflows).
        named = [p["facility_id"], *checks.backup_ids(p)]
        transfers |= set(await _scalars(conn, select(d.c.transfer_id).where(d.c.facility_id.in_(named))))
    elif type_ == "FacilityLoadReported" and p.get("facility_id"):
        # R7 reads the last report before each destination decision: the decisions between
        # this report and the facility's next one, to it and to its backups.
        loads, facilities = gen["facility_loads"], gen["facilities"]
        following = await conn.scalar(select(func.min(loads.c.position)).where(and_(
            loads.c.facility_id == p["facility_id"], loads.c.position > position)))
        registered = await conn.scalar(select(facilities.c.registered).where(
            facilities.c.facility_id == p["facility_id"]))
        backups = checks.backup_ids(orjson.loads(registered)) if registered else []
        cond = [d.c.facility_id.in_([p["facility_id"], *backups]), d.c.position > position]
        if following is not None:
            cond.append(d.c.position < following)
        transfers |= set(await _scalars(conn, select(d.c.transfer_id).where(and_(*cond))))
    return vehicles, transfers


async def _with_outbound(conn: AsyncConnection, gen: Generation, transfers: set[str]) -> set[str]:
    """These transfers and the outbound ones any of them is the return leg of: a return
    leg's handover closes its outbound transfer's loop (R11)."""
    if not transfers:
        return transfers
    t = gen["transfers"]
    out = set(transfers)
    for chunk in _chunks(sorted(transfers)):
        out |= set(await _scalars(conn, select(t.c.return_of).where(
            and_(t.c.transfer_id.in_(chunk), t.c.return_of.is_not(None)))))
    return out


async def _scalars(conn: AsyncConnection, stmt: Any) -> list[Any]:
    return [r[0] for r in await conn.execute(stmt) if r[0] is not None]


# -- keeping it --------------------------------------------------------------------------


async def refresh(conn: AsyncConnection, gen: Generation, known: set[str], *,
                  vehicles: Iterable[str] = (), transfers: Iterable[str] = ()) -> None:
    """Re-evaluates these scopes: their rows are replaced by what the checks find in
    their rows now. The scopes of a kind load and evaluate together (one set of queries
    for a whole batch); a check that fails is retried scope by scope (_evaluate)."""
    for scope, ids in ((checks.VEHICLE, vehicles), (checks.TRANSFER, transfers)):
        for chunk in _chunks(sorted(set(ids))):  # a rebuild's switch may bring thousands
            keys = {f"{scope}:{one}" for one in chunk}
            rows, failed = await _evaluate(conn, gen, scope, chunk, known)
            await _replace(conn, gen, keys, [r for r in rows if r["scope"] in keys],
                           [x for x in failed if x["scope"] in keys])


async def _replace(conn: AsyncConnection, gen: Generation, keys: set[str],
                   rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> None:
    table, failures = gen["findings"], gen["check_failures"]
    for chunk in _chunks(sorted(keys)):
        await conn.execute(delete(table).where(table.c.scope.in_(chunk)))
        await conn.execute(delete(failures).where(failures.c.scope.in_(chunk)))
    unique = list({r["id"]: r for r in rows}.values())
    if unique:
        await conn.execute(insert(table), unique)
    if failed:
        await conn.execute(insert(failures), failed)


def _chunks(keys: list[str], size: int = 400) -> Iterator[list[str]]:
    """Keys in groups small enough for one statement's parameters (SQLite's limit)."""
    for i in range(0, len(keys), size):
        yield keys[i:i + size]


async def _fold_state(conn: AsyncConnection, gen: Generation) -> checks.QueueFold:
    folds = gen["folds"]
    value = await conn.scalar(select(folds.c.value).where(folds.c.name == QUEUE_FOLD))
    return checks.QueueFold.of(orjson.loads(value)) if value else checks.QueueFold()


async def _save_fold(conn: AsyncConnection, gen: Generation, fold: checks.QueueFold, fresh: bool) -> None:
    folds = gen["folds"]
    value = orjson.dumps(fold.state(), option=orjson.OPT_SORT_KEYS).decode()
    if fresh:
        await conn.execute(insert(folds).values(name=QUEUE_FOLD, value=value))
    else:
        await conn.execute(folds.update().where(folds.c.name == QUEUE_FOLD).values(value=value))


async def contiguous(conn: AsyncConnection, store: str, after: int, upto_seq: int | None = None) -> int:
    """How far the archive holds `store` without a gap from position `after` on (among
    the rows archived up to `upto_seq`, when given)."""
    cond = [archive.c.store == store, archive.c.position > after]
    if upto_seq is not None:
        cond.append(archive.c.seq <= upto_seq)
    count, top = (await conn.execute(
        select(func.count(), func.max(archive.c.position)).where(and_(*cond)))).one()
    if not count or top - after == count:  # positions are unique per store: no gap
        return int(top or after)
    upto, page = after, 10_000
    while True:
        positions = await _scalars(conn, select(archive.c.position).where(and_(
            *cond[:1], archive.c.position > upto, *cond[2:])).order_by(archive.c.position).limit(page))
        for position in positions:
            if position != upto + 1:
                return upto
            upto = position
        if len(positions) < page:
            return upto


async def advance_queue(conn: AsyncConnection, gen: Generation, known: set[str]) -> None:
    """Folds dispatch's decisions (R4) up to where the archive has that store complete."""
    if not checks.R4_SPEC.needs <= known:
        return
    folds = gen["folds"]
    fresh = await conn.scalar(select(func.count()).select_from(folds).where(folds.c.name == QUEUE_FOLD)) == 0
    fold = await _fold_state(conn, gen)
    upto = await contiguous(conn, DISPATCH_STORE, fold.position)
    if upto == fold.position:
        return
    d = gen["decisions"]
    rows = parse_rows(await conn.execute(select(d).where(and_(
        d.c.position > fold.position, d.c.position <= upto, d.c.type.in_(checks.R4_TYPES)))
        .order_by(d.c.position)))
    found = await _queue(conn, gen, fold, rows)
    fold.position = upto
    if found:
        await conn.execute(insert(gen["findings"]), [checks.row_of(checks.DISPATCH, f) for f in found])
    await _save_fold(conn, gen, fold, fresh)


async def _queue(conn: AsyncConnection, gen: Generation, fold: checks.QueueFold,
                 rows: list[dict[str, Any]]) -> list[checks.Finding]:
    """Applies decisions to the fold, with the vehicles and requests an assignment needs
    (registered, and requested, before it in the same store: already folded)."""
    data = AuditData()
    assigned = [r for r in rows if r["type"] == "VehicleAssigned"]
    if assigned:
        vehicle_ids = {checks.payload(r).get("vehicle_id") or "" for r in assigned}
        v = gen["vehicles"]
        data.vehicles = {r["vehicle_id"]: r for r in parse_rows(
            await conn.execute(select(v).where(v.c.vehicle_id.in_(vehicle_ids))))}
        wanted = set(fold.waiting) | {r["transfer_id"] for r in rows if r["type"] in checks.R4_REQUESTS}
        t = gen["transfers"]
        if wanted:
            data.transfers = {r["transfer_id"]: r for r in parse_rows(await conn.execute(
                select(t.c.transfer_id, t.c.request).where(t.c.transfer_id.in_(wanted))))}
    found: dict[str, checks.Finding] = {}
    for row in rows:
        for f in fold.apply(row, data):
            found.setdefault(f.id, f)
    return list(found.values())


class Delivered(Protocol):
    """What the findings need of an archived event (an Envelope, or a rebuild's Ev)."""

    @property
    def store(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def payload(self) -> dict[str, Any]: ...


async def apply(conn: AsyncConnection, gen: Generation, events: Sequence[Delivered],
                known: set[str]) -> None:
    """After these events' facts are written (the live path, a delivered batch at once;
    a rebuild's switch): every scope any of them touches is re-evaluated once, over its
    rows as they are now, which is what re-evaluating it after each of them would leave."""
    vehicles: set[str] = set()
    transfers: set[str] = set()
    for ev in events:
        v, t = await touched(conn, gen, ev.type, ev.position, ev.payload)
        vehicles |= v
        transfers |= t
    await refresh(conn, gen, known, vehicles=vehicles,
                  transfers=await _with_outbound(conn, gen, transfers))
    if any(ev.store == DISPATCH_STORE for ev in events):
        await advance_queue(conn, gen, known)


async def build(conn: AsyncConnection, gen: Generation, known: set[str], upto_seq: int) -> int:
    """Every scope at once (a rebuild, before its switch), from the fact rows written: the
    rows the live path would have written, given the events archived up to `upto_seq`
    (all of them folded). Returns how many findings this wrote."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for scope in (checks.VEHICLE, checks.TRANSFER):
        found, failed = await _evaluate(conn, gen, scope, None, known)
        rows += found
        failures += failed
    if checks.R4_SPEC.needs <= known:
        upto = await contiguous(conn, DISPATCH_STORE, 0, upto_seq)
        fold, queued = _fold_queue(await load_queue(conn, gen, upto), upto)
        rows += queued
        if fold.position:  # as the live path keeps it: once it has folded something
            await _save_fold(conn, gen, fold, fresh=True)
    await write_rows(conn, gen, rows)
    if failures:
        await conn.execute(insert(gen["check_failures"]), failures)
    return len(rows)


@dataclass
class Evaluated:
    """build()'s findings of one scope, evaluated over a fold's rows in memory."""

    rows: list[dict[str, Any]]
    failed: bool  # a check failed over the whole scope: evaluate it from the tables instead
    queue: checks.QueueFold | None = None  # R4's fold, when asked for and its types are known
    queued: list[dict[str, Any]] = field(default_factory=list)  # what R4's fold found


def evaluate_folded(keyed: Rows, listed: Records, known: set[str], scope: str,
                    dispatch_upto: int | None = None) -> Evaluated:
    """What build() finds for one scope (and, given `dispatch_upto`, how far the archive
    holds dispatch's store without a gap, R4's fold), from the rows a rebuild folded, in
    memory (its keyed rows, and its append-only rows as written), rather than from the
    tables they are being written to: a rebuild runs this beside those writes. Pure."""
    loaded = load_folded(keyed, listed, SCOPE_TABLES[scope])
    failed: list[dict[str, str]] = []
    found = checks.evaluate_scope(folded_scope(loaded, scope), scope, known, failed)
    out = Evaluated([] if failed else [checks.row_of(k, f) for k, f in found], bool(failed))
    if dispatch_upto is not None and checks.R4_SPEC.needs <= known:
        out.queue, out.queued = _fold_queue(folded_queue(keyed, loaded, dispatch_upto), dispatch_upto)
    return out


def _fold_queue(data: AuditData, upto: int) -> tuple[checks.QueueFold, list[dict[str, Any]]]:
    """R4's fold over dispatch's decisions up to `upto` (load_queue's data), from the
    start: the fold and the rows of what it found."""
    fold = checks.QueueFold()
    fold.position = upto
    queue: dict[str, checks.Finding] = {}
    for d in data.decisions:
        for f in fold.apply(d, data):
            queue.setdefault(f.id, f)
    return fold, [checks.row_of(checks.DISPATCH, f) for f in queue.values()]


async def write_evaluated(conn: AsyncConnection, gen: Generation, evaluated: dict[str, Evaluated],
                          known: set[str]) -> int:
    """Writes what evaluate_folded found for each scope (vehicle, then transfer, as
    build() orders them), once the fact rows are written: a scope whose check failed is
    evaluated from them, key by key, as build() does. Returns how many findings."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for scope in (checks.VEHICLE, checks.TRANSFER):
        if evaluated[scope].failed:
            found, failed = await _evaluate(conn, gen, scope, None, known)
            rows += found
            failures += failed
        else:
            rows += evaluated[scope].rows
    for one in evaluated.values():
        if one.queue is not None:
            rows += one.queued
            if one.queue.position:  # as the live path keeps it: once it has folded something
                await _save_fold(conn, gen, one.queue, fresh=True)
    await write_rows(conn, gen, rows)
    if failures:
        await conn.execute(insert(gen["check_failures"]), failures)
    return len(rows)


async def _evaluate(conn: AsyncConnection, gen: Generation, scope: str, ids: list[str] | None,
                    known: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows and failures of these scopes (all: None). A check that fails over many scopes
    is run again scope by scope, so that one odd scope costs only its own findings, as it
    does live."""
    failed: list[dict[str, str]] = []
    found = checks.evaluate_scope(await load_scope(conn, gen, scope, ids), scope, known, failed)
    if not failed:
        return [checks.row_of(k, f) for k, f in found], []
    if ids is not None and len(ids) == 1:
        key = f"{scope}:{ids[0]}"
        return [checks.row_of(k, f) for k, f in found if k == key], [{**x, "scope": key} for x in failed]
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for one in sorted(ids or await scope_ids(conn, gen, scope)):
        r, x = await _evaluate(conn, gen, scope, [one], known)
        rows += r
        failures += x
    return rows, failures


async def scope_ids(conn: AsyncConnection, gen: Generation, scope: str) -> list[str]:
    """Every vehicle or transfer some fact row names (the keys of the scopes)."""
    column = f"{scope}_id"
    names = {checks.VEHICLE: ("vehicles", "vehicle_log", "trips", "cycles", "swabs", "decisions", "others"),
             checks.TRANSFER: ("transfers", "trips", "decisions", "others")}[scope]
    query = union(*(select(gen[n].c[column]).where(gen[n].c[column].is_not(None)) for n in names))
    return sorted(r[0] for r in await conn.execute(query))


async def load_queue(conn: AsyncConnection, gen: Generation, upto: int) -> AuditData:
    """What R4's fold reads, up to a position of dispatch's store: the decisions it folds,
    in order; every vehicle; the requests of the transfers that ever waited or got a vehicle."""
    d, t = gen["decisions"], gen["transfers"]
    data = AuditData()
    data.decisions = await fetch(conn, select(d).where(and_(
        d.c.position <= upto, d.c.type.in_(checks.R4_TYPES))).order_by(d.c.position))
    data.assemble("vehicles", await fetch(conn, select(gen["vehicles"])))
    waited = select(d.c.transfer_id).where(d.c.type.in_(checks.R4_REQUESTS))
    data.assemble("transfers", await fetch(conn, select(t.c.transfer_id, t.c.request).where(
        t.c.transfer_id.in_(waited))))
    return data


async def write_rows(conn: AsyncConnection, gen: Generation, rows: list[dict[str, Any]]) -> None:
    unique = list({r["id"]: r for r in rows}.values())
    if not unique:
        return
    if conn.dialect.name == "postgresql":
        await copy_records(conn, gen["findings"].name, list(checks.ROW_COLUMNS),
                           [tuple(r[c] for c in checks.ROW_COLUMNS) for r in unique])
    else:
        await conn.execute(insert(gen["findings"]), unique)


# -- reading it --------------------------------------------------------------------------


# A page of findings ends at a finding's (at_key, id).
FINDINGS = Keyset(re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z", re.ASCII),
                  re.compile(r"[0-9a-f]{16}", re.ASCII))


async def page(conn: AsyncConnection, gen: Generation | None, *, now: datetime, limit: int,
               after: tuple[str, str] | None = None, rule: str | None = None, kind: str | None = None,
               lo: datetime | None = None, hi: datetime | None = None, vehicle_id: str | None = None,
               facility_id: str | None = None, transfer_id: str | None = None,
               ) -> tuple[list[dict[str, Any]], str | None, int]:
    """A page of findings in time order: (findings, cursor of the next page, total)."""
    if gen is None:
        return [], None, 0
    f = gen["findings"]
    cond = [f.c.at_key <= checks.utc_key(now.isoformat())]
    for column, value in ((f.c.rule, rule), (f.c.kind, kind), (f.c.vehicle_id, vehicle_id),
                          (f.c.facility_id, facility_id), (f.c.transfer_id, transfer_id)):
        if value is not None:
            cond.append(column == value)
    if lo is not None:
        cond.append(f.c.at_key >= checks.utc_key(lo.isoformat()))
    if hi is not None:
        cond.append(f.c.at_key < checks.utc_key(hi.isoformat()))
    total = int(await conn.scalar(select(func.count()).select_from(f).where(and_(*cond))) or 0)
    if after is not None:
        cond.append(or_(f.c.at_key > after[0], and_(f.c.at_key == after[0], f.c.id > after[1])))
    rows = list(await conn.execute(select(f.c.at_key, f.c.id, f.c.body).where(and_(*cond))
                                   .order_by(f.c.at_key, f.c.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = FINDINGS.cursor(rows[-1].at_key, rows[-1].id) if more else None
    return [orjson.loads(r.body) for r in rows], nxt, total


async def of_vehicle(conn: AsyncConnection, gen: Generation | None, vehicle_id: str,
                     now: datetime, limit: int = MAX_PAGE) -> list[dict[str, Any]]:
    """Every finding of a vehicle whose time has come, over its whole life (custody), a
    page at a time: not only the first page."""
    out: list[dict[str, Any]] = []
    after: tuple[str, str] | None = None
    while True:
        found, nxt, _ = await page(conn, gen, now=now, limit=limit, after=after, vehicle_id=vehicle_id)
        out += found
        if nxt is None:
            return out
        after = FINDINGS.parse(nxt)


async def failures(conn: AsyncConnection, gen: Generation | None, limit: int = 50) -> list[dict[str, Any]]:
    if gen is None:
        return []
    t = gen["check_failures"]
    rows = await conn.execute(select(t).order_by(t.c.scope, t.c.check).limit(limit))
    return [dict(r._mapping) for r in rows]
