"""Reads for the views: the active generation's fact rows into AuditData, the archive for
timelines, the feed and verification."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import date, timedelta
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    String,
    and_,
    any_,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    union,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.catalog.common import PatientDataDisclosed
from libs.events.envelope import GENESIS_HASH, ChainBreak, Envelope, verify_chain
from libs.events.store import checkpoints_table, events_table, readable_rows, tracking_table
from services.projection.data import AuditData, PlanSql, parse_json
from services.projection.facts import JSON_COLUMNS, SPECS, Records, Rows
from services.projection.facts import dump as canonical
from services.projection.findings import R4_REQUESTS, R4_TYPES, TRANSFER, VEHICLE, backed_up_by, is_backup
from services.projection.keyset import Keyset
from services.projection.tables import (
    NUMERIC_COLUMNS,
    Generation,
    active_generation,
    archive,
    envelope_of_row,
    generation,
    links,
)

KEYED = ("transfers", "trips", "cycles", "swabs", "vehicles", "facilities")
LISTED = ("vehicle_log", "facility_loads", "decisions", "others")


_LAZY = frozenset({"data"})  # whole payloads: the checks that need them parse them


def _parse(row: Any) -> dict[str, Any]:
    return _parse_map(dict(row._mapping))


def _parse_map(out: dict[str, Any]) -> dict[str, Any]:
    for k, v in out.items():
        if v.__class__ is str and k in JSON_COLUMNS and k not in _LAZY:
            out[k] = orjson.loads(v)
    return out


def parse_rows(result: Iterable[Any]) -> list[dict[str, Any]]:
    return [_parse(r) for r in result]


def _json_of(stmt: Any) -> tuple[str, ...]:
    """The JSON columns a statement selects that are parsed as they load (`data`, whole
    payloads, is parsed by the checks that need it)."""
    return tuple(c.name for c in stmt.selected_columns if c.name in JSON_COLUMNS and c.name not in _LAZY)


async def fetch(conn: AsyncConnection, stmt: Any) -> list[dict[str, Any]]:
    """Rows as dicts with their JSON parsed. On PostgreSQL the statement runs through the
    asyncpg connection itself (a rebuild reads whole tables this way: SQLAlchemy's row
    layer would cost it more than the database does)."""
    if conn.dialect.name == "postgresql":
        compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        args = [compiled.params[name] for name in compiled.positiontup or ()]
        raw = await conn.get_raw_connection()
        records = await raw.driver_connection.fetch(str(compiled), *args)  # type: ignore[union-attr]
        return parse_json([dict(r) for r in records], _json_of(stmt))
    return parse_json([dict(r._mapping) for r in await conn.execute(stmt)], _json_of(stmt))


# What the checks read of the keyed tables: a rebuild evaluates every scope at once, and
# parsing the JSON of columns no check reads (a trip's six steps, ...) would double its cost.
_CHECKED: dict[str, tuple[str, ...]] = {
    "transfers": ("transfer_id", "origin_kind", "risk_category", "destination_id", "vehicle_id", "return_of",
                  "request", "destination", "reported", "delivery", "handed_over"),
    "trips": ("trip_id", "transfer_id", "vehicle_id", "opened_at", "opened", "completed", "handover",
              "returned", "s_patient_aboard", "s_handed_over", "aborted"),
    "vehicles": ("vehicle_id", "kind", "dedicated_pool", "life_support"),
}


def _select(gen: Generation, name: str, where: Any = None) -> Any:
    table = gen[name]
    stmt = select(*(table.c[c] for c in _CHECKED[name])) if name in _CHECKED else select(table)
    return stmt if where is None else stmt.where(where)


def scope_plan(gen: Generation, scope: str, sel: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    """(AuditData attribute, statement) of what the checks of a scope read, for the keys
    `sel` picks (sel(column) is the condition on a vehicle id or transfer id column).
    Selected by key, the union of the loads of single keys is the load of them all: what
    lets a rebuild evaluate every scope at once, or a share of them per worker process,
    and find what the live model found one scope at a time."""
    if scope == VEHICLE:
        trips, log = gen["trips"], gen["vehicle_log"]
        return [
            *((name, _select(gen, name, sel(gen[name].c.vehicle_id)))
              for name in ("vehicles", "cycles", "swabs", "vehicle_log", "decisions", "others")),
            # Its trips: those the transfer service opened with it, and those its own stream
            # names (awaiting disinfection, returned to service), opened or not. By trip id
            # from a union, not `vehicle_id = .. OR trip_id IN (..)`: PostgreSQL reads an OR
            # with a subquery as a scan of every trip (20 ms a vehicle at 40,000 trips).
            ("trips", _select(gen, "trips", trips.c.trip_id.in_(union(
                select(trips.c.trip_id).where(sel(trips.c.vehicle_id)),
                select(log.c.trip_id).where(and_(sel(log.c.vehicle_id), log.c.trip_id.is_not(None))))))),
        ]
    t = gen["transfers"]
    return [
        # Its return leg too (R11 closes the loop on its handover).
        ("transfers", _select(gen, "transfers", or_(sel(t.c.transfer_id), sel(t.c.return_of)))),
        *((name, _select(gen, name, sel(gen[name].c.transfer_id)))
          for name in ("trips", "decisions", "others")),
    ]


def reference_plan(gen: Generation) -> list[tuple[str, Any]]:
    """What transfers name, in full: vehicles, facilities and their load reports (the
    checks look them up by id, so all of them serve any share of the transfers)."""
    return [(name, _select(gen, name)) for name in REFERENCE]


REFERENCE = ("vehicles", "facilities", "facility_loads")


Loaded = dict[str, list[dict[str, Any]]]  # fact rows as a load returns them, by table


# The tables each scope's checks read (scope_plan, and reference_plan for transfers), with
# the column a row must have for them: loading the rest would be in vain (R4's fold,
# evaluated with the transfers, reads every decision).
SCOPE_TABLES: dict[str, dict[str, str | None]] = {
    VEHICLE: {"vehicles": None, "cycles": "vehicle_id", "swabs": "vehicle_id", "vehicle_log": "vehicle_id",
              "decisions": "vehicle_id", "others": "vehicle_id", "trips": None},
    TRANSFER: {"transfers": None, "trips": "transfer_id", "decisions": None, "others": "transfer_id",
               **dict.fromkeys(REFERENCE)},
}


def load_folded(keyed: Rows, listed: Records, tables: dict[str, str | None]) -> Loaded:
    """These tables of a fold's rows (in memory) as the scope loads read them back from
    the tables they are written to: the columns the checks read, JSON parsed (but
    `data`), numbers as their columns store them; only the rows that have the column
    `tables` names. A rebuild evaluates its findings over these (folded_scope) instead of
    reading them back."""
    out: Loaded = {}
    for name, table in keyed.items():
        if name in tables:
            out[name] = _as_loaded(name, table, _CHECKED.get(name) or _ALL[name], tables[name])
    for name, records in listed.items():
        if name not in tables:
            continue
        columns = _ALL[name]
        needed = tables[name]
        if needed is not None:
            at = columns.index(needed)
            records = [r for r in records if r[at] is not None]
        numbers = [(c, NUMERIC_COLUMNS[c]) for c in columns if c in NUMERIC_COLUMNS]
        rows = [dict(zip(columns, r, strict=True)) for r in records]
        _coerce(rows, numbers)
        out[name] = rows
    return out


def folded_scope(loaded: Loaded, scope: str) -> AuditData:
    """What scope_plan selects for every key (`column IS NOT NULL`), with reference_plan
    for the transfers, from load_folded's rows: the same rows, so the checks find the
    same (tests hold the two to each other)."""
    data = AuditData()

    def take(name: str, column: str | None = None) -> list[dict[str, Any]]:
        rows = loaded.get(name, [])
        return rows if column is None else [r for r in rows if r[column] is not None]

    if scope == VEHICLE:
        for name in ("vehicles", "cycles", "swabs", "vehicle_log", "decisions", "others"):
            data.assemble(name, take(name, "vehicle_id"))
        named = {r["trip_id"] for r in data.vehicle_log if r["trip_id"] is not None}
        data.assemble("trips", [r for r in take("trips")
                                if r["vehicle_id"] is not None or r["trip_id"] in named])
        return data
    data.assemble("transfers", take("transfers"))
    for name in ("trips", "decisions", "others"):
        data.assemble(name, take(name, "transfer_id"))
    for name in REFERENCE:
        data.assemble(name, take(name))
    return data


def folded_queue(keyed: Rows, loaded: Loaded, upto: int) -> AuditData:
    """What violations.load_queue reads (R4's fold up to a position of dispatch's store),
    from a fold's rows in memory."""
    data = AuditData()
    decisions = loaded.get("decisions", [])
    data.decisions = sorted((d for d in decisions if d["type"] in R4_TYPES and d["position"] <= upto),
                            key=lambda d: d["position"])
    data.assemble("vehicles", _as_loaded("vehicles", keyed.get("vehicles", {}), _ALL["vehicles"]))
    waited = {(d["transfer_id"],) for d in decisions if d["type"] in R4_REQUESTS}
    transfers = keyed.get("transfers", {})
    data.assemble("transfers", _as_loaded("transfers", {k: transfers[k] for k in waited if k in transfers},
                                          ("transfer_id", "request")))
    return data


