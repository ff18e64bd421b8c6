"""The event store: one implementation over SQLAlchemy Core, for PostgreSQL and SQLite.

Every append of a store runs under one store-wide lock that is held until commit
(PostgreSQL: a transaction-scoped advisory lock; SQLite: BEGIN IMMEDIATE). Positions
are assigned under that lock, so transactions commit in position order and a reader
that sees position N has already been able to see every position below N. That is
what keeps readers from skipping an event whose transaction committed late (the gap
bug of sequence-numbered event tables), and it is what lets each event carry the hash
of the one before it. The `eventsourcing` library's PostgreSQL recorder makes the same
trade (a table lock on insert). On PostgreSQL, appends that arrive while the lock is held
are committed together by the next holder (group commit, see EventStore._queue), each
still all or nothing, so the lock costs once per group rather than once per append.

The same transaction also writes the aggregate state rows (the service's own lists),
the consumer's tracking row and the Idempotency-Key record: an effect and the proof
that it happened commit together or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import uuid4

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from libs.events.contracts import Event
from libs.events.envelope import GENESIS_HASH, ChainBreak, Envelope, event_hash, iso, utcnow
from libs.events.envelope import verify_chain as verify_run

metadata = MetaData()

events_table = Table(
    "events",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("stream_id", String(200), nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("type", String(100), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("occurred_at", String(40), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("role", String(50), nullable=False),
    Column("correlation_id", String(200), nullable=False),
    Column("causation_id", String(200)),
    # The payload is kept as the exact canonical text that was hashed.
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("stream_id", "stream_version", name="uq_stream_version"),
)

aggregates_table = Table(
    "aggregates",
    metadata,
    Column("stream_id", String(200), primary_key=True),
    Column("kind", String(50), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(50)),
    Column("ref", String(200)),
    Column("state", Text, nullable=False),
    Column("updated_position", BigInteger, nullable=False),
    Index("ix_aggregates_kind_status", "kind", "status"),
    Index("ix_aggregates_kind_ref", "kind", "ref"),
)

tracking_table = Table(
    "tracking",
    metadata,
    Column("consumer", String(100), primary_key=True),
    Column("event_id", String(36), primary_key=True),
)

checkpoints_table = Table(
    "checkpoints",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

leases_table = Table(
    "leases",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("expires_at", BigInteger, nullable=False),  # epoch milliseconds
)

idempotency_table = Table(
    "idempotency",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("body", Text, nullable=False),
)


@dataclass(frozen=True)
class StateChange:
    stream_id: str
    version: int
    status: str | None
    ref: str | None
    state: str
    position: int


@dataclass
class StateIndex:
    """One aggregate kind's current states, parsed once per version, with the store position
    they are complete up to."""

    synced: int = 0
    entries: dict[str, tuple[StateChange, Any]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ConcurrencyError(Exception):
    """Somebody else appended to the stream since it was read."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id}: expected version {expected}, found {actual}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class AlreadyApplied(Exception):
    """The consumer's tracking row exists: this delivery was applied before."""


class IdempotencyKeyTaken(Exception):
    """A concurrent request with the same Idempotency-Key committed first."""


@dataclass(frozen=True)
class NewEvent:
    event: Event
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class StreamAppend:
    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]


@dataclass(frozen=True)
class StateRow:
    stream_id: str
    kind: str
    version: int
    status: str | None
    ref: str | None
    state: str


@dataclass(frozen=True)
class Meta:
    actor: str
    role: str
    correlation_id: str
    causation_id: str | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str
    request_hash: str
    status_code: int
    body: str


Write = Callable[[AsyncConnection], Awaitable[None]]


@dataclass
class Commit:
    meta: Meta
    appends: list[StreamAppend] = field(default_factory=list)
    states: list[StateRow] = field(default_factory=list)
    tracking: tuple[str, str] | None = None  # (consumer, event_id)
    checkpoint: tuple[str, int] | None = None  # (name, position)
    idempotency: IdempotencyRecord | None = None
    writes: list[Write] = field(default_factory=list)


@dataclass
class _Head:
    """The store's head inside a transaction that holds the store lock."""

    position: int
    hash: str
    versions: dict[str, int]  # of the streams the transaction appends to


