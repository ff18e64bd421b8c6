"""The projection reads every event of every producing service, known types or not: each
is archived, folded into the active read models and re-evaluates the findings it touches,
in the subscription's transaction, with the tracking row that makes a redelivery change
nothing."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import UnitOfWork
from libs.events.bus import ALL_TYPES, Handler
from libs.events.envelope import Envelope
from services.projection import violations
from services.projection.findings import registry_types
from services.projection.tables import apply_live

SOURCES = ("dispatch", "transfer", "disinfection")
KNOWN = registry_types()  # the checks that run: those whose event types the catalogue has


async def on_any_event(env: Envelope, uow: UnitOfWork) -> None:
    async def write(conn: AsyncConnection) -> None:
        gen = await apply_live(conn, env)
        await violations.apply(conn, gen, env, KNOWN)

    uow.writes.append(write)


CONSUMES: dict[str, dict[str, Handler]] = {source: {ALL_TYPES: on_any_event} for source in SOURCES}
