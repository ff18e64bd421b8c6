"""R14: a swab result not back within the lab SLA is flagged, as a SwabResultOverdue event
on the cycle, so the audit sees when it was flagged and the cycle's view shows it.

An event rather than a query: a flag is a fact with a time (when the centre knew the lab
was late), and a query would lose it once the result came in. A periodic check in the
service rather than a timer per sample: it survives restarts and needs no state of its own.
Several replicas may run it; the cycle's stream version lets one flag win, and the loser
finds the flag already there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial

from libs.events.aggregate import UnitOfWork, with_retry
from libs.events.envelope import utcnow
from libs.events.store import EventStore, Meta
from services.disinfection.config import settings
from services.disinfection.domain import Cycle

log = logging.getLogger(__name__)

WITH_PENDING_RESULTS = ["awaiting_result", "released"]
ACTOR = "system:disinfection-sla"


async def flag_overdue(store: EventStore, now: datetime) -> int:
    """Flags every pending result past due at `now`; returns how many it flagged."""
    pending = await UnitOfWork.reading(store).find(Cycle, status=WITH_PENDING_RESULTS, limit=100_000)
    flagged = 0
    for listed in pending:
        swab = listed.pending_swab()
        if swab is None or swab["overdue"] or swab["due_at"] is None \
                or datetime.fromisoformat(swab["due_at"]) >= now:
            continue

        async def work(uow: UnitOfWork, cycle_id: str = listed.id) -> bool:
            cycle = await uow.require(Cycle, cycle_id, "cycle")
            return cycle.flag_overdue(now)

        meta = Meta(actor=ACTOR, role="system", correlation_id=listed.transfer_id)
        done, _ = await with_retry(partial(UnitOfWork, store, meta), work)
        flagged += int(done)
    return flagged


async def run(store: EventStore, stop: asyncio.Event,
              clock: Callable[[], datetime] = utcnow) -> None:
    """Checks at start, then every `sla_check_interval_s`, until stopped."""
    while not stop.is_set():
        try:
            flagged = await flag_overdue(store, clock())
            if flagged:
                log.info("flagged %d overdue swab results (R14)", flagged)
        except Exception:
            log.exception("overdue check failed; the next round retries")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings().sla_check_interval_s)
