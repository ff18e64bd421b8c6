"""Rebuild every read model from the archive without downtime: build beside, then switch.

1. Pick the next generation number and create its tables (the active one keeps serving
   reads and taking live events).
2. Fold the archive into it in pages: a page of events is merged in memory
   (facts.Buffer) and written in bulk (COPY on PostgreSQL), not one write per event. On
   PostgreSQL, worker processes fold slices of the archive side by side (the fold is
   Python, bound to one core each); their keyed rows are merged here in slice order.
3. Evaluate the findings of every scope (violations): with worker processes, over the
   fold's rows in memory, in two processes forked for it, while the keyed rows and the
   indexes are written; in this process alone (which writes as it folds), over the fact
   rows written.
4. Catch up with what arrived meanwhile, then, holding the archive lock (live appends
   wait a moment), fold the last few events, re-evaluate the findings they touch and
   switch `active_generation` in the same transaction. Reads move to the new tables at
   their next query.

`order="store"` folds store after store in position order instead of in the order the
events were applied live: the result must still be identical, which is what shows that
the read models do not depend on how Kafka interleaved the streams.

With `compare`, nothing switches: the built generation is handed to it in step 3, under
the archive lock (nothing is archived meanwhile), then dropped. The invariant checker
(services/invariants) compares the live read models with a rebuild this way, at any time,
without changing what the views serve.

    python -m services.projection.rebuild [--order seq|store] [--page N] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import and_, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

import services
from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore, outlast
from services.projection import violations
from services.projection.facts import ARCHIVE_COLUMNS, Buffer, Ev, Records, current_versions, ev_of_row
from services.projection.findings import TRANSFER, VEHICLE, registry_types
from services.projection.slices import APPEND_ONLY, Part, unpack
from services.projection.tables import (
    ACTIVE,
    MODEL,
    Generation,
    active_generation,
    active_model,
    archive,
    bulk_insert,
    create_generation,
    create_indexes,
    drop_generation,
    ensure_active,
    flush,
    generation,
    generations_present,
    largest_first,
    lock_archive,
    meta_table,
    model_digest,
    set_meta,
)

log = logging.getLogger(__name__)

BUILDING = "building_generation"
HEARTBEAT_SECONDS = 20.0  # a rebuild renews its marker this often while it builds
STALE_SECONDS = 120  # a marker not renewed for this long was left by a rebuild that died

Compare = Callable[[AsyncConnection, Generation], Awaitable[None]]
T = TypeVar("T")


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
    workers: int = 1
    phases: dict[str, float] = field(default_factory=dict)  # seconds each step took
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


class _Reader:
    """Pages of archive rows in ARCHIVE_COLUMNS order. On PostgreSQL it reads through the
    asyncpg connection itself: SQLAlchemy's row layer costs a third of the read rate."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"

    async def page(self, part: Part, after: int | None, page: int) -> list[Any]:
        if self.pg:
            sql, args = part.query(after, page)
            raw = await self.conn.get_raw_connection()
            return list(await raw.driver_connection.fetch(sql, *args))  # type: ignore[union-attr]
        frm = part.lo if after is None else after
        if part.order == "seq":
            cond = [archive.c.seq > frm, *([archive.c.seq <= part.hi] if part.hi is not None else [])]
            order: Any = archive.c.seq
        else:
            cond = [archive.c.store == part.store, archive.c.position > frm, archive.c.position <= part.hi,
                    archive.c.seq <= part.seq_upto]
            order = archive.c.position
        return list(await self.conn.execute(select(*_COLS).where(and_(*cond)).order_by(order).limit(page)))

    async def by_seq(self, after: int, upto: int | None, page: int) -> list[Any]:
        return await self.page(Part("seq", after, upto), None, page)


