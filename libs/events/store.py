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
import contextvars
import functools
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]
from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Select

from libs.events.contracts import Event
from libs.events.envelope import (
    GENESIS_HASH,
    ChainBreak,
    Envelope,
    canonical_json,
    event_hash,
    iso,
    utcnow,
)
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
    # What changed since a position (the in-memory lists' refresh) without a scan of the kind.
    Index("ix_aggregates_kind_position", "kind", "updated_position"),
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

# Messages a consumer's source passed over because they are no event of any store (garbage
# or forged at the broker): kept as received, once per place on the bus, so that nothing
# that reached a consumer is lost without a trace an auditor can read.
passed_over_table = Table(
    "passed_over",
    metadata,
    Column("consumer", String(100), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("offset", BigInteger, primary_key=True),
    Column("key", LargeBinary),
    Column("value", LargeBinary),
    Column("reason", Text, nullable=False),
    Column("received_at", String(40), nullable=False),
)


# Statements built once: building one costs about as much as running it.
_last_event = (select(events_table.c.position, events_table.c.hash)
               .order_by(events_table.c.position.desc()).limit(1).subquery())
HEAD_AND_VERSIONS = union_all(
    select(literal(1).label("is_head"), _last_event.c.position.label("n"),
           _last_event.c.hash.label("s")),
    select(literal(0), func.max(events_table.c.stream_version), events_table.c.stream_id)
    .where(events_table.c.stream_id.in_(bindparam("streams", expanding=True)))
    .group_by(events_table.c.stream_id),
)
INSERT_EVENTS = insert(events_table)
# On PostgreSQL a group commit's statements are asyncpg's own, uncompiled: a group is a
# few rows, and SQLAlchemy's compiling and parameter handling of them cost more Python
# time than the database took (16 writers: ~40 µs of each event's ~150).
_EVENT_COLUMNS = tuple(c.name for c in events_table.columns)
PG_INSERT_EVENTS = (f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) "
                    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_EVENT_COLUMNS) + 1))})")
PG_ADVISORY_LOCK = "SELECT pg_advisory_xact_lock($1)"
PG_HEAD_AND_VERSIONS = (
    "SELECT 1, position, hash FROM (SELECT position, hash FROM events ORDER BY position DESC LIMIT 1) AS h "
    "UNION ALL SELECT 0, max(stream_version), stream_id FROM events WHERE stream_id = ANY($1::text[]) "
    "GROUP BY stream_id")


@functools.cache
def changed_since_query(kinds: int) -> Select[Any]:
    """States changed after a position per kind, for `kinds` kinds (bound as k0, p0, ...)."""
    a = aggregates_table.c
    return (select(a.kind, a.stream_id, a.version, a.status, a.ref, a.state, a.updated_position)
            .where(or_(*[(a.kind == bindparam(f"k{i}")) & (a.updated_position > bindparam(f"p{i}"))
                         for i in range(kinds)]))
            .order_by(a.updated_position, a.stream_id))


def upsert_states_query(dialect_insert: Callable[[Table], Any]) -> Any:
    """One row per aggregate; both dialects speak INSERT ... ON CONFLICT DO UPDATE."""
    stmt = dialect_insert(aggregates_table)
    changed = ("kind", "version", "status", "ref", "state", "updated_position")
    return stmt.on_conflict_do_update(index_elements=["stream_id"],
                                      set_={c: stmt.excluded[c] for c in changed})


@dataclass(frozen=True)
class StateChange:
    kind: str
    stream_id: str
    version: int
    status: str | None
    ref: str | None
    state: str
    position: int


class IndexView(Protocol):
    """Something a service derives from one kind's states (free vehicles by place, say),
    told of every state as it changes, so a decision reads it instead of scanning the list.
    `state` parses the state, shared and read-only: a view asks only for those it keeps."""

    def put(self, change: StateChange, state: Callable[[], Any]) -> None: ...