_ALL = {name: (*spec.key, *spec.columns) for name, spec in SPECS.items()}


def _as_loaded(name: str, rows: dict[tuple[Any, ...], dict[str, Any]],
               columns: Sequence[str], needed: str | None = None) -> list[dict[str, Any]]:
    keys = SPECS[name].key
    from_key = [(c, keys.index(c)) for c in columns if c in keys]
    rest = [c for c in columns if c not in keys]
    parsed = [c for c in rest if c in JSON_COLUMNS and c not in _LAZY]
    at = keys.index(needed) if needed in keys else None
    loads = orjson.loads
    out = []
    for key, row in rows.items():
        if needed is not None and (key[at] if at is not None else row.get(needed)) is None:
            continue
        r = {c: key[i] for c, i in from_key}
        get = row.get
        for c in rest:
            r[c] = get(c)
        for c in parsed:
            if r[c].__class__ is str:
                r[c] = loads(r[c])
        out.append(r)
    _coerce(out, [(c, NUMERIC_COLUMNS[c]) for c in rest if c in NUMERIC_COLUMNS])
    return out


def _coerce(rows: list[dict[str, Any]], numbers: list[tuple[str, Callable[[Any], Any]]]) -> None:
    for c, number in numbers:
        for r in rows:
            v = r[c]
            if v is not None and v.__class__ is not number:
                r[c] = number(v)