async def _plan(conn: AsyncConnection, order: str, upto: int, slices: int) -> list[Part]:
    step = max(1, -(-upto // slices))
    if order == "seq":
        return [Part("seq", lo, min(lo + step, upto)) for lo in range(0, upto, step)]
    tops = (await conn.execute(select(archive.c.store, func.max(archive.c.position)).where(
        archive.c.seq <= upto).group_by(archive.c.store).order_by(archive.c.store))).all()
    return [Part("store", lo, min(lo + step, top), store, upto)
            for store, top in tops for lo in range(0, top, step)]


async def _pages(reader: _Reader, part: Part, page: int) -> AsyncIterator[list[Any]]:
    """The part's pages in order; the next page is already being read while the caller
    folds this one (the database works on the other core meanwhile)."""
    pending = asyncio.ensure_future(reader.page(part, None, page))
    try:
        while rows := await pending:
            pending = asyncio.ensure_future(reader.page(part, part.last(rows[-1]), page))
            yield rows
    finally:
        # Not left reading on a connection its owner is about to close (the caller failed).
        with contextlib.suppress(Exception):
            await pending


class _AppendWriter:
    """Writes the append-only rows (one per event) as pages fill the buffer, in the
    background, so the database inserts one batch while this process folds the next;
    into `keep` as well, when the findings are to be evaluated from memory."""

    def __init__(self, store: EventStore, gen: Generation, page: int, keep: Records | None = None) -> None:
        self.store, self.gen, self.page, self.keep = store, gen, page, keep
        self.pending: asyncio.Task[None] | None = None

    async def drain(self, buffer: Buffer, force: bool = False) -> None:
        if not force and sum(len(buffer.rows.get(n, ())) for n in APPEND_ONLY) < self.page * 2:
            return
        await self.wait()
        part = Buffer(buffer.take(APPEND_ONLY))
        if part.rows:
            self.pending = asyncio.create_task(_write_fresh(self.store, self.gen, part))
            if self.keep is not None:
                for name in part.rows:
                    self.keep.setdefault(name, []).extend(part.records(name))

    async def wait(self) -> None:
        if self.pending is not None:
            task, self.pending = self.pending, None
            await task

    async def abandon(self) -> None:
        """After a failure: the write under way finishes or fails, but is not cancelled
        (see side_by_side); its outcome no longer matters."""
        with contextlib.suppress(Exception):
            await self.wait()


async def side_by_side(store: EventStore, width: int,
                       jobs: list[Callable[[AsyncConnection], Awaitable[None]]]) -> None:
    """Each job in a transaction of its own, `width` at a time, in the order given (the
    longest first): the database writes or indexes one table per core. A failure stops
    the other lanes taking new jobs; the jobs running are let finish, not cancelled (a
    COPY cancelled midway can go back to the pool in a state the connection's next user
    waits on forever), then the first failure is raised as it was. The generation is not
    active yet, so what was written is dropped with it."""
    queue = list(reversed(jobs))
    failures: list[Exception] = []

    async def lane() -> None:
        while queue and not failures:
            job = queue.pop()
            try:
                async with write_tx(store) as conn:
                    await job(conn)
            except Exception as exc:
                failures.append(exc)

    await asyncio.gather(*(lane() for _ in range(max(1, width))))
    if failures:
        raise failures[0]


async def _write_fresh(store: EventStore, gen: Generation, part: Buffer) -> None:
    async with write_tx(store) as conn:
        if not store.is_sqlite:
            # Nothing reads this generation before the switch, whose commit is durable.
            await conn.execute(text("SET LOCAL synchronous_commit = off"))
        await bulk_insert(conn, gen, part)


async def _fold_part(store: EventStore, part: Part, page: int, buffer: Buffer, writer: _AppendWriter,
                     spill: Callable[[], Awaitable[None]], go_on: Callable[[], None]) -> None:
    current = current_versions()
    async with store.engine.connect() as rconn:
        async for rows in _pages(_Reader(rconn), part, page):
            go_on()
            add = buffer.add_event
            for row in rows:
                add(ev_of_row(row, current))
            await writer.drain(buffer)
            await spill()


# Where the `services` package is: the workers import it from there whatever their cwd.
_ROOT = str(Path(services.__file__).resolve().parent.parent)


class _Workers:
    """Worker processes (slices.py) for the PostgreSQL rebuild, fed jobs over pipes."""

    def __init__(self, store: EventStore, count: int) -> None:
        self.count = count
        self.dsn = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.search_path = ""
        self.procs: list[asyncio.subprocess.Process] = []
        self.idle: asyncio.Queue[asyncio.subprocess.Process] = asyncio.Queue()

    async def start(self, conn: AsyncConnection) -> None:
        self.search_path = str(await conn.scalar(text("SHOW search_path")))
        paths = (_ROOT, os.environ.get("PYTHONPATH"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        for _ in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.projection.slices", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env)
            self.procs.append(proc)
            self.idle.put_nowait(proc)

    async def run(self, name: str, *args: Any) -> Any:
        """One job on the next idle worker."""
        proc = await self.idle.get()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            body = pickle.dumps((name, (self.dsn, self.search_path, *args)), protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.write(len(body).to_bytes(8, "big") + body)
            await proc.stdin.drain()
            size = int.from_bytes(await proc.stdout.readexactly(8), "big")
            status, result = unpack(await proc.stdout.readexactly(size))
        finally:
            self.idle.put_nowait(proc)
        if status != "ok":
            raise RuntimeError(f"rebuild worker failed on {name}:\n{result}")
        return result

    async def fold(self, conn: AsyncConnection, gen: Generation, order: str, upto: int, page: int,
                   listed: Records, stop: asyncio.Event) -> Buffer:
        """The keyed rows of every slice, merged; the append-only rows (written by the
        workers) into `listed`. Asked to stop, the workers are killed (each job then ends as
        its reply is cut short) and _Stopped is raised."""
        versions = current_versions()
        futures = [asyncio.ensure_future(self.run("fold_slice", gen.number, part, page, versions))
                   for part in await _plan(conn, order, upto, self.count * 2)]
        stopping = asyncio.ensure_future(stop.wait())
        merged = Buffer()
        try:
            for future in futures:  # merged in the parts' order
                await asyncio.wait((future, stopping), return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    self.kill()
                    raise _Stopped()
                rows, records, events, unreadable = future.result()
                merged.merge(Buffer(rows, events, unreadable))
                for name, part in records.items():
                    listed.setdefault(name, []).extend(part)
        finally:
            stopping.cancel()
            await asyncio.gather(*futures, return_exceptions=True)
        return merged

    def kill(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def close(self) -> None:
        """Workers asked to end (their input closed), killed if they do not within 10 s; a
        killed worker's wait is bounded too (a pipe left unread can keep it pending)."""
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)


async def forked(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a child process forked from this one, which sees this process's memory
    as it is now without copying it (a rebuild's fold, a gigabyte at a million events) and
    uses a core of its own; what it returns comes back pickled over a pipe. The child
    touches nothing of this process but that memory (no event loop, no connection, no
    thread) and leaves with os._exit."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child; its result is what the tests check)
        try:
            os.close(read_fd)
            try:
                reply: tuple[str, Any] = ("ok", fn(*args))
            except BaseException:
                reply = ("error", traceback.format_exc())
            with os.fdopen(write_fd, "wb") as sink:
                pickle.dump(reply, sink, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        # A thread owns the pipe until the child has ended: even when this is cancelled.
        status, result = pickle.loads(await asyncio.to_thread(_collect, read_fd, pid))
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    if status != "ok":
        raise RuntimeError(f"rebuild's forked {getattr(fn, '__name__', fn)} failed:\n{result}")
    return result  # type: ignore[no-any-return]


def _collect(read_fd: int, pid: int) -> bytes:
    """What the child wrote until it closed the pipe, then the child reaped."""
    try:
        with os.fdopen(read_fd, "rb") as source:
            return source.read()
    finally:
        os.waitpid(pid, 0)


def default_workers(store: EventStore) -> int:
    """Worker processes for a rebuild: one per core on PostgreSQL (the fold is Python,
    bound to a core; the database works beside it), none on SQLite (one writer)."""
    return 1 if store.is_sqlite else max(1, min(4, os.cpu_count() or 1))


async def rebuild(store: EventStore, *, order: str = "seq", page: int = 10_000,
                  flush_rows: int = 500_000, force: bool = False, workers: int | None = None,
                  compare: Compare | None = None, claim: str | None = None) -> Report:
    """Pages of events are folded in memory (facts.Buffer). Append-only tables (one row per
    event) are written as they fill; keyed rows (a transfer, a trip, ...) gather facts from
    many events, so they are kept until the end and written once. With worker processes
    (PostgreSQL), each folds a slice of the archive and the keyed rows are merged here;
    in this process alone, keyed rows are merged into the table by upsert whenever more
    than `flush_rows` of them are held.

    Refused (RebuildRunning) while another rebuild's marker is fresh, unless it is `claim`
    (the caller's own, set before it called) or `force` (take over one that died).

    Cancelled, it stops at its next step between two writes, cleans up (its generation and
    its marker dropped) and then raises: a cancellation landing inside a write transaction
    left an SQLite file write-locked for good (the cleanup waited 30 s on it and gave up,
    leaving the marker), and a worker's reply half read hung the rebuild forever."""
    if order not in ("seq", "store"):
        raise ValueError("order is seq or store")
    collecting = gc.isenabled()
    # A rebuild allocates millions of small objects that live until it ends: the cyclic
    # collector would rescan them again and again (it doubled the time of the findings
    # pass). Reference counting still frees what is dropped.
    gc.disable()
    stop = asyncio.Event()
    task = asyncio.ensure_future(_rebuild(store, order, page, flush_rows, force,
                                          default_workers(store) if workers is None else workers,
                                          compare, claim, stop))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await outlast(task)
        raise
    finally:
        if collecting:
            gc.enable()


class _Marker:
    """The building marker this rebuild holds ("<generation>@<renewed at>"), renewed every
    HEARTBEAT_SECONDS until stopped, so that one left by a rebuild that died goes stale in
    minutes rather than blocking every other rebuild (the upgrade at start too) for an hour.
    Stopped, never cancelled: a renewal is a write transaction."""

    def __init__(self, store: EventStore, number: int, value: str) -> None:
        self.store, self.number, self.value = store, number, value
        self.done = asyncio.Event()
        self.task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), HEARTBEAT_SECONDS)
                return
            renewed = f"{self.number}@{iso(utcnow())}"
            try:
                async with write_tx(self.store) as conn:
                    result = await conn.execute(meta_table.update().values(value=renewed).where(
                        (meta_table.c.name == BUILDING) & (meta_table.c.value == self.value)))
                    if result.rowcount:
                        self.value = renewed
            except Exception:
                log.warning("rebuild: renewing the building marker failed; trying again", exc_info=True)

    async def stop(self) -> None:
        self.done.set()
        await outlast(self.task)

    async def release(self, conn: AsyncConnection) -> None:
        """Deletes the marker if it is still this rebuild's (a forced one may have taken over)."""
        await conn.execute(meta_table.delete().where(
            (meta_table.c.name == BUILDING) & (meta_table.c.value == self.value)))


class _Stopped(Exception):
    """The rebuild was asked to stop (its caller was cancelled)."""


async def being_built(conn: AsyncConnection, mine: str | None = None) -> str | None:
    """What another rebuild (this process's, another's, the command's) is building, when
    its marker is younger than STALE_SECONDS (an older one was left by a rebuild that died)
    and is not `mine` (a claim the caller set for itself)."""
    building = await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == BUILDING))
    if not building or building == mine:
        return None
    number, _, since = str(building).partition("@")
    if (utcnow() - datetime.fromisoformat(since)).total_seconds() >= STALE_SECONDS:
        return None
    # A request's claim (api.start_rebuild) until the rebuild it started numbers its generation.
    what = f"generation {number} is being built" if number.isdigit() else "a rebuild is starting"
    return f"{what} since {since}"


async def _rebuild(store: EventStore, order: str, page: int, flush_rows: int, force: bool,
                   workers: int, compare: Compare | None, claim: str | None, stop: asyncio.Event) -> Report:
    started = time.perf_counter()

    def go_on() -> None:
        """Between two steps: where a stop asked for is taken, no transaction open."""
        if stop.is_set():
            raise _Stopped()

    go_on()
    async with write_tx(store) as conn:
        await lock_archive(conn)
        active = (await ensure_active(conn)).number
        building = await being_built(conn, claim)
        if building and not force:
            raise RebuildRunning(building)
        present = await generations_present(conn)
        number = max([*present, active]) + 1
        # Keep the active generation and the one before it (readers may still be on it).
        for old in present:
            if old < active - 1 or old > active:
                await drop_generation(conn, old)
        gen = await create_generation(conn, number, indexes=False)
        marker = f"{number}@{iso(utcnow())}"
        await set_meta(conn, BUILDING, marker)
        upto = int(await conn.scalar(select(func.max(archive.c.seq))) or 0)
    held = _Marker(store, number, marker)
    report = Report(generation=number, previous=active, order=order, workers=workers)
    mark = started

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        report.phases[phase] = round(now - mark, 3)
        mark = now
        if phase != "switch":  # switched, it is done
            go_on()

    known = registry_types()
    current = current_versions()
    written: set[str] = set()  # keyed tables already holding rows: later writes must merge
    pool = _Workers(store, workers) if workers > 1 else None
    # With worker processes the whole fold comes back to this process: the findings are
    # evaluated over it in memory, beside the writes, rather than read back afterwards.
    listed: Records | None = {} if pool is not None else None  # its append-only rows, as written
    writer = _AppendWriter(store, gen, page, keep=listed)
    buffer = Buffer()

    async def write_keyed() -> None:
        """The keyed rows held: inserted into a table that has none yet, else merged; a
        table per transaction, `width` of them at a time."""
        part = Buffer(buffer.take(list(buffer.rows)))

        async def write(name: str, wconn: AsyncConnection) -> None:
            rows = Buffer({name: part.rows[name]})
            await (flush(wconn, gen, rows) if name in written else bulk_insert(wconn, gen, rows))

        names = sorted(part.rows, key=lambda n: -len(part.rows[n]))
        await side_by_side(store, width, [functools.partial(write, name) for name in names])
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

    width = 1 if store.is_sqlite else workers  # connections writing side by side
    evaluation: asyncio.Future[tuple[violations.Evaluated, violations.Evaluated]] | None = None
    try:
        lap("setup")
        if pool is not None and listed is not None:
            async with store.engine.connect() as pconn:
                await pool.start(pconn)
                lap("workers started")
                buffer = await pool.fold(pconn, gen, order, upto, page, listed, stop)
        else:
            async with store.engine.connect() as pconn:
                parts = await _plan(pconn, order, upto, 1)
            for part in parts:
                await _fold_part(store, part, page, buffer, writer, spill, go_on)
        report.events = buffer.events
        lap("fold")
        async with store.engine.connect() as rconn:
            # Catch up with what the live subscription archived meanwhile.
            reader = _Reader(rconn)
            last = upto
            while rows := await reader.by_seq(last, None, page):
                go_on()
                fold(rows)
                report.caught_up += len(rows)
                last = rows[-1][0]
                await writer.drain(buffer)
                if len(rows) < page:
                    break
        await writer.drain(buffer, force=True)
        await writer.wait()
        lap("catch up")
        if listed is not None:
            # The two scopes in two forked processes, beside the writes below.
            async with store.engine.connect() as conn:
                dispatch_upto = await violations.contiguous(conn, violations.DISPATCH_STORE, 0, last)
            keyed = dict(buffer.rows)
            evaluation = asyncio.ensure_future(asyncio.gather(
                forked(violations.evaluate_folded, keyed, listed, known, VEHICLE),
                forked(violations.evaluate_folded, keyed, listed, known, TRANSFER, dispatch_upto)))
        await write_keyed()
        lap("keyed rows")
        async with store.engine.connect() as conn:
            tables = await largest_first(conn, list(gen.tables.values()))
        await side_by_side(store, width, [functools.partial(create_indexes, table=t) for t in tables])
        lap("indexes")
        # The findings of every scope, as the live path would have written them.
        async with write_tx(store) as conn:
            if evaluation is not None:
                vehicles, transfers = await evaluation
                report.findings = await violations.write_evaluated(
                    conn, gen, {VEHICLE: vehicles, TRANSFER: transfers}, known)
            else:
                report.findings = await violations.build(conn, gen, known, last)
        lap("findings")
        # The switch: live appends wait on the archive lock; whatever they archived since
        # the last read is folded here, with the findings it touches, as the live path
        # does, so the new generation misses nothing.
        await held.stop()
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
            await violations.apply(conn, gen, late, known)
            await violations.advance_queue(conn, gen, known)  # the fold may have had a gap
            if compare is None:
                await set_meta(conn, ACTIVE, str(number))
                await set_meta(conn, MODEL, model_digest())
            else:
                await compare(conn, gen)
            await held.release(conn)
        if compare is not None:
            async with write_tx(store) as conn:
                await drop_generation(conn, number)
        lap("switch")
    except BaseException:
        await held.stop()
        await writer.abandon()
        if evaluation is not None:
            evaluation.cancel()  # the children are killed
            await asyncio.gather(evaluation, return_exceptions=True)
        if pool is not None:
            await pool.close()
        async with write_tx(store) as conn:
            await held.release(conn)
            if await active_generation(conn) != number:
                await drop_generation(conn, number)
        raise
    if pool is not None:
        await pool.close()
    report.seconds = time.perf_counter() - started
    report.events_per_second = (report.events + report.caught_up) / report.seconds if report.seconds else 0.0
    report.finished_at = iso(utcnow())
    return report


async def upgrade(store: EventStore, stop: asyncio.Event) -> None:
    """At start: when the active generation was built by older code (other tables or
    columns, another fold, other checks: tables.model_digest), rebuild it with this code's.
    Until the switch, reads go on; the subscription's writes go on into the active
    generation, or, when its tables differ, fail and are retried."""
    async def current() -> bool:
        async with store.engine.connect() as conn:
            return await active_generation(conn) is None or await active_model(conn) == model_digest()

    if await current():
        return
    log.warning("projection: the read models were built by older code; rebuilding them")
    while not stop.is_set():
        try:
            # Not forced: another replica upgrading at the same moment is let finish (forced,
            # each dropped the generation the other was building, again and again); one
            # that died leaves a marker that goes stale within STALE_SECONDS.
            report = await rebuild(store)
            log.info("projection: rebuilt as generation %d (%d events)", report.generation, report.events)
            return
        except RebuildRunning as running:
            log.info("projection: upgrade waits, %s", running)
        except Exception:
            log.exception("projection: the upgrade rebuild failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5)
        if await current():
            return  # the other replica's rebuild switched to this code's model


def main() -> None:
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


__all__ = ["Compare", "RebuildRunning", "Report", "generation", "rebuild"]
