"""The projection's tables and the writes to them.

- `audit_archive`: every event received, whole, in the order this projection applied
  them (`seq`). It is the projection's own copy of history (it never reads another
  service's store), the source of timelines, of the live feed, of /audit/verify, and of
  every rebuild. `seq` is assigned under a lock held to commit (as the event store does
  for positions), so a reader tailing by seq never skips a row that committed late.
- Generations of fact tables (`g<N>_transfers`, ...): the read models. `audit_meta`
  names the active one. A rebuild fills the next generation beside the active one, then
  switches in one transaction (tables.switch_generation), so readers never wait.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateTable

from libs.events.envelope import Envelope, iso, utcnow
from services.projection.facts import JSON_COLUMNS, SPECS, Buffer, Ev, dump, upcast

metadata = MetaData()
LINK_LENGTH = 200  # the archive's links to a transfer, trip, cycle or vehicle

archive = Table(
    "audit_archive",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("store", String(50), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("stream_id", String(200), nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("type", String(100), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("occurred_at", String(40), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("archived_at", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("role", String(50), nullable=False),
    Column("correlation_id", String(200), nullable=False),
    Column("causation_id", String(200)),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # Links for timelines, read off the payload (else the correlation id).
    Column("transfer_key", String(LINK_LENGTH), nullable=False),
    Column("trip_id", String(LINK_LENGTH)),
    Column("cycle_id", String(LINK_LENGTH)),
    Column("vehicle_id", String(LINK_LENGTH)),
    Index("ix_audit_archive_store_position", "store", "position", unique=True),
    Index("ix_audit_archive_transfer", "transfer_key"),
    Index("ix_audit_archive_trip", "trip_id"),
    Index("ix_audit_archive_cycle", "cycle_id"),
    Index("ix_audit_archive_type", "type"),
)

meta_table = Table(
    "audit_meta",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)

ACTIVE = "active_generation"
ARCHIVE_LOCK = zlib.crc32(b"closedloop-projection-archive")
_TYPES: dict[str, Any] = {
    "day": String(10), "priority": Integer, "position": BigInteger,
    "stream_version": Integer, "occupied": Integer, "ratio": Float, "overflowing": Boolean,
    "dedicated_pool": Boolean, "life_support": Boolean,
}
# How a number comes back from its column (a payload's 1 is a ratio's 1.0): what a fold's
# rows in memory are coerced with to equal the rows read back (queries.folded_scope).
NUMERIC_COLUMNS: dict[str, Callable[[Any], Any]] = {
    name: float if kind is Float else int
    for name, kind in _TYPES.items() if kind in (Integer, BigInteger, Float)}
# Indexes of the fact tables: what the views filter on, and what the findings model looks
# up to know which scopes an event touches (violations.touched).
_INDEXED: dict[str, tuple[tuple[str, ...], ...]] = {
    "transfers": (("day",), ("vehicle_id",), ("destination_id",), ("return_of",)),
    "decisions": (("transfer_id",), ("vehicle_id",), ("facility_id", "position"), ("position",)),
    "vehicle_log": (("vehicle_id",),),
    "facility_loads": (("facility_id", "position"),),
    "trips": (("transfer_id",), ("vehicle_id",)),
    "cycles": (("vehicle_id",), ("trip_id",)),
    "swabs": (("vehicle_id",), ("cycle_id",)),
    "others": (("type",), ("transfer_id",), ("vehicle_id",)),
}
# The findings, kept as a read model (violations.py): one row per finding, paged by
# (at_key, id); `scope` is what re-evaluating a vehicle or a transfer replaces.
_FINDING_PAGES = (("at_key", "id"), ("rule", "at_key", "id"), ("vehicle_id", "at_key", "id"),
                  ("transfer_id", "at_key", "id"), ("facility_id", "at_key", "id"), ("scope",))


@dataclass(frozen=True)
class Generation:
    number: int
    metadata: MetaData
    tables: dict[str, Table]

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]


@lru_cache(maxsize=16)
def generation(number: int) -> Generation:
    md = MetaData()
    tables: dict[str, Table] = {}

    def indexes(name: str, sets: tuple[tuple[str, ...], ...]) -> list[Index]:
        return [Index(f"ix_g{number}_{name}_{'_'.join(cols)}", *cols) for cols in sets]

    for name, spec in SPECS.items():
        # Text without a length (VARCHAR): what a payload says is kept whole, however long
        # (a length limit would fail the write, and the subscription with it, forever).
        cols: list[Any] = [Column(k, String(), primary_key=True) for k in spec.key]
        for c in spec.columns:
            if c in JSON_COLUMNS:
                cols.append(Column(c, Text))
            else:
                cols.append(Column(c, _TYPES.get(c, String())))
        tables[name] = Table(f"g{number}_{name}", md, *cols, *indexes(name, _INDEXED.get(name, ())))
    tables["findings"] = Table(
        f"g{number}_findings", md, Column("id", String(16), primary_key=True),
        Column("scope", String(), nullable=False), Column("rule", String(40), nullable=False),
        Column("check", String(80), nullable=False), Column("kind", String(20), nullable=False),
        Column("at_key", String(30), nullable=False), Column("transfer_id", String()),
        Column("vehicle_id", String()), Column("facility_id", String()),
        Column("body", Text, nullable=False), *indexes("findings", _FINDING_PAGES))
    # A check that failed on a scope's rows: reported beside the findings, never hiding them.
    tables["check_failures"] = Table(
        f"g{number}_check_failures", md, Column("scope", String(), primary_key=True),
        Column("check", String(80), primary_key=True), Column("rule", String(40), nullable=False),
        Column("error", Text, nullable=False))
    # Folds kept between events (the R4 queue fold: its position in dispatch's store and state).
    tables["folds"] = Table(f"g{number}_folds", md, Column("name", String(50), primary_key=True),
                            Column("value", Text, nullable=False))
    return Generation(number, md, tables)


# -- the generation switch -------------------------------------------------------------


async def lock_archive(conn: AsyncConnection) -> None:
    """Held to commit: serializes archive appends and the generation switch. SQLite
    transactions that write begin IMMEDIATE (the store does that), which is the same."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ARCHIVE_LOCK})