IDS = bindparam("ids", type_=ARRAY(String))  # a list of vehicle or transfer ids, on PostgreSQL


def _any(column: Any) -> Any:
    return column == any_(IDS)


@lru_cache(maxsize=64)
def _compiled(number: int, scope: str, dialect: Any) -> tuple[PlanSql, PlanSql]:
    """A generation's scope plan for a list of ids as PostgreSQL SQL, and what the
    transfers' checks look up by id (compiled once: the live path loads a scope per
    event, and compiling a dozen statements each time would cost more than running them)."""
    gen = generation(number)
    loads = gen["facility_loads"]
    named: list[tuple[str, Any]] = [
        ("vehicles", _select(gen, "vehicles", _any(gen["vehicles"].c.vehicle_id))),
        ("facilities", _select(gen, "facilities", _any(gen["facilities"].c.facility_id))),
        # The load report that came last before a destination decision (R7): $1 the
        # facility, $2 the decision's position.
        ("facility_loads", select(loads).where(and_(
            loads.c.facility_id == bindparam("f", type_=String),
            loads.c.position < bindparam("p", type_=BigInteger))).order_by(loads.c.position.desc())
         .limit(literal_column("1"))),
    ]
    return _to_sql(dialect, scope_plan(gen, scope, _any)), _to_sql(dialect, named)