class _RetryAlone(Exception):
    """A group commit failed other than by a refusal: its commits are retried one by one."""


def _row_to_envelope(store: str, row: Any) -> Envelope:
    return Envelope(
        event_id=row.event_id,
        type=row.type,
        schema_version=row.schema_version,
        store=store,
        stream_id=row.stream_id,
        stream_version=row.stream_version,
        position=row.position,
        occurred_at=row.occurred_at,
        recorded_at=row.recorded_at,
        actor=row.actor,
        role=row.role,
        correlation_id=row.correlation_id,
        causation_id=row.causation_id,
        payload=json.loads(row.payload),
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class EventStore:
    """One service's store: its events (the outbox too), state rows and bookkeeping."""

    def __init__(self, name: str, engine: AsyncEngine) -> None:
        self.name = name
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite: one writer at a time, so writers queue here rather than on the file lock.
        self._append_lock = asyncio.Lock()
        # PostgreSQL: appends queue here for the next group commit (see _queue).
        self._queued: list[tuple[Commit, asyncio.Future[list[Envelope]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._appended = asyncio.Condition()
        self._lock_key = zlib.crc32(f"closedloop-store-{name}".encode())
        # The service's lists, kept in memory per aggregate kind and refreshed with what
        # changed since (see UnitOfWork.find).
        self.indexes: dict[str, StateIndex] = {}

    @classmethod
    def from_url(cls, name: str, url: str, **engine_kw: Any) -> EventStore:
        if url.startswith("sqlite"):
            engine = create_async_engine(url, connect_args={"timeout": 30}, **engine_kw)
            _sqlite_transactions(engine)
        else:
            engine_kw.setdefault("pool_size", 20)
            engine_kw.setdefault("max_overflow", 20)
            engine = create_async_engine(url, **engine_kw)
        return cls(name, engine)

    async def create_schema(self, extra: MetaData | None = None) -> None:
        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Replicas of a service start together on one database: CREATE TABLE IF NOT
                # EXISTS races in PostgreSQL's catalog, so they take turns.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                   {"k": zlib.crc32(f"closedloop-schema-{self.name}".encode())})
            await conn.run_sync(metadata.create_all)
            if extra is not None:
                await conn.run_sync(extra.create_all)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- writing -----------------------------------------------------------------

    async def commit(self, commit: Commit) -> list[Envelope]:
        """Append, update states and bookkeeping in one transaction. All or nothing."""
        if commit.appends and not self.is_sqlite:
            written = await self._queue(commit)
        elif self.is_sqlite:
            async with self._append_lock:  # SQLite has one writer at a time
                written = await self._commit_alone(commit)
        else:
            written = await self._commit_alone(commit)
        if written:
            async with self._appended:
                self._appended.notify_all()
        return written

    async def append(
        self, stream_id: str, expected_version: int, events: Sequence[Event], meta: Meta
    ) -> list[Envelope]:
        appends = [StreamAppend(stream_id, expected_version, [NewEvent(e) for e in events])]
        return await self.commit(Commit(meta=meta, appends=appends))

    async def _queue(self, commit: Commit) -> list[Envelope]:
        """Group commit: appends serialize on the store lock anyway, so those that arrive while
        a transaction holds it wait here, and the next transaction takes all of them; the lock,
        the round trips and the WAL flush are paid once per group, not once per append. Once
        taken into a group, a commit goes ahead even if its caller is cancelled."""
        done: asyncio.Future[list[Envelope]] = asyncio.get_running_loop().create_future()
        self._queued.append((commit, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        while self._queued:
            group = [(c, f) for c, f in self._queued if not f.done()]
            self._queued = []
            try:
                results = await self._commit_group([c for c, _ in group]) if group else []
            except asyncio.CancelledError:
                for _, f in group:
                    f.cancel()
                raise
            except Exception as exc:  # the COMMIT itself failed: every commit of the group did
                results = [exc] * len(group)
            for (_, f), result in zip(group, results, strict=True):
                if f.done():
                    continue
                if isinstance(result, Exception):
                    f.set_exception(result)
                else:
                    f.set_result(result)

    async def _commit_group(self, commits: list[Commit]) -> list[list[Envelope] | Exception]:
        if len(commits) > 1:
            with contextlib.suppress(_RetryAlone):
                return await self._transaction(commits)
        results: list[list[Envelope] | Exception] = []
        for commit in commits:
            try:
                results.append(await self._commit_alone(commit))
            except Exception as exc:
                results.append(exc)
        return results

    async def _commit_alone(self, commit: Commit) -> list[Envelope]:
        result = (await self._transaction([commit]))[0]
        if isinstance(result, Exception):  # alone, a refusal is raised, never returned
            raise result
        return result

    async def _transaction(self, commits: list[Commit]) -> list[list[Envelope] | Exception]:
        """The commits in one transaction, each all or nothing. Alone, a commit's failure is
        raised. In a group, a refusal (stale version, applied before, key taken) is that
        commit's result and the others go on; any other failure rolls the whole group back
        and raises _RetryAlone, nothing of it having been committed."""
        grouped = len(commits) > 1
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = await conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
            async with conn.begin():
                try:
                    head = await self._lock_head(conn, commits)
                    rows: list[dict[str, Any]] = []
                    results: list[list[Envelope] | Exception] = []
                    for commit in commits:
                        if not grouped:
                            results.append(await self._apply(conn, commit, head, rows))
                            continue
                        try:
                            # A stale version is refused before anything is written; a
                            # commit that may be refused after writing gets a savepoint.
                            if commit.tracking or commit.idempotency or commit.writes:
                                async with conn.begin_nested():
                                    results.append(await self._apply(conn, commit, head, rows))
                            else:
                                results.append(await self._apply(conn, commit, head, rows))
                        except (ConcurrencyError, AlreadyApplied, IdempotencyKeyTaken) as refused:
                            results.append(refused)
                    if rows:
                        try:
                            await conn.execute(insert(events_table), rows)
                        except IntegrityError as exc:  # the lock makes this unreachable
                            raise ConcurrencyError(rows[0]["stream_id"], -1, -1) from exc
                except Exception as exc:
                    if grouped:
                        raise _RetryAlone() from exc
                    raise
            return results

    async def _lock_head(self, conn: AsyncConnection, commits: list[Commit]) -> _Head | None:
        """Takes the store lock; then the last position and hash, and the versions of the
        streams appended to, are stable until this transaction ends."""
        streams = sorted({a.stream_id for c in commits for a in c.appends})
        if not streams:
            return None
        if not self.is_sqlite:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": self._lock_key})
        last = (
            await conn.execute(
                select(events_table.c.position, events_table.c.hash)
                .order_by(events_table.c.position.desc())
                .limit(1)
            )
        ).first()
        position, prev_hash = (last.position, last.hash) if last else (0, GENESIS_HASH)
        return _Head(position, prev_hash, await self._stream_versions(conn, streams))

    async def _apply(
        self, conn: AsyncConnection, commit: Commit, head: _Head | None, rows: list[dict[str, Any]]
    ) -> list[Envelope]:
        """One commit's writes; its events join `rows` and move `head` only once all of its
        writes succeeded."""
        if commit.tracking is not None:
            consumer, event_id = commit.tracking
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(tracking_table).values(consumer=consumer, event_id=event_id)
                    )
            except IntegrityError as exc:
                raise AlreadyApplied(f"{consumer} applied {event_id} before") from exc
        written, new_rows = self._events(commit, head) if head is not None else ([], [])
        last_position = written[-1].position if written else None
        for st in commit.states:
            await self._upsert_state(conn, st, last_position)
        if commit.checkpoint is not None:
            await self._set_checkpoint(conn, *commit.checkpoint)
        for write in commit.writes:
            await write(conn)
        if commit.idempotency is not None:
            rec = commit.idempotency
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(idempotency_table).values(
                            key=rec.key, request_hash=rec.request_hash,
                            status_code=rec.status_code, body=rec.body,
                        )
                    )
            except IntegrityError as exc:
                raise IdempotencyKeyTaken(rec.key) from exc
        if written and head is not None:
            rows.extend(new_rows)
            head.position, head.hash = written[-1].position, written[-1].hash
            for app in commit.appends:
                head.versions[app.stream_id] = app.expected_version + len(app.events)
        return written

    def _events(self, commit: Commit, head: _Head) -> tuple[list[Envelope], list[dict[str, Any]]]:
        """The commit's events, chained on from the head, and their rows."""
        for app in commit.appends:
            current = head.versions.get(app.stream_id, 0)
            if current != app.expected_version:
                raise ConcurrencyError(app.stream_id, app.expected_version, current)
        position, prev_hash = head.position, head.hash
        recorded_at = iso(utcnow())
        rows: list[dict[str, Any]] = []
        written: list[Envelope] = []
        for app in commit.appends:
            for offset, new in enumerate(app.events, start=1):
                position += 1
                ev = new.event
                fields = {
                    "event_id": str(uuid4()),
                    "type": ev.event_type,
                    "schema_version": ev.schema_version,
                    "store": self.name,
                    "stream_id": app.stream_id,
                    "stream_version": app.expected_version + offset,
                    "position": position,
                    "occurred_at": iso(new.occurred_at) if new.occurred_at else recorded_at,
                    "recorded_at": recorded_at,
                    "actor": commit.meta.actor,
                    "role": commit.meta.role,
                    "correlation_id": commit.meta.correlation_id,
                    "causation_id": commit.meta.causation_id,
                    "payload": ev.model_dump(mode="json"),
                    "prev_hash": prev_hash,
                }
                digest = event_hash(fields)
                env = Envelope(**fields, hash=digest)
                written.append(env)
                row = env.model_dump(mode="json", exclude={"store"})
                row["payload"] = json.dumps(fields["payload"], sort_keys=True, ensure_ascii=False)
                rows.append(row)
                prev_hash = digest
        return written, rows

    async def _stream_versions(self, conn: AsyncConnection, stream_ids: list[str]) -> dict[str, int]:
        rows = await conn.execute(
            select(events_table.c.stream_id, func.max(events_table.c.stream_version))
            .where(events_table.c.stream_id.in_(stream_ids))
            .group_by(events_table.c.stream_id)
        )
        return {r[0]: int(r[1]) for r in rows}

    async def _upsert_state(self, conn: AsyncConnection, st: StateRow, position: int | None) -> None:
        values = {
            "kind": st.kind, "version": st.version, "status": st.status, "ref": st.ref,
            "state": st.state, "updated_position": position or 0,
        }
        # One statement either way: both dialects speak INSERT ... ON CONFLICT DO UPDATE.
        upsert = (sqlite_insert if self.is_sqlite else pg_insert)(aggregates_table).values(
            stream_id=st.stream_id, **values)
        await conn.execute(upsert.on_conflict_do_update(index_elements=["stream_id"], set_=values))

    async def _set_checkpoint(self, conn: AsyncConnection, name: str, position: int) -> None:
        updated = await conn.execute(
            checkpoints_table.update()
            .where(checkpoints_table.c.name == name)
            .values(position=position)
        )
        if updated.rowcount == 0:
            await conn.execute(insert(checkpoints_table).values(name=name, position=position))

    # -- reading -----------------------------------------------------------------

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[Envelope]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(events_table)
                .where(
                    and_(
                        events_table.c.stream_id == stream_id,
                        events_table.c.stream_version > after_version,
                    )
                )
                .order_by(events_table.c.stream_version)
            )
            return [_row_to_envelope(self.name, r) for r in rows]

    async def read_all(self, after_position: int = 0, limit: int = 500) -> list[Envelope]:
        """Events in store order after a position. Never skips: see the module docstring."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(events_table)
                .where(events_table.c.position > after_position)
                .order_by(events_table.c.position)
                .limit(limit)
            )
            return [_row_to_envelope(self.name, r) for r in rows]

    async def head(self) -> int:
        async with self.engine.connect() as conn:
            return int(await conn.scalar(select(func.max(events_table.c.position))) or 0)

    async def wait_for_append(self, timeout: float) -> None:
        """Returns when this process appends to the store, or after the timeout (other
        processes' appends are found by polling)."""
        async with self._appended:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._appended.wait(), timeout)

    async def verify(self, page: int = 1000) -> ChainBreak | None:
        prev, after = GENESIS_HASH, 0
        while True:
            batch = await self.read_all(after, page)
            if not batch:
                return None
            if batch[0].position != after + 1:
                ev = batch[0]
                return ChainBreak(store=self.name, position=ev.position,
                                  event_id=str(ev.event_id), reason=f"position {after + 1} is missing")
            broken = verify_run(batch, prev)
            if broken is not None:
                return broken
            prev, after = batch[-1].hash, batch[-1].position

    async def load_state(self, stream_id: str) -> tuple[int, str] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(aggregates_table.c.version, aggregates_table.c.state).where(
                        aggregates_table.c.stream_id == stream_id
                    )
                )
            ).first()
            return (row.version, row.state) if row else None

    async def states_changed_since(self, kind: str, position: int) -> list[StateChange]:
        """The aggregates of a kind whose state changed after a store position. Complete up
        to the highest position returned, for the reason in the module docstring: states
        commit with their events, in position order."""
        q = (select(aggregates_table.c.stream_id, aggregates_table.c.version,
                    aggregates_table.c.status, aggregates_table.c.ref, aggregates_table.c.state,
                    aggregates_table.c.updated_position)
             .where((aggregates_table.c.kind == kind)
                    & (aggregates_table.c.updated_position > position))
             .order_by(aggregates_table.c.updated_position))
        async with self.engine.connect() as conn:
            return [StateChange(r.stream_id, r.version, r.status, r.ref, r.state, r.updated_position)
                    for r in await conn.execute(q)]

    async def checkpoint(self, name: str) -> int:
        async with self.engine.connect() as conn:
            v = await conn.scalar(
                select(checkpoints_table.c.position).where(checkpoints_table.c.name == name)
            )
            return int(v or 0)

    async def is_applied(self, consumer: str, event_id: str) -> bool:
        async with self.engine.connect() as conn:
            hit = await conn.scalar(
                select(func.count()).select_from(tracking_table).where(
                    and_(tracking_table.c.consumer == consumer, tracking_table.c.event_id == event_id)
                )
            )
            return bool(hit)

    async def idempotent_response(self, key: str) -> IdempotencyRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(idempotency_table).where(idempotency_table.c.key == key))
            ).first()
            if row is None:
                return None
            return IdempotencyRecord(row.key, row.request_hash, row.status_code, row.body)

    # -- the relay's lease ---------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl_ms: int, now_ms: int) -> bool:
        """Take or renew the named lease; True when this holder has it."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(select(leases_table).where(leases_table.c.name == name))
            ).first()
            if row is None:
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            insert(leases_table).values(
                                name=name, holder=holder, expires_at=now_ms + ttl_ms
                            )
                        )
                    return True
                except IntegrityError:
                    return False
            res = await conn.execute(
                leases_table.update()
                .where(
                    and_(
                        leases_table.c.name == name,
                        (leases_table.c.holder == holder) | (leases_table.c.expires_at < now_ms),
                    )
                )
                .values(holder=holder, expires_at=now_ms + ttl_ms)
            )
            return res.rowcount == 1

    async def release_lease(self, name: str, holder: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                leases_table.delete().where(
                    and_(leases_table.c.name == name, leases_table.c.holder == holder)
                )
            )

    async def advance_checkpoint_if_holder(
        self, name: str, holder: str, position: int, now_ms: int
    ) -> bool:
        """Fenced checkpoint: only the lease holder whose lease is live may move it."""
        async with self.engine.begin() as conn:
            held = await conn.scalar(
                select(func.count()).select_from(leases_table).where(
                    and_(
                        leases_table.c.name == name,
                        leases_table.c.holder == holder,
                        leases_table.c.expires_at >= now_ms,
                    )
                )
            )
            if not held:
                return False
            await self._set_checkpoint(conn, name, position)
            return True


def _sqlite_transactions(engine: AsyncEngine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, decide when transactions begin, so that
    writers can take the write lock up front (BEGIN IMMEDIATE) and WAL lets readers on."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))
