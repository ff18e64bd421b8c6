"""Pre-arrival notices to the receiving hospital: delivery (consumer "transfer-notices",
apart from the trip consumer so that a slow HIS never holds up the trips) and the check
that resends a notice not acknowledged in time, then escalates it to the dispatcher.

The check is a periodic scan rather than a timer per notice, as for R14 in disinfection:
it survives restarts, and replicas racing on one trip are settled by its stream version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from libs.events.aggregate import UnitOfWork, decode, with_retry
from libs.events.bus import Handler
from libs.events.catalog import transfer as ev
from libs.events.envelope import Envelope, canonical_json, utcnow
from libs.events.store import EventStore, Meta
from libs.web.webhooks import post_signed
from services.transfer.config import settings
from services.transfer.domain import Trip

log = logging.getLogger(__name__)
ACTOR = "system:pre-arrival-notices"


def notice_body(trip: Trip, attempt: int) -> dict[str, Any]:
    n = trip.notice or {}
    return {
        "notice_id": n.get("notice_id"), "attempt": attempt, "trip_id": trip.id,
        "transfer_id": trip.transfer_id, "facility_id": n.get("facility_id"),
        "vehicle_id": trip.vehicle_id, "risk_category": trip.risk_category,
        "condition": trip.condition, "eta_minutes": n.get("eta_minutes"), "eta_at": n.get("eta_at"),
        "origin": trip.origin, "issued_at": n.get("issued_at"),
        "acknowledge": {"method": "POST", "path": f"/api/v1/trips/{trip.id}/pre-arrival-notice/ack"},
    }


async def deliver(env: Envelope, uow: UnitOfWork) -> None:
    """POST the notice, signed, retried with backoff on errors; the outcome is an event."""
    e = decode(env)
    assert isinstance(e, ev.PreArrivalNoticeIssued | ev.PreArrivalNoticeResent)
    cfg = settings()
    trip = await uow.require(Trip, e.trip_id, "trip")
    if trip.notice is None or trip.notice["notice_id"] != e.notice_id:
        return  # superseded by a redirect's notice
    if trip.notice["status"] in ("acknowledged", "escalated"):
        return  # a redelivery after the hospital answered
    if not cfg.notice_webhook_url:
        log.info("no notice endpoint (CLOSEDLOOP_TRANSFER_NOTICE_WEBHOOK_URL): kept as an event only")
        return
    attempt = e.attempt if isinstance(e, ev.PreArrivalNoticeResent) else 1
    body = canonical_json(notice_body(trip, attempt)).encode()
    sent = await post_signed(cfg.notice_webhook_url, cfg.notice_webhook_secret, str(env.event_id), body,
                             max_attempts=cfg.notice_max_attempts, retry_base_s=cfg.notice_retry_base_s,
                             retry_cap_s=30)
    if sent.ok and sent.status_code is not None:
        trip.notice_delivered(e.notice_id, cfg.notice_webhook_url, attempt, sent.attempts,
                              sent.status_code)
    else:
        trip.notice_failed(e.notice_id, cfg.notice_webhook_url, attempt, sent.attempts, sent.error)

CONSUMES: dict[str, dict[str, Handler]] = {"transfer": {
    "PreArrivalNoticeIssued": deliver, "PreArrivalNoticeResent": deliver,
}}


async def check_overdue(store: EventStore, now: datetime) -> int:
    """Resends or escalates every notice not acknowledged in time; returns how many."""
    cfg = settings()
    acted = 0
    for listed in await UnitOfWork.reading(store).find(Trip, status=["open"], limit=100_000):
        if listed.notice is None or listed.notice["status"] not in ("issued", "resent"):
            continue

        async def work(uow: UnitOfWork, trip_id: str = listed.id) -> str | None:
            trip = await uow.require(Trip, trip_id, "trip")
            return trip.notice_overdue(now, cfg.notice_ack_timeout_s, cfg.notice_max_resends)

        meta = Meta(actor=ACTOR, role="system", correlation_id=listed.transfer_id)
        done, _ = await with_retry(partial(UnitOfWork, store, meta), work)
        acted += int(done is not None)
    return acted


async def run(store: EventStore, stop: asyncio.Event, clock: Callable[[], datetime] = utcnow) -> None:
    """Checks at start, then every `notice_check_interval_s`, until stopped."""
    while not stop.is_set():
        try:
            acted = await check_overdue(store, clock())
            if acted:
                log.info("resent or escalated %d unacknowledged pre-arrival notices", acted)
        except Exception:
            log.exception("notice check failed; the next round retries")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings().notice_check_interval_s)
