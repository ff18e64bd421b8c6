"""/healthz, /readyz, /metrics and /chain, the same for every service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy import text

from libs.auth.privacy import mask_text
from libs.events.aggregate import NotFound
from libs.events.store import EventStore
from libs.web.fields import POSITION_MAX
from libs.web.problems import PROBLEM_JSON

REQUESTS = Counter("closedloop_http_requests_total", "HTTP requests", ["method", "status"])
LATENCY = Histogram("closedloop_http_request_seconds", "HTTP request latency", ["method"])

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"],
            responses={503: {"description": "a store is unreachable (which: `stores`)"}})
async def readyz(request: Request, response: Response) -> dict[str, object]:
    stores: dict[str, EventStore] = request.app.state.stores
    checks: dict[str, str] = {}
    for name, store in stores.items():
        try:
            async with store.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            checks[name] = "ok"
        except Exception as exc:  # a probe reports, it does not raise
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return {"status": "ready" if ready else "not_ready", "stores": checks}


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


_PROBLEM = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}


@router.get("/chain/{store}", tags=["ops"], responses={
    404: {"description": "this service keeps no store of that name", "content": _PROBLEM},
    422: {"description": "`at` is not a position (`field` names it)", "content": _PROBLEM},
    503: {"description": "the store cannot be reached right now (Retry-After)", "content": _PROBLEM}})
async def chain(store: str, request: Request,
                at: Annotated[int | None, Query(ge=1, le=POSITION_MAX)] = None) -> dict[str, Any]:
    """This service's own store, checked by this service: its hash chain recomputed (the
    first broken link), its head, and the hash at position `at`. The projection asks every
    service for this (/audit/verify) and compares it with the copy it received: the
    service owns its tables, so no other service reads them."""
    stores: dict[str, EventStore] = request.app.state.stores
    if store not in stores:
        raise NotFound("store", store)
    return await chain_report(stores[store], at)


@router.get("/chain/{store}/links/{position}", tags=["ops"], responses={
    404: {"description": "no store of that name here, or no event at that position", "content": _PROBLEM},
    422: {"description": "`position` is not a position", "content": _PROBLEM},
    503: {"description": "the store cannot be reached right now (Retry-After)", "content": _PROBLEM}})
async def chain_link(store: str, request: Request,
                     position: Annotated[int, Path(ge=1, le=POSITION_MAX)]) -> dict[str, Any]:
    """One link of this service's store: its event id and hash, as stored. Cheap (no chain
    recomputed): /audit/verify asks for a few to find where a store rewritten and re-hashed
    first departs from the copy the projection received."""
    stores: dict[str, EventStore] = request.app.state.stores
    if store not in stores:
        raise NotFound("store", store)
    link = await link_at(stores[store], position)
    if link is None:
        raise NotFound("event", f"{store}@{position}")
    return link


async def link_at(store: EventStore, position: int) -> dict[str, Any] | None:
    found = await store.link(position) if position >= 1 else None
    if found is None:
        return None
    return {"store": store.name, "position": position, "event_id": found[0], "hash": found[1]}


async def chain_report(store: EventStore, at: int | None = None) -> dict[str, Any]:
    broken = await store.verify()
    head = await store.head()

    async def hash_at(position: int) -> str | None:
        link = await link_at(store, position)
        return None if link is None else str(link["hash"])

    return {"store": store.name, "events": head, "head_hash": await hash_at(head), "ok": broken is None,
            "first_break": broken.model_dump() if broken else None,
            "at": {"position": at, "hash": await hash_at(at)} if at is not None else None,
            "passed_over": await passed_over_report(store)}


async def passed_over_report(store: EventStore, latest: int = 10) -> dict[str, Any]:
    """The messages this service's consumers passed over as no event (bus.PassedOver): not
    a break in the store's chain, but something on the bus that no store wrote, which an
    auditor should see (the value as text, cut at 1,000 characters, its id numbers and
    phones masked: /chain answers without a token, and a message is whatever was sent)."""
    count, rows = await store.passed_over(latest)
    return {"messages": count, "latest": [
        {"consumer": r["consumer"], "topic": r["topic"], "partition": r["partition"], "offset": r["offset"],
         "received_at": r["received_at"], "reason": mask_text(r["reason"][:500]),
         "bytes": len(r["value"] or b""),
         "value": mask_text((r["value"] or b"")[:1000].decode("utf-8", "replace"))}
        for r in rows]}
