"""The projection reads every producing service's events."""

from __future__ import annotations

from libs.events.aggregate import UnitOfWork
from libs.events.bus import ALL_TYPES, Handler
from libs.events.envelope import Envelope
from services.projection.read_models import archive


async def on_any_event(env: Envelope, uow: UnitOfWork) -> None:
    uow.writes.append(archive(env))


CONSUMES: dict[str, dict[str, Handler]] = {
    source: {ALL_TYPES: on_any_event} for source in ("dispatch", "transfer", "disinfection")
}