async def active_generation(conn: AsyncConnection) -> int | None:
    value = await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == ACTIVE))
    return int(value) if value is not None else None


async def set_meta(conn: AsyncConnection, name: str, value: str) -> None:
    updated = await conn.execute(meta_table.update().where(meta_table.c.name == name).values(value=value))
    if updated.rowcount == 0:
        await conn.execute(insert(meta_table).values(name=name, value=value))


async def create_generation(conn: AsyncConnection, number: int, indexes: bool = True) -> Generation:
    """The generation's tables; without their secondary indexes when `indexes` is false (a
    rebuild loads them in bulk first: building an index once is cheaper than keeping it up
    row by row), to be added by create_indexes."""
    gen = generation(number)
    await conn.run_sync(gen.metadata.drop_all)  # leftovers of an interrupted rebuild
    if indexes:
        await conn.run_sync(gen.metadata.create_all)
    else:
        for table in gen.metadata.sorted_tables:
            await conn.execute(CreateTable(table))
    await _compress_fast(conn, gen)
    return gen


async def _compress_fast(conn: AsyncConnection, gen: Generation) -> None:
    """LZ4 for the long text columns (the facts' JSON proofs) where PostgreSQL has it: a
    trip's or a transfer's row passes the 2 kB TOAST threshold, and PostgreSQL's default
    (pglz) compressing them was a third of a rebuild's keyed-row writes (1M events: 4.4 s
    with pglz, 2.9 s with lz4); reading them back is faster too."""
    if conn.dialect.name != "postgresql" or not await conn.scalar(text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")):
        return
    for table in gen.metadata.sorted_tables:
        long_text = [c.name for c in table.columns if isinstance(c.type, Text)]
        if long_text:
            await conn.execute(text(f"ALTER TABLE {table.name} " + ", ".join(
                f'ALTER COLUMN "{c}" SET COMPRESSION lz4' for c in long_text)))


async def create_indexes(conn: AsyncConnection, table: Table) -> None:
    """A table's indexes once it is filled in bulk, then its statistics: without them the
    planner takes the fresh tables for empty after the switch (loads by a batch's ids,
    `= ANY`, ran as nested loops over sequential scans: 96 s instead of 6 at 600k events)."""
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        await conn.run_sync(index.create)
    if conn.dialect.name == "postgresql":
        # Not of the JSON proofs, which no query filters on: sampling them reads their
        # TOAST (1M events: 1.7 s of the analyses, 0.5 s without them).
        columns = ", ".join(f'"{c.name}"' for c in table.columns if not isinstance(c.type, Text))
        await conn.execute(text(f"ANALYZE {table.name} ({columns})"))
    else:
        await conn.execute(text(f"ANALYZE {table.name}"))


async def largest_first(conn: AsyncConnection, tables: list[Table]) -> list[Table]:
    """The tables by their size on disk, largest first (PostgreSQL; as given on SQLite)."""
    if conn.dialect.name != "postgresql":
        return tables
    rows = await conn.execute(text("SELECT name FROM unnest(CAST(:names AS text[])) AS name "
                                   "ORDER BY pg_relation_size(to_regclass(name)) DESC NULLS LAST"),
                              {"names": [t.name for t in tables]})
    rank = {name: i for i, (name,) in enumerate(rows)}
    return sorted(tables, key=lambda t: rank.get(t.name, len(rank)))


# The modules whose code decides what the read models hold: the fold, the checks and what
# they load, the findings' upkeep; and the event catalogue (its types switch checks on,
# its upcasters shape what old events fold into). A change to any of them changes the digest.
_MODEL_CODE = (*(f"services.projection.{name}" for name in (
    "facts", "findings", "violations", "queries", "data", "tables")), "libs.events.contracts")
_CATALOGUE = "libs.events.catalog"


def model_digest() -> str:
    """What a generation is: its tables (names, columns, indexes) and the code that fills
    them. A generation built by other code differs, and is rebuilt (rebuild.upgrade) at
    start: a new table's columns, a type newly folded, or a new check (whose findings on the
    history before it would otherwise never be evaluated) apply to every event, not only to
    those that arrive after the upgrade. Any edit of that code counts, a comment's too: a
    rebuild too many costs seconds, one too few leaves the history unchecked."""
    import importlib
    import pkgutil

    gen = generation(0)
    shape = sorted((t.name, [(c.name, str(c.type)) for c in t.columns],
                    sorted(sorted(c.name for c in i.columns) for i in t.indexes))
                   for t in gen.tables.values())
    digest = hashlib.sha256(repr(shape).encode())
    catalogue = importlib.import_module(_CATALOGUE)
    modules = [*_MODEL_CODE, _CATALOGUE, *sorted(
        f"{_CATALOGUE}.{m.name}" for m in pkgutil.iter_modules(catalogue.__path__))]
    for name in modules:
        source = getattr(importlib.import_module(name), "__file__", None)
        # Where the sources are not shipped the module's name stands in (its code then
        # changes nothing here: a deployment without sources rebuilds with `make rebuild`).
        digest.update(Path(source).read_bytes() if source and Path(source).is_file() else name.encode())
    return digest.hexdigest()[:16]


# The meta row holding the active generation's model_digest (its name predates the digest
# covering code as well as tables; kept, so that databases stamped before are recognised).
MODEL = "generation_schema"


async def ensure_active(conn: AsyncConnection) -> Generation:
    """The active generation, created as generation 1 on a fresh database."""
    number = await active_generation(conn)
    if number is None:
        gen = generation(1)
        await conn.run_sync(gen.metadata.create_all)
        await _compress_fast(conn, gen)
        await set_meta(conn, ACTIVE, "1")
        await set_meta(conn, MODEL, model_digest())
        return gen
    return generation(number)


async def active_model(conn: AsyncConnection) -> str | None:
    """The model digest of the active generation (None: older than the digest)."""
    return await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == MODEL))