@dataclass
class StateIndex:
    """One aggregate kind's current states, complete up to the store position `synced`, in
    update order (position, then stream id), with the stream ids filed per status and per
    ref, so a list touches only what it returns. A state is parsed when first asked for."""

    parse: Callable[[str], Any]
    synced: int = 0
    changes: dict[str, StateChange] = field(default_factory=dict)
    by_status: dict[str | None, dict[str, None]] = field(default_factory=dict)
    by_ref: dict[str, dict[str, None]] = field(default_factory=dict)
    parsed: dict[str, Any] = field(default_factory=dict)
    views: dict[Callable[[], IndexView], IndexView] = field(default_factory=dict)

    def put(self, change: StateChange) -> None:
        sid = change.stream_id
        held = self.changes.pop(sid, None)
        if held is not None:
            if held.position >= change.position:
                self.changes[sid] = held  # a read that started earlier, answering later
                return
            self.parsed.pop(sid, None)
            _unfile(self.by_status, held.status, sid)
            if held.ref is not None:
                _unfile(self.by_ref, held.ref, sid)
        # Re-inserted at the end: dicts keep insertion order, which is update order.
        self.changes[sid] = change
        self.by_status.setdefault(change.status, {})[sid] = None
        if change.ref is not None:
            self.by_ref.setdefault(change.ref, {})[sid] = None
        for view in self.views.values():
            view.put(change, functools.partial(self.state, sid))

    def view(self, make: Callable[[], IndexView]) -> IndexView:
        """The view `make` builds, filled from the states held and kept current from then on."""
        view = self.views.get(make)
        if view is None:
            view = self.views[make] = make()
            for sid, change in self.changes.items():
                view.put(change, functools.partial(self.state, sid))
        return view

    def state(self, stream_id: str) -> Any:
        """The parsed state, shared: callers only read it."""
        parsed = self.parsed.get(stream_id)
        if parsed is None:
            parsed = self.parsed[stream_id] = self.parse(self.changes[stream_id].state)
        return parsed

    def select(self, status: Sequence[str] | None = None, ref: str | None = None) -> list[str]:
        """Stream ids in update order."""
        if ref is not None:
            return [s for s in self.by_ref.get(ref, {})
                    if status is None or self.changes[s].status in status]
        if status is None:
            return list(self.changes)
        wanted = list(dict.fromkeys(status))
        if len(wanted) == 1:
            return list(self.by_status.get(wanted[0], {}))
        ids = [s for st in wanted for s in self.by_status.get(st, {})]
        ids.sort(key=lambda s: (self.changes[s].position, s))
        return ids


def _unfile(files: dict[Any, dict[str, None]], key: Any, stream_id: str) -> None:
    ids = files[key]
    del ids[stream_id]
    if not ids:
        del files[key]


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
class PassedOver:
    """A message that is no envelope, where it was on the bus and why it was refused."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


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
    # (consumer, event_id) of each delivery this commit applies: one for an event applied
    # alone, a whole batch's for a consumer that applies batches (bus.Batched).
    tracking: tuple[tuple[str, str], ...] = ()
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


def readable_rows(store: str, rows: Sequence[Any], parse: Callable[[Any], Envelope]
                  ) -> tuple[list[Envelope], ChainBreak | None]:
    """The envelopes of consecutive rows up to the first that cannot be read, and a break
    at that one (None when all can): an edited row whose payload is not JSON (the one text
    `parse` decodes) or whose fields the envelope refuses. A position missing just before
    it is the break instead, as verify_chain names it. `rows`: ordered by position, each
    with its `position` and `event_id` as stored."""
    envelopes: list[Envelope] = []
    for row in rows:
        try:
            envelopes.append(parse(row))
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError and JSON's are ValueErrors
            expected = envelopes[-1].position + 1 if envelopes else row.position
            reason = (f"position {expected} is missing" if row.position != expected
                      else f"unreadable: {unreadable_reason(exc)}")
            return envelopes, ChainBreak(store=store, position=row.position,
                                         event_id=str(row.event_id), reason=reason)
    return envelopes, None


def unreadable_reason(exc: Exception, limit: int = 200) -> str:
    """Why a stored row is not an envelope, in a line: the field and what it breaks."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        if errors:
            where = ".".join(str(part) for part in errors[0]["loc"]) or "row"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            return f"{where}: {errors[0]['msg']}{more}"[:limit]
    if isinstance(exc, json.JSONDecodeError):  # orjson's is one too
        return f"payload is not JSON ({exc.msg} at character {exc.pos})"[:limit]
    return f"{type(exc).__name__}: {exc}"[:limit]


