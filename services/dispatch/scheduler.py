"""The recurring-care clock: requests each due occurrence of every series. Safe with several
replicas: occurrence transfer ids are deterministic and the series stream is versioned."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from libs.events.envelope import utcnow
from libs.events.store import ConcurrencyError, EventStore
from services.dispatch.config import settings
from services.dispatch.handlers import request_due_care

log = logging.getLogger(__name__)


async def run(store: EventStore, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            created = await request_due_care(store, utcnow())
            if created:
                log.info("requested %d scheduled-care transfers", created)
        except ConcurrencyError:
            pass  # another replica requested it first
        except Exception:
            log.exception("care scheduler round failed; next round retries")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings().schedule_interval_s)