async def generations_present(conn: AsyncConnection) -> list[int]:
    def names(sync_conn: Any) -> list[str]:
        from sqlalchemy import inspect

        return list(inspect(sync_conn).get_table_names())

    found = set()
    for name in await conn.run_sync(names):
        if name.startswith("g") and name.endswith("_transfers") and name[1:-10].isdigit():
            found.add(int(name[1:-10]))
    return sorted(found)


async def drop_generation(conn: AsyncConnection, number: int) -> None:
    await conn.run_sync(generation(number).metadata.drop_all)


# -- writing facts ---------------------------------------------------------------------


def _insert(conn: AsyncConnection, table: Table) -> Any:
    return (postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table))


async def flush(conn: AsyncConnection, gen: Generation, buffer: Buffer, chunk: int = 2000) -> None:
    """Upsert the buffer's rows with the merge rule of facts.Buffer, in the database."""
    for name, rows in buffer.rows.items():
        if not rows:
            continue
        spec = SPECS[name]
        table = gen[name]
        stmt = _insert(conn, table)
        if spec.append_only:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(spec.key))
        else:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(spec.key),
                set_={c: (func.coalesce(stmt.excluded[c], table.c[c]) if c in spec.last
                          else func.coalesce(table.c[c], stmt.excluded[c]))
                      for c in spec.columns},
            )
        full = [
            {**dict(zip(spec.key, key, strict=True)), **{c: row.get(c) for c in spec.columns}}
            for key, row in rows.items()
        ]
        for i in range(0, len(full), chunk):
            await conn.execute(stmt, full[i:i + chunk])