def _to_sql(dialect: Any, plan: list[tuple[str, Any]]) -> PlanSql:
    out = []
    for attr, stmt in plan:
        compiled = stmt.compile(dialect=dialect)
        out.append((attr, str(compiled), _json_of(stmt), bool(compiled.params)))
    return out


async def load_scope(conn: AsyncConnection, gen: Generation, scope: str | None,
                     ids: Collection[str] | None) -> AuditData:
    """The rows the checks of one scope read (findings.VEHICLE or findings.TRANSFER), for
    these vehicles or transfers, or for all of them (`ids` None)."""
    scope = scope or VEHICLE
    if ids is not None and conn.dialect.name == "postgresql":
        return await _load_ids_pg(conn, gen, scope, list(ids))
    data = AuditData()

    def sel(column: Any) -> Any:
        return column.is_not(None) if ids is None else column.in_(list(ids))

    for attr, stmt in scope_plan(gen, scope, sel):
        data.assemble(attr, await fetch(conn, stmt))
    if scope == VEHICLE:
        return data
    if ids is None:
        for attr, stmt in reference_plan(gen):
            data.assemble(attr, await fetch(conn, stmt))
        return data
    vehicles, facilities, loads = _named(data)
    for name, wanted in (("vehicles", vehicles), ("facilities", facilities)):
        if wanted:
            column = gen[name].c[SPECS[name].key[0]]
            data.assemble(name, await fetch(conn, _select(gen, name, column.in_(wanted))))
    loads = await _with_primaries(conn, gen, data, loads)
    table = gen["facility_loads"]
    found: dict[str, dict[str, Any]] = {}
    for facility_id, position in loads:
        for r in await fetch(conn, select(table).where(and_(
                table.c.facility_id == facility_id, table.c.position < position))
                .order_by(table.c.position.desc()).limit(1)):
            found[r["event_id"]] = r
    data.facility_loads = list(found.values())
    return data


def _named(data: AuditData) -> tuple[set[str], set[str], list[tuple[str, int]]]:
    """Only what these transfers name: the vehicles given to them, the facilities they
    went to, and (facility, position) of each destination decision, whose last load
    report before it R7 reads."""
    vehicles = {d["vehicle_id"] for d in data.decisions if d.get("vehicle_id")}
    facilities = {d["facility_id"] for d in data.decisions if d.get("facility_id")} | {
        x["destination_id"] for x in data.transfers.values() if x.get("destination_id")}
    loads = sorted({(d["facility_id"], d["position"]) for d in data.decisions if d.get("facility_id")})
    return vehicles, facilities, loads


