"""Reading a store's history for the checks: plain tuples, read in pages straight off the
events table. The checks read every event of a day at city scale, so they skip the
Envelope model (the hash chains are verified apart, by the store itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import orjson
from sqlalchemy import select

from libs.events.store import EventStore, events_table
from services.invariants.report import EventRef

_COLUMNS = [events_table.c[c] for c in (
    "position", "event_id", "stream_id", "stream_version", "type", "occurred_at", "recorded_at",
    "actor", "role", "causation_id", "payload")]


class Ev(NamedTuple):
    store: str
    position: int
    event_id: str
    stream_id: str
    stream_version: int
    type: str
    occurred_at: str
    recorded_at: str  # one value per commit: the events of one transaction share it
    actor: str
    role: str
    causation_id: str | None
    payload: dict[str, Any]

    def keep(self, *keys: str) -> Ev:
        """The event with only the payload fields a check still needs: a city's day is
        millions of events, and the checks hold on to some of each."""
        return self._replace(payload={k: self.payload[k] for k in keys if k in self.payload})

    def ref(self) -> EventRef:
        return EventRef(self.store, self.stream_id, self.stream_version, self.type, self.event_id,
                        self.position)


async def pages(store: EventStore, page: int = 5000) -> AsyncIterator[list[Ev]]:
    """Every event of the store, in position order."""
    after = 0
    while True:
        async with store.engine.connect() as conn:
            rows = list(await conn.execute(
                select(*_COLUMNS).where(events_table.c.position > after)
                .order_by(events_table.c.position).limit(page)))
        if not rows:
            return
        yield [Ev(store.name, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], orjson.loads(r[10]))
               for r in rows]
        after = rows[-1][0]
