"""The projection's tables. It keeps every event it received, whole, so that audit views
and the hash-chain check work from its own copy and never read another service's store."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Index, MetaData, String, Table, Text, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.envelope import GENESIS_HASH, ChainBreak, Envelope, verify_chain

metadata = MetaData()

event_log = Table(
    "event_log",
    metadata,
    Column("event_id", String(36), primary_key=True),
    Column("store", String(50), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("transfer_key", String(200), nullable=False),
    Column("type", String(100), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("envelope", Text, nullable=False),
    Index("ix_event_log_transfer", "transfer_key", "recorded_at"),
    Index("ix_event_log_store_position", "store", "position", unique=True),
)


def transfer_key(env: Envelope) -> str:
    """Which transfer an event belongs to: its payload says so, else the correlation id."""
    tid = env.payload.get("transfer_id")
    return str(tid) if tid else env.correlation_id


def archive(env: Envelope) -> Any:
    async def write(conn: AsyncConnection) -> None:
        await conn.execute(insert(event_log).values(
            event_id=str(env.event_id), store=env.store, position=env.position,
            transfer_key=transfer_key(env), type=env.type, recorded_at=env.recorded_at,
            envelope=env.to_json().decode(),
        ))

    return write


async def timeline(conn: AsyncConnection, transfer_id: str) -> list[Envelope]:
    rows = await conn.execute(
        select(event_log.c.envelope).where(event_log.c.transfer_key == transfer_id)
        .order_by(event_log.c.recorded_at, event_log.c.store, event_log.c.position)
    )
    return [Envelope.from_json(r.envelope) for r in rows]


async def store_events(conn: AsyncConnection, store: str, after: int, limit: int) -> list[Envelope]:
    rows = await conn.execute(
        select(event_log.c.envelope).where(
            (event_log.c.store == store) & (event_log.c.position > after))
        .order_by(event_log.c.position).limit(limit)
    )
    return [Envelope.from_json(r.envelope) for r in rows]


async def stores_seen(conn: AsyncConnection) -> list[str]:
    return [r[0] for r in await conn.execute(select(event_log.c.store).distinct())]


async def verify_copy(conn: AsyncConnection, store: str) -> tuple[int, ChainBreak | None]:
    """How many of a store's events the copy holds, and the first broken link."""
    prev, after, count = GENESIS_HASH, 0, 0
    while batch := await store_events(conn, store, after, 1000):
        if batch[0].position != after + 1:
            return count, ChainBreak(store=store, position=after + 1, event_id="",
                                     reason="missing from the projection's copy")
        broken = verify_chain(batch, prev)
        if broken is not None:
            return count, broken
        prev, after, count = batch[-1].hash, batch[-1].position, count + len(batch)
    return count, None