async def _with_primaries(conn: AsyncConnection, gen: Generation, data: AuditData,
                          loads: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """When a destination of these transfers is a backup hospital, R7 reads the hospitals
    it backs up (any facility's registration may name it: all are loaded): beside each
    (facility, decision position) whose last load report R7 reads, the same for each of
    them."""
    if not any(is_backup(f) for f in data.facilities.values()):
        return loads
    data.assemble("facilities", await fetch(conn, _select(gen, "facilities")))
    primaries = backed_up_by(data)
    return sorted({*loads, *((p, position) for f, position in loads for p in primaries.get(f, ()))})


async def run_plan(conn: Any, plan: PlanSql, ids: list[str]) -> AuditData:
    """A load plan (scope_plan as SQL) for these ids, on an asyncpg connection."""
    data = AuditData()
    for attr, sql, json, takes_ids in plan:
        rows = await (conn.fetch(sql, ids) if takes_ids else conn.fetch(sql))
        data.assemble(attr, parse_json([dict(r) for r in rows], json))
    return data


async def _load_ids_pg(conn: AsyncConnection, gen: Generation, scope: str, ids: list[str]) -> AuditData:
    plan, named = _compiled(gen.number, scope, conn.dialect)
    raw: Any = (await conn.get_raw_connection()).driver_connection
    data = await run_plan(raw, plan, ids)
    if scope == VEHICLE:
        return data
    vehicles, facilities, loads = _named(data)
    (_, vehicles_sql, vehicles_json, _), (_, facilities_sql, facilities_json, _), (_, loads_sql, _, _) = named
    data.assemble("vehicles", parse_json([dict(r) for r in await raw.fetch(vehicles_sql, sorted(vehicles))],
                                         vehicles_json))
    data.assemble("facilities", parse_json([dict(r) for r in await raw.fetch(
        facilities_sql, sorted(facilities))], facilities_json))
    loads = await _with_primaries(conn, gen, data, loads)
    found: dict[str, dict[str, Any]] = {}
    for facility_id, position in loads:
        for r in await raw.fetch(loads_sql, facility_id, position):
            found[r["event_id"]] = dict(r)
    data.facility_loads = list(found.values())
    return data


async def current(conn: AsyncConnection) -> Generation | None:
    number = await active_generation(conn)
    return generation(number) if number is not None else None


async def load(conn: AsyncConnection, gen: Generation | None = None, *, day_from: str | None = None,
               day_to: str | None = None, vehicle_id: str | None = None, trips_too: bool = False,
               tables: Collection[str] = (*KEYED, *LISTED)) -> AuditData:
    """The fact rows the views read, of these tables (what a view reads: its READS): all
    of them, or those of the transfers requested in [day_from, day_to) (local days) and,
    with `trips_too`, of those with a trip opened then (the ledger's rows are trips, on
    their own days), or those of one vehicle's trips and cycles. The scoped loads read a
    day's or a vehicle's rows, not the whole history."""
    gen = gen or await current(conn)
    data = AuditData()
    if gen is None:
        return data
    t, tr, cy, sw = gen["transfers"], gen["trips"], gen["cycles"], gen["swabs"]
    where: dict[str, Any] = {}
    if day_from is not None or day_to is not None or vehicle_id is not None:
        if vehicle_id is not None:
            trip_ids = select(tr.c.trip_id).where(tr.c.vehicle_id == vehicle_id).scalar_subquery()
            transfer_ids = select(tr.c.transfer_id).where(tr.c.vehicle_id == vehicle_id).scalar_subquery()
            where["trips"] = tr.c.vehicle_id == vehicle_id
            where["cycles"] = cy.c.vehicle_id == vehicle_id
            where["swabs"] = sw.c.vehicle_id == vehicle_id
            where["vehicle_log"] = gen["vehicle_log"].c.vehicle_id == vehicle_id
            where["vehicles"] = gen["vehicles"].c.vehicle_id == vehicle_id
            where["others"] = gen["others"].c.vehicle_id == vehicle_id
        else:
            cond = []
            if day_from is not None:
                cond.append(t.c.day >= day_from)
            if day_to is not None:
                cond.append(t.c.day < day_to)
            requested: Any = select(t.c.transfer_id).where(and_(*cond))
            if trips_too:
                # A trip's opening is an instant written with its offset: the text of any
                # instant of those local days falls within a day either side of them.
                opened: list[Any] = [tr.c.transfer_id.is_not(None)]
                if day_from is not None:
                    opened.append(tr.c.opened_at >= _day_shift(day_from, -1))
                if day_to is not None:
                    opened.append(tr.c.opened_at < _day_shift(day_to, 1))
                requested = union(requested, select(tr.c.transfer_id).where(and_(*opened)))
            transfer_ids = select(requested.subquery().c[0]).scalar_subquery()
            trip_ids = select(tr.c.trip_id).where(tr.c.transfer_id.in_(transfer_ids)).scalar_subquery()
            where["trips"] = tr.c.transfer_id.in_(transfer_ids)
            where["cycles"] = cy.c.trip_id.in_(trip_ids)
            cycle_ids = select(cy.c.cycle_id).where(cy.c.trip_id.in_(trip_ids)).scalar_subquery()
            where["swabs"] = sw.c.cycle_id.in_(cycle_ids)
            where["vehicle_log"] = gen["vehicle_log"].c.transfer_id.in_(transfer_ids)
            where["others"] = gen["others"].c.transfer_id.in_(transfer_ids)
        where["transfers"] = t.c.transfer_id.in_(transfer_ids)
        where["decisions"] = gen["decisions"].c.transfer_id.in_(transfer_ids)
    for name in (n for n in KEYED if n in tables):
        key = SPECS[name].key[0]
        target: dict[str, dict[str, Any]] = getattr(data, name)
        q = select(gen[name]) if name not in where else select(gen[name]).where(where[name])
        for row in await conn.execute(q):
            parsed = _parse(row)
            target[parsed[key]] = parsed
    for name in (n for n in LISTED if n in tables):
        listed: list[dict[str, Any]] = getattr(data, name)
        q = select(gen[name]) if name not in where else select(gen[name]).where(where[name])
        listed.extend(_parse(r) for r in await conn.execute(q))
    return data


def _day_shift(day: str, days: int) -> str:
    return (date.fromisoformat(day) + timedelta(days=days)).isoformat()


async def dump(conn: AsyncConnection, gen: Generation) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of a generation, sorted: what the live == rebuild comparison compares."""
    out = {}
    for name, table in sorted(gen.tables.items()):
        rows = [tuple(r) for r in await conn.execute(select(table))]
        out[name] = sorted(rows, key=lambda r: tuple("" if v is None else str(v) for v in r))
    return out


async def timeline_events(conn: AsyncConnection, transfer_id: str,
                          gen: Generation | None) -> tuple[list[Any], frozenset[str]]:
    """Every archived event of a transfer and of its return legs (the transfers whose
    `return_of` names it: the loop closes with them): those naming them (or correlated
    with them), and those of their trips and their disinfection cycles. And the return
    legs' ids."""
    transfers = [transfer_id]
    trip_ids: list[str] = []
    cycle_ids: list[str] = []
    if gen is not None:
        t = gen["transfers"]
        legs = await conn.execute(select(t.c.transfer_id).where(t.c.return_of == transfer_id))
        transfers += [r[0] for r in legs]
        trip_ids = [r[0] for r in await conn.execute(
            select(gen["trips"].c.trip_id).where(gen["trips"].c.transfer_id.in_(transfers)))]
        if trip_ids:
            cycle_ids = [r[0] for r in await conn.execute(
                select(gen["cycles"].c.cycle_id).where(gen["cycles"].c.trip_id.in_(trip_ids)))]
    cond: list[Any] = [archive.c.transfer_key.in_(transfers)]
    if trip_ids:
        cond.append(archive.c.trip_id.in_(trip_ids))
    if cycle_ids:
        cond.append(archive.c.cycle_id.in_(cycle_ids))
    # The exposure lists that name it (filed under the swabbed trip's transfer), and their
    # acknowledgements: who was told this patient rode in a vehicle later found positive.
    def naming(key: str, values: Iterable[str]) -> Any:
        # Payloads are archived as canonical JSON (compact, sorted keys): a key and its value
        # are written one way only. SQLite's LIKE ignores case: the rows found are checked
        # again, exactly (names).
        return or_(*(archive.c.payload.contains(f'"{key}":{canonical(v)}', autoescape=True) for v in values))

    lists = ("ExposureListProduced", "ExposureListAmended")
    listed = [p for (text_,) in await conn.execute(select(archive.c.payload).where(and_(
        archive.c.type.in_(lists), naming("transfer_id", transfers))))
        if names(p := orjson.loads(text_), "transfer_id", set(transfers))]
    samples = sorted({str(p.get("sample_id")) for p in listed})
    notices = (*lists, "ExposureListAcknowledged")
    if samples:
        cond.append(and_(archive.c.type.in_(notices), naming("sample_id", samples)))
    rows = await conn.execute(select(archive).where(or_(*cond)).order_by(archive.c.seq))
    by_transfer, by_trip, by_cycle = set(transfers), set(trip_ids), set(cycle_ids)

    def linked(r: Any) -> bool:
        return (r.transfer_key in by_transfer or r.trip_id in by_trip or r.cycle_id in by_cycle
                or (r.type in notices and orjson.loads(r.payload).get("sample_id") in samples))

    return [r for r in rows if linked(r)], frozenset(transfers[1:])


def names(value: Any, key: str, wanted: set[str]) -> bool:
    """Whether a payload says `key` is one of `wanted`, at any depth."""
    if isinstance(value, dict):
        return any((k == key and v in wanted) or names(v, key, wanted) for k, v in value.items())
    if isinstance(value, list):
        return any(names(v, key, wanted) for v in value)
    return False


async def feed(conn: AsyncConnection, after: int, limit: int) -> list[Any]:
    return list(await conn.execute(
        select(archive).where(archive.c.seq > after).order_by(archive.c.seq).limit(limit)))


# A page of disclosures ends at an entry's (recorded_at, event_id).
DISCLOSURES = Keyset(
    re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})",
               re.ASCII),
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII))