async def bulk_insert(conn: AsyncConnection, gen: Generation, buffer: Buffer) -> None:
    """Plain inserts of rows known to be new (a rebuild's first write of a table): COPY on
    PostgreSQL, executemany on SQLite."""
    for name, rows in buffer.rows.items():
        if not rows:
            continue
        spec = SPECS[name]
        columns = [*spec.key, *spec.columns]
        if conn.dialect.name == "postgresql":
            await copy_records(conn, gen[name].name, columns, buffer.records(name))
        else:
            full = [{**dict(zip(spec.key, key, strict=True)), **{c: row.get(c) for c in spec.columns}}
                    for key, row in rows.items()]
            await conn.execute(insert(gen[name]), full)


async def copy_records(conn: AsyncConnection, table: str, columns: list[str],
                       records: list[tuple[Any, ...]]) -> None:
    """COPY through the asyncpg connection under SQLAlchemy's (PostgreSQL only)."""
    raw = await conn.get_raw_connection()
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        table, records=records, columns=columns)


# -- the archive ------------------------------------------------------------------------


def links(env: Envelope) -> dict[str, Any]:
    """What the timelines look events up by, read off the payload. What is not an id (not
    a string, or longer than the column) links nothing: the event is archived all the same."""
    p = env.payload
    return {"transfer_key": _link(p.get("transfer_id")) or env.correlation_id,
            "trip_id": _link(p.get("trip_id")), "cycle_id": _link(p.get("cycle_id")),
            "vehicle_id": _link(p.get("vehicle_id"))}


def _link(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= LINK_LENGTH else None


async def next_seq(conn: AsyncConnection) -> int:
    return int(await conn.scalar(select(func.max(archive.c.seq))) or 0) + 1


def archive_row(env: Envelope, seq: int) -> dict[str, Any]:
    row = env.model_dump(mode="json", exclude={"payload"})
    row["payload"] = dump(env.payload)
    row["event_id"] = str(env.event_id)
    return {**row, "seq": seq, "archived_at": iso(utcnow()), **links(env)}


def ev_of(env: Envelope, raw: str | None = None) -> Ev:
    payload = upcast(env.type, env.schema_version, env.payload)
    return Ev(str(env.event_id), env.type, env.store, env.stream_id, env.stream_version,
              env.position, env.occurred_at, env.recorded_at, env.actor, env.role, payload,
              env.schema_version, raw if payload is env.payload else None)


def envelope_of_row(row: Any) -> Envelope:
    return Envelope(
        event_id=row.event_id, type=row.type, schema_version=row.schema_version, store=row.store,
        stream_id=row.stream_id, stream_version=row.stream_version, position=row.position,
        occurred_at=row.occurred_at, recorded_at=row.recorded_at, actor=row.actor, role=row.role,
        correlation_id=row.correlation_id, causation_id=row.causation_id,
        payload=orjson.loads(row.payload), prev_hash=row.prev_hash, hash=row.hash,
    )


async def apply_live(conn: AsyncConnection, envs: list[Envelope]) -> Generation:
    """Delivered events, in their order: archived and folded into the active generation
    (in one merge, as a rebuild's page is), in the subscription's transaction with their
    tracking rows. Returns that generation."""
    await lock_archive(conn)
    gen = await ensure_active(conn)
    seq = await next_seq(conn)
    rows = [archive_row(env, seq + n) for n, env in enumerate(envs)]
    await conn.execute(insert(archive), rows)
    buffer = Buffer()
    for env, row in zip(envs, rows, strict=True):
        buffer.add_event(ev_of(env, row["payload"]))
    await flush(conn, gen, buffer)
    return gen