log = logging.getLogger(__name__)
CHECKPOINT_EVERY_S = 0.5  # SQLite: how often, at most, the WAL is copied back into the database
CLOSE_WAIT_S = 30.0  # at close: how long commits still under way may take to end

class EventStore:
    """One service's store: its events (the outbox too), state rows and bookkeeping."""

    def __init__(self, name: str, engine: AsyncEngine) -> None:
        self.name = name
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # Reads are single statements: outside a transaction they cost one round trip
        # (asyncpg would otherwise send BEGIN and ROLLBACK around each).
        self._reader = engine.execution_options(
            **({"sqlite_begin": None} if self.is_sqlite else {"isolation_level": "AUTOCOMMIT"}))
        # SQLite: one writer at a time, so writers queue here rather than on the file lock.
        # PostgreSQL: each group commit takes it, so that a write turn can hold them back.
        self._append_lock = asyncio.Lock()
        # PostgreSQL: appends queue here for the next group commit (see _queue).
        self._queued: list[tuple[Commit, asyncio.Future[list[Envelope]]]] = []
        self._committing: set[asyncio.Task[list[Envelope]]] = set()  # see commit()
        self._flusher: asyncio.Task[None] | None = None
        self._appended = asyncio.Condition()
        self._lock_key = zlib.crc32(f"closedloop-store-{name}".encode())
        dialect_insert = sqlite_insert if self.is_sqlite else pg_insert
        self._upsert_states = upsert_states_query(dialect_insert)
        # Bookkeeping rows in one statement each: a row already there inserts nothing (no
        # savepoint to catch the violation), and a checkpoint is inserted or moved at once.
        self._insert_tracking = dialect_insert(tracking_table).on_conflict_do_nothing()
        self._insert_idempotency = dialect_insert(idempotency_table).on_conflict_do_nothing()
        self._insert_passed_over = dialect_insert(passed_over_table).on_conflict_do_nothing()
        checkpoint = dialect_insert(checkpoints_table)
        self._set_checkpoint_query = checkpoint.on_conflict_do_update(
            index_elements=["name"], set_={"position": checkpoint.excluded.position})
        # The service's lists, kept in memory per aggregate kind and refreshed with what
        # changed since (refresh(); UnitOfWork.find and get read them).
        self.indexes: dict[str, StateIndex] = {}
        # SQLite: WAL checkpoints run beside the writers rather than inside a commit (see
        # _sqlite_transactions), at most every CHECKPOINT_EVERY_S after a write.
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpointed_at = 0.0
        self._unsaved = False
        if self.is_sqlite:
            event.listen(engine.sync_engine, "commit", self._wrote)

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
            await conn.run_sync(_create_with_indexes)
            if extra is not None:
                await conn.run_sync(extra.create_all)

    async def close(self) -> None:
        if self._committing:  # commits whose callers were cancelled end before the engine
            await asyncio.wait(list(self._committing), timeout=CLOSE_WAIT_S)
        if self._checkpointer is not None:  # closing checkpoints anyway
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)
        await self.engine.dispose()

    def _wrote(self, _conn: Any) -> None:
        """After a commit on SQLite (called in the event loop's thread, within SQLAlchemy's
        greenlet): the WAL is to be checkpointed, soon, in the background."""
        self._unsaved = True
        if self._checkpointer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a synchronous use of the engine: the next async commit will
                return
            self._checkpointer = loop.create_task(self._checkpoints())

    async def _checkpoints(self) -> None:
        """Checkpoints while commits come, at most every CHECKPOINT_EVERY_S, the last one
        after the last commit (so a quiet store's WAL is emptied too)."""
        try:
            while self._unsaved:
                await asyncio.sleep(max(0.0, self._checkpointed_at + CHECKPOINT_EVERY_S - time.monotonic()))
                self._unsaved = False
                try:
                    async with self._reader.connect() as conn:
                        # PASSIVE: copies what no reader still needs, never waits for or blocks anyone.
                        await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                except Exception:
                    log.warning("WAL checkpoint of %s failed", self.name, exc_info=True)
                self._checkpointed_at = time.monotonic()
        finally:
            self._checkpointer = None

    # -- writing -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """This process's write turn, held across a whole decision (its reads, the decision,
        its commit): no other append of this process commits in between (SQLite: no other
        write). For a command that lost a race, so that it does not race the same writers
        again."""
        if self._turn_held():
            yield
            return
        async with self._append_lock:
            token = _write_turn.set((self, asyncio.current_task()))
            try:
                yield
            finally:
                _write_turn.reset(token)

    def _turn_held(self) -> bool:
        return _write_turn.get() == (self, asyncio.current_task())

    async def commit(self, commit: Commit) -> list[Envelope]:
        """Append, update states and bookkeeping in one transaction. All or nothing. Once
        called, a commit goes ahead in a task of its own even if its caller is cancelled (a
        request past its deadline, a consumer stopped at shutdown): cancelled inside its
        transaction, SQLAlchemy closes the connection in a task of its own, and if the loop
        ends first an SQLite file stays write-locked for as long as the process lives."""
        turn_held = self._turn_held()
        task = asyncio.get_running_loop().create_task(self._commit(commit, turn_held))
        self._committing.add(task)
        task.add_done_callback(self._committing.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_unheard)
            if turn_held:  # the turn is given up only once its commit has ended
                await outlast(task)
            raise

    async def _commit(self, commit: Commit, turn_held: bool) -> list[Envelope]:
        if turn_held:
            written = await self._commit_alone(commit)  # the turn keeps the others waiting
        elif commit.appends and not self.is_sqlite:
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
            # A write turn (exclusive) holds the next group back until it is over.
            async with self._append_lock:
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
                            # A stale version or one tracked event is refused before anything
                            # is written; a commit that may be refused after writing (its
                            # Idempotency-Key, its own writes, a batch's tracking rows of
                            # which one was there) gets a savepoint.
                            if commit.idempotency or commit.writes or len(commit.tracking) > 1:
                                async with conn.begin_nested():
                                    results.append(await self._apply(conn, commit, head, rows))
                            else:
                                results.append(await self._apply(conn, commit, head, rows))
                        except (ConcurrencyError, AlreadyApplied, IdempotencyKeyTaken) as refused:
                            results.append(refused)
                    if rows:
                        try:
                            if self.is_sqlite:
                                await conn.execute(INSERT_EVENTS, rows)
                            else:
                                records = [tuple(map(r.__getitem__, _EVENT_COLUMNS)) for r in rows]
                                await (await _driver(conn)).executemany(PG_INSERT_EVENTS, records)
                        except (IntegrityError, asyncpg.UniqueViolationError) as exc:  # the lock makes
                            raise ConcurrencyError(rows[0]["stream_id"], -1, -1) from exc  # this unreachable
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
        # The last event and the streams' versions in one round trip.
        rows: Any
        if self.is_sqlite:
            rows = await conn.execute(HEAD_AND_VERSIONS, {"streams": streams})
        else:
            # Through SQLAlchemy (uncompiled): its first statement is what begins the
            # transaction that the asyncpg statements after it then run in.
            await conn.exec_driver_sql(PG_ADVISORY_LOCK, (self._lock_key,))
            rows = await (await _driver(conn)).fetch(PG_HEAD_AND_VERSIONS, streams)
        head = _Head(0, GENESIS_HASH, {})
        for is_head, n, s in rows:
            if is_head:
                head.position, head.hash = int(n), s
            else:
                head.versions[s] = int(n)
        return head

    async def _apply(
        self, conn: AsyncConnection, commit: Commit, head: _Head | None, rows: list[dict[str, Any]]
    ) -> list[Envelope]:
        """One commit's writes; its events join `rows` and move `head` only once all of its
        writes succeeded."""
        written, new_rows = self._events(commit, head) if head is not None else ([], [])
        if commit.tracking:
            tracked = await conn.execute(self._insert_tracking.values(
                [{"consumer": c, "event_id": e} for c, e in commit.tracking]))
            if tracked.rowcount != len(commit.tracking):  # a row was there: inserted less
                consumer, event_id = commit.tracking[0]
                raise AlreadyApplied(f"{consumer} applied {event_id} (or another of its "
                                     f"{len(commit.tracking)}) before")
        last_position = written[-1].position if written else None
        if commit.states:
            await conn.execute(self._upsert_states, [
                {"stream_id": st.stream_id, "kind": st.kind, "version": st.version,
                 "status": st.status, "ref": st.ref, "state": st.state,
                 "updated_position": last_position or 0}
                for st in commit.states
            ])
        if commit.checkpoint is not None:
            await self._set_checkpoint(conn, *commit.checkpoint)
        for write in commit.writes:
            await write(conn)
        if commit.idempotency is not None:
            rec = commit.idempotency
            kept = await conn.execute(self._insert_idempotency, {
                "key": rec.key, "request_hash": rec.request_hash,
                "status_code": rec.status_code, "body": rec.body})
            if kept.rowcount == 0:
                raise IdempotencyKeyTaken(rec.key)
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
                payload_text = canonical_json(fields["payload"])  # encoded once: hashed and stored
                digest = event_hash(fields, payload_text)
                written.append(Envelope(**fields, hash=digest))
                row = {k: v for k, v in fields.items() if k != "store"}
                row["payload"], row["hash"] = payload_text, digest
                rows.append(row)
                prev_hash = digest
        return written, rows

    async def _set_checkpoint(self, conn: AsyncConnection, name: str, position: int) -> None:
        await conn.execute(self._set_checkpoint_query, {"name": name, "position": position})

    # -- reading -----------------------------------------------------------------

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[Envelope]:
        async with self._reader.connect() as conn:
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
        async with self._reader.connect() as conn:
            rows = await conn.execute(
                select(events_table)
                .where(events_table.c.position > after_position)
                .order_by(events_table.c.position)
                .limit(limit)
            )
            return [_row_to_envelope(self.name, r) for r in rows]

    async def link(self, position: int) -> tuple[str, str] | None:
        """(event_id, hash) of the event at a position, as stored: read without parsing the
        row, so a row edited into what no envelope is still shows its link."""
        async with self._reader.connect() as conn:
            row = (await conn.execute(select(events_table.c.event_id, events_table.c.hash)
                                      .where(events_table.c.position == position))).first()
            return None if row is None else (str(row.event_id), str(row.hash))

    async def head(self) -> int:
        async with self._reader.connect() as conn:
            return int(await conn.scalar(select(func.max(events_table.c.position))) or 0)

    async def wait_for_append(self, timeout: float) -> None:
        """Returns when this process appends to the store, or after the timeout (other
        processes' appends are found by polling)."""
        # asyncio.timeout, not wait_for: wait_for waits in a second task, and a cancel that
        # lands while that task takes the lock back left the lock taken by nobody (every
        # later append then hung on notify, and shutdown on this wait).
        async with self._appended:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._appended.wait()

    async def verify(self, page: int = 1000) -> ChainBreak | None:
        """The first broken link of the store's chain, or None. A row that cannot be read
        as an envelope (edited into text that is not JSON, a field its column or the
        envelope refuses) is a break at its position, not an error: the answer names it."""
        prev, after = GENESIS_HASH, 0
        while True:
            async with self._reader.connect() as conn:
                rows = list(await conn.execute(
                    select(events_table)
                    .where(events_table.c.position > after)
                    .order_by(events_table.c.position)
                    .limit(page)
                ))
            if not rows:
                return None
            if rows[0].position != after + 1:
                first = rows[0]
                return ChainBreak(store=self.name, position=first.position,
                                  event_id=str(first.event_id), reason=f"position {after + 1} is missing")
            batch, unreadable = readable_rows(
                self.name, rows, functools.partial(_row_to_envelope, self.name))
            broken = verify_run(batch, prev) or unreadable
            if broken is not None:
                return broken
            prev, after = batch[-1].hash, batch[-1].position

    async def load_state(self, stream_id: str) -> tuple[int, str] | None:
        async with self._reader.connect() as conn:
            row = (
                await conn.execute(
                    select(aggregates_table.c.version, aggregates_table.c.state).where(
                        aggregates_table.c.stream_id == stream_id
                    )
                )
            ).first()
            return (row.version, row.state) if row else None

    async def refresh(self, kinds: Mapping[str, Callable[[str], Any]]) -> None:
        """Brings the in-memory lists of these aggregate kinds (with how to parse a state) up
        to date with what changed since each was last synced, in one statement."""
        indexes = {kind: self.indexes.get(kind) or self.indexes.setdefault(kind, StateIndex(parse))
                   for kind, parse in kinds.items()}
        changes = await self.states_changed_since({k: i.synced for k, i in indexes.items()})
        for change in changes:
            indexes[change.kind].put(change)
        if changes:
            # The statement saw every commit up to the last position it returned (the
            # module docstring): each kind it asked about is complete up to there.
            top = changes[-1].position
            for index in indexes.values():
                index.synced = max(index.synced, top)

    async def states_changed_since(self, since: Mapping[str, int]) -> list[StateChange]:
        """The aggregates of each kind whose state changed after that kind's store position,
        in position order. Complete up to the highest position returned, for the reason in
        the module docstring: states commit with their events, in position order."""
        params: dict[str, Any] = {}
        for i, (kind, position) in enumerate(since.items()):
            params[f"k{i}"], params[f"p{i}"] = kind, position
        async with self._reader.connect() as conn:
            rows = await conn.execute(changed_since_query(len(since)), params)
            return [StateChange(*r) for r in rows]

    async def checkpoint(self, name: str) -> int:
        async with self._reader.connect() as conn:
            v = await conn.scalar(
                select(checkpoints_table.c.position).where(checkpoints_table.c.name == name)
            )
            return int(v or 0)

    async def is_applied(self, consumer: str, event_id: str) -> bool:
        return bool(await self.applied_among(consumer, [event_id]))

    async def applied_among(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        """Which of these deliveries the consumer has a tracking row for."""
        async with self._reader.connect() as conn:
            rows = await conn.execute(select(tracking_table.c.event_id).where(and_(
                tracking_table.c.consumer == consumer, tracking_table.c.event_id.in_(list(event_ids)))))
            return {r[0] for r in rows}

    async def keep_passed_over(self, consumer: str, messages: Sequence[PassedOver]) -> int:
        """Records messages the consumer passed over; one already recorded (a redelivery
        after a crash before the offsets were committed) is not recorded again. Returns
        how many are new."""
        if not messages:
            return 0
        received_at = iso(utcnow())
        async with self.engine.begin() as conn:
            result = await conn.execute(self._insert_passed_over.values([
                {"consumer": consumer, "topic": m.topic, "partition": m.partition, "offset": m.offset,
                 "key": m.key, "value": m.value, "reason": m.reason, "received_at": received_at}
                for m in messages]))
            return int(result.rowcount)

    async def passed_over(self, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
        """How many messages this store's consumers passed over, and the latest `limit`."""
        t = passed_over_table
        async with self._reader.connect() as conn:
            count = int(await conn.scalar(select(func.count()).select_from(t)) or 0)
            rows = await conn.execute(select(t).order_by(t.c.received_at.desc(), t.c.topic, t.c.partition,
                                                         t.c.offset.desc()).limit(limit))
            return count, [dict(r._mapping) for r in rows]

    async def idempotent_response(self, key: str) -> IdempotencyRecord | None:
        async with self._reader.connect() as conn:
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


def _unheard(task: asyncio.Task[Any]) -> None:
    """A commit whose caller was cancelled: its failure reaches nobody else."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a commit whose caller was cancelled failed: %r", task.exception())


async def outlast(task: asyncio.Future[Any]) -> None:
    """Waits for the task to end, through cancellations (an anyio scope repeats them); what
    it ended with is not the caller's to raise (the caller raises its own cancellation)."""
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


# Which store's write turn (see EventStore.exclusive) the running task holds, if any; the
# task is part of it so that a task started inside the turn does not think it holds it.
_write_turn: contextvars.ContextVar[tuple[EventStore, asyncio.Task[Any] | None] | None] = (
    contextvars.ContextVar("closedloop_write_turn", default=None))


async def _driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under SQLAlchemy's, in the same transaction."""
    return (await conn.get_raw_connection()).driver_connection


def _create_with_indexes(conn: Any) -> None:
    metadata.create_all(conn)
    # create_all builds indexes only with their table: one added later reaches an existing
    # database here.
    for table in metadata.tables.values():
        for index in table.indexes:
            index.create(conn, checkfirst=True)


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
        # The commit that crossed 1,000 WAL pages used to copy them into the database and
        # sync it before returning: every ~30th decision took 20-30 ms instead of 4 (p99).
        # EventStore._checkpoint does that beside the writers instead.
        cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        begin = conn.get_execution_options().get("sqlite_begin", "BEGIN")
        if begin is not None:  # None: a single read, atomic on its own
            conn.exec_driver_sql(begin)
