"""The projection reads every event of every producing service, known types or not: each
is archived and folded into the active read models in the subscription's transaction,
with the tracking row that makes a redelivery change nothing."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import UnitOfWork
from libs.events.bus import ALL_TYPES, Handler
from libs.events.envelope import Envelope
from services.projection.tables import apply_live

SOURCES = ("dispatch", "transfer", "disinfection")


async def on_any_event(env: Envelope, uow: UnitOfWork) -> None:
    async def write(conn: AsyncConnection) -> None:
        await apply_live(conn, env)

    uow.writes.append(write)


CONSUMES: dict[str, dict[str, Handler]] = {source: {ALL_TYPES: on_any_event} for source in SOURCES}
