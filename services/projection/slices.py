"""A rebuild's fold in worker processes (PostgreSQL), a slice of the archive each.

A worker is `python -m services.projection.slices`: it reads jobs from its stdin and
writes their results to its stdout (each behind its length: `pack`). It works through
asyncpg alone and imports neither SQLAlchemy nor the pydantic catalogue (the parent
passes the schema versions and the SQL), so it starts in a fraction of a second, and it
shares nothing with the parent's event loop, threads or connections (which forking the
parent would copy).

fold_slice folds one slice of the archive. It writes the append-only rows (one per event)
itself, with COPY, and returns every row it folded: the keyed ones (a transfer, a trip,
...) may take facts from events of other slices too, so the parent merges them in slice
order and writes them; the append-only ones as they were copied. The parent evaluates
the findings over all of them in memory.
"""

from __future__ import annotations

import asyncio
import gc
import marshal
import pickle
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from services.projection.facts import ARCHIVE_COLUMNS, SPECS, Buffer, Records, Rows, ev_of_row

APPEND_ONLY = tuple(name for name, spec in SPECS.items() if spec.append_only)
_COLUMNS = ", ".join(ARCHIVE_COLUMNS)


@dataclass(frozen=True)
class Part:
    """Seq in (lo, hi], or (order "store") the positions (lo, hi] of one store among the
    events archived up to `seq_upto`. Slices merge in their order like one fold
    (facts.Buffer.merge), since each keeps every stream's own order."""

    order: str
    lo: int
    hi: int | None
    store: str = ""
    seq_upto: int = 0

    def query(self, after: int | None, page: int) -> tuple[str, tuple[Any, ...]]:
        """PostgreSQL's SQL and arguments for the next page after `after` (a seq, or a
        position for a store slice; None: from the start)."""
        if self.order == "seq":
            bound = "" if self.hi is None else f" AND seq <= {int(self.hi)}"
            return (f"SELECT {_COLUMNS} FROM audit_archive WHERE seq > $1{bound} ORDER BY seq "
                    f"LIMIT {int(page)}", (self.lo if after is None else after,))
        return (f"SELECT {_COLUMNS} FROM audit_archive WHERE store = $1 AND position > $2 AND position <= $3 "
                f"AND seq <= $4 ORDER BY position LIMIT {int(page)}",
                (self.store, self.lo if after is None else after, self.hi, self.seq_upto))

    def last(self, row: Any) -> int:
        """Where the page that ended with this row ends, for the next query."""
        return int(row[0] if self.order == "seq" else row[3])


def fold_slice(dsn: str, search_path: str, number: int, part: Part, page: int,
               versions: dict[str, int]) -> tuple[Rows, Records, int, int]:
    """Runs in a worker process: (keyed rows, append-only rows as copied, events,
    unreadable) of this slice; the append-only rows are in the generation's tables."""
    return asyncio.run(_fold_slice(dsn, search_path, number, part, page, versions))


async def _fold_slice(dsn: str, search_path: str, number: int, part: Part, page: int,
                      versions: dict[str, int]) -> tuple[Rows, Records, int, int]:
    gc.disable()  # a short-lived process that only accumulates (see rebuild.rebuild)
    read = await asyncpg.connect(dsn, server_settings={"search_path": search_path})
    write = await asyncpg.connect(dsn, server_settings={"search_path": search_path,
                                                        "synchronous_commit": "off"})
    buffer = Buffer()
    written: Records = {}  # the append-only rows copied, returned as they were copied
    pending: asyncio.Task[None] | None = None

    async def copy(rows: Buffer) -> None:
        async with write.transaction():
            for name in rows.rows:
                spec = SPECS[name]
                records = rows.records(name)
                await write.copy_records_to_table(f"g{number}_{name}", records=records,
                                                  columns=[*spec.key, *spec.columns])
                written.setdefault(name, []).extend(records)

    try:
        after: int | None = None
        sql, args = part.query(after, page)
        fetching = asyncio.ensure_future(read.fetch(sql, *args))
        while rows := await fetching:
            sql, args = part.query(part.last(rows[-1]), page)
            fetching = asyncio.ensure_future(read.fetch(sql, *args))  # read ahead while folding
            add = buffer.add_event
            for row in rows:
                add(ev_of_row(row, versions))
            if sum(len(buffer.rows.get(n, ())) for n in APPEND_ONLY) >= page * 2:
                if pending is not None:
                    await pending
                pending = asyncio.create_task(copy(Buffer(buffer.take(APPEND_ONLY))))
        if pending is not None:
            await pending
        await copy(Buffer(buffer.take(APPEND_ONLY)))
    finally:
        await read.close()
        await write.close()
    return buffer.rows, written, buffer.events, buffer.unreadable


JOBS: dict[str, Callable[..., Any]] = {"fold_slice": fold_slice}


def pack(value: Any) -> bytes:
    """A reply as bytes: marshal when it is made of plain values only, as a fold's rows
    are (a slice's rows are hundreds of megabytes at a million events, and pickle, which
    remembers every string it writes, took a worker 1.1 s where marshal takes 0.2 s),
    else pickle."""
    try:
        return b"m" + marshal.dumps(value)
    except ValueError:
        return b"p" + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(body: bytes) -> Any:
    view = memoryview(body)[1:]
    return marshal.loads(view) if body[:1] == b"m" else pickle.loads(view)


def _serve() -> None:
    """A worker's loop: one job at a time until its stdin closes."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while header := source.read(8):
        name, args = pickle.loads(source.read(int.from_bytes(header, "big")))
        try:
            reply: tuple[str, Any] = ("ok", JOBS[name](*args))
        except Exception:
            reply = ("error", traceback.format_exc())
        body = pack(reply)
        sink.write(len(body).to_bytes(8, "big") + body)
        sink.flush()


if __name__ == "__main__":
    _serve()