async def disclosures(conn: AsyncConnection, actor: str | None, limit: int, offset: int,
                      after: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """Unmasked reads recorded by every service (archived here) and by this one (its own
    store), newest first; after `after` (a cursor's entry), else from `offset`."""
    kind = PatientDataDisclosed.__name__
    # Merged and paged in the database: merged here, each source gave its first offset +
    # limit rows, all of them for a far offset (found by review: 700 MB for an empty page).
    sources = []
    for table, store in ((archive, archive.c.store), (events_table, literal_column("'projection'"))):
        query = select(table.c.recorded_at, table.c.actor, table.c.role, store.label("store"),
                       table.c.event_id, table.c.payload).where(table.c.type == kind)
        sources.append(query.where(table.c.actor == actor) if actor is not None else query)
    merged = union_all(*sources).subquery()
    query = select(merged).order_by(merged.c.recorded_at.desc(), merged.c.event_id).limit(limit)
    if after is not None:
        at, event_id = after
        query = query.where(or_(merged.c.recorded_at < at,
                                and_(merged.c.recorded_at == at, merged.c.event_id > event_id)))
    rows = await conn.execute(query.offset(offset))
    return [{"at": row.recorded_at, "actor": row.actor, "role": row.role, "store": row.store,
             "event_id": str(row.event_id), **orjson.loads(row.payload)} for row in rows]


async def stores_seen(conn: AsyncConnection) -> list[str]:
    return sorted(r[0] for r in await conn.execute(select(archive.c.store).distinct()))


async def verify_copy(
    conn: AsyncConnection, store: str, page: int = 2000
) -> tuple[int, str | None, ChainBreak | None]:
    """How many of a store's events the copy holds in an unbroken chain from the first,
    the hash of the last of them, and the first broken link (an edited row, or a position
    missing from the copy). The hash covers the envelope; the archive's own columns are
    checked against it as well: the links the timelines select by (read off the payload
    again), and `seq`, the order the feed and the rebuild follow, which must keep each
    stream's order (Kafka keeps nothing else, so that is all it can be held to)."""
    prev, after = GENESIS_HASH, 0
    last_seq: dict[str, int] = {}
    while True:
        rows = list(await conn.execute(
            select(archive).where((archive.c.store == store) & (archive.c.position > after))
            .order_by(archive.c.position).limit(page)))
        if not rows:
            return after, (prev if after else None), None
        if rows[0].position != after + 1:
            return after, (prev if after else None), ChainBreak(
                store=store, position=after + 1, event_id="", reason="missing from the projection's copy")
        # A row that cannot be read (its payload edited into what is not a JSON object, a
        # field the envelope refuses) is a break at its position: the rows before it checked.
        batch, unreadable = readable_rows(store, rows, envelope_of_row)
        # Every check, the earlier break named: an edit to a row's links before a broken
        # hash further on is the first broken link.
        found = [b for b in (verify_chain(batch, prev), _unlinked(store, rows[:len(batch)], batch, last_seq),
                             unreadable) if b]
        broken = min(found, key=lambda b: b.position) if found else None
        if broken is not None:
            # The links before the broken one hold: counted, and their last hash is the
            # one the store is compared at.
            good = [e for e in batch if e.position < broken.position]
            return (good[-1].position, good[-1].hash, broken) if good else (
                after, (prev if after else None), broken)
        prev, after = batch[-1].hash, batch[-1].position


def _unlinked(store: str, rows: list[Any], batch: list[Envelope],
              last_seq: dict[str, int]) -> ChainBreak | None:
    """The first row whose link columns are not what its payload says, or whose seq puts
    it before an earlier event of its stream."""
    for row, env in zip(rows, batch, strict=True):
        stored = {k: getattr(row, k) for k in ("transfer_key", "trip_id", "cycle_id", "vehicle_id")}
        if stored != links(env) and _text(stored) != _text(_links_before(env)):
            return ChainBreak(store=store, position=env.position, event_id=str(env.event_id),
                              reason="its links (transfer, trip, cycle, vehicle) were edited in the copy")
        if row.seq <= last_seq.get(env.stream_id, 0):
            return ChainBreak(store=store, position=env.position, event_id=str(env.event_id),
                              reason="its seq puts it before an earlier event of its stream in the copy "
                                     "(edited, or applied out of its stream's order)")
        last_seq[env.stream_id] = row.seq
    return None


def _links_before(env: Envelope) -> dict[str, Any]:
    """The links as archived before 2026-11-23 (tables.links since keeps only ids): rows
    archived then are not edits."""
    p = env.payload
    return {"transfer_key": str(p["transfer_id"]) if p.get("transfer_id") else env.correlation_id,
            "trip_id": p.get("trip_id"), "cycle_id": p.get("cycle_id"), "vehicle_id": p.get("vehicle_id")}


def _text(row: dict[str, Any]) -> dict[str, str | None]:
    return {k: None if v is None else str(v) for k, v in row.items()}


async def missing_applied(conn: AsyncConnection) -> tuple[int, str | None]:
    """How many events the projection's subscriptions applied (their tracking rows, kept
    in the transaction that archived each), and the first of them its copy no longer
    holds: a deletion the chain cannot show when it took the last events of a store."""
    applied = int(await conn.scalar(select(func.count()).select_from(tracking_table)) or 0)
    gone = await conn.scalar(
        select(tracking_table.c.event_id)
        .where(~select(archive.c.seq).where(archive.c.event_id == tracking_table.c.event_id).exists())
        .order_by(tracking_table.c.event_id).limit(1))
    return applied, gone


async def seq_gap(conn: AsyncConnection) -> tuple[int, int | None]:
    """How many events the copy holds, and the first seq missing below its newest: seq is
    given under the archive lock as the newest + 1, so 1..newest has no hole unless a row
    was deleted (its store's chain may not show it: the last events of a store look like
    events not received yet)."""
    count, newest = (await conn.execute(select(func.count(), func.max(archive.c.seq)))).one()
    if not newest or count == newest:
        return int(count or 0), None
    if not await conn.scalar(select(archive.c.seq).where(archive.c.seq == 1)):
        return int(count), 1
    after = archive.alias("after")
    hole = await conn.scalar(
        select(func.min(archive.c.seq + 1))
        .where(archive.c.seq < newest, ~select(after.c.seq).where(after.c.seq == archive.c.seq + 1).exists()))
    return int(count), None if hole is None else int(hole)


async def read_up_to(conn: AsyncConnection, consumer: str) -> dict[str, int]:
    """Embedded: how far in each store the consumer's subscription read (its checkpoint,
    committed with each batch's effects). Distributed, the broker keeps the offsets: none."""
    prefix = f"{consumer}<-"
    rows = await conn.execute(select(checkpoints_table.c.name, checkpoints_table.c.position)
                              .where(checkpoints_table.c.name.startswith(prefix)))
    return {r.name[len(prefix):]: int(r.position) for r in rows}


async def copy_hashes(conn: AsyncConnection, store: str, positions: list[int]) -> dict[int, str]:
    return {p: link[0] for p, link in (await copy_links(conn, store, positions)).items()}


async def copy_links(conn: AsyncConnection, store: str, positions: list[int]) -> dict[int, tuple[str, str]]:
    """(hash, event id) of the copy's events at these positions of a store."""
    rows = await conn.execute(select(archive.c.position, archive.c.hash, archive.c.event_id).where(
        (archive.c.store == store) & (archive.c.position.in_(positions))))
    return {r.position: (r.hash, r.event_id) for r in rows}


def envelope_view(env: Envelope) -> dict[str, Any]:
    return env.model_dump(mode="json")
