"""The projection reads every event of every producing service, known types or not: each
is archived, folded into the active read models and re-evaluates the findings it touches,
in the subscription's transaction, with the tracking row that makes a redelivery change
nothing. A delivered batch goes in one transaction (bus.Batched): the findings of a scope
are re-evaluated once per batch, not once per event."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import UnitOfWork
from libs.events.bus import ALL_TYPES, Batched, Handler
from libs.events.envelope import Envelope
from services.projection import violations
from services.projection.findings import registry_types
from services.projection.tables import apply_live

SOURCES = ("dispatch", "transfer", "disinfection")
KNOWN = registry_types()  # the checks that run: those whose event types the catalogue has


async def on_events(envs: list[Envelope], uow: UnitOfWork) -> None:
    """Delivered events in one transaction: each scope they touch is re-evaluated once."""
    async def write(conn: AsyncConnection) -> None:
        gen = await apply_live(conn, envs)
        await violations.apply(conn, gen, envs, KNOWN)

    uow.writes.append(write)


async def on_any_event(env: Envelope, uow: UnitOfWork) -> None:
    await on_events([env], uow)


PROJECT = Batched(on_any_event, on_events)
CONSUMES: dict[str, dict[str, Handler]] = {source: {ALL_TYPES: PROJECT} for source in SOURCES}
