"""Audit views (/api/v1/audit). Issue 6 adds custody, findings, KPIs, ledger and the feed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from libs.events.aggregate import NotFound
from libs.events.store import EventStore
from libs.web.deps import store_dep
from services.projection import read_models

router = APIRouter(prefix="/audit", tags=["audit"])
Store = Annotated[EventStore, Depends(store_dep("projection"))]


@router.get("/transfers/{transfer_id}/timeline")
async def transfer_timeline(transfer_id: str, store: Store) -> dict[str, Any]:
    async with store.engine.connect() as conn:
        events = await read_models.timeline(conn, transfer_id)
    if not events:
        raise NotFound("transfer", transfer_id)
    return {
        "transfer_id": transfer_id,
        "entries": [
            {"type": e.type, "occurred_at": e.occurred_at, "recorded_at": e.recorded_at,
             "actor": e.actor, "role": e.role, "store": e.store, "stream_id": e.stream_id,
             "event_id": str(e.event_id), "payload": e.payload}
            for e in events
        ],
    }


@router.get("/verify")
async def verify(store: Store, request: Request) -> dict[str, Any]:
    """Recomputes the hash chain of every store's events the projection holds, and of every
    store this process hosts, naming the first broken link."""
    results: dict[str, Any] = {}
    async with store.engine.connect() as conn:
        for name in sorted(await read_models.stores_seen(conn)):
            count, broken = await read_models.verify_copy(conn, name)
            results[f"copy:{name}"] = {"events": count, "ok": broken is None,
                                       "first_break": broken.model_dump() if broken else None}
    hosted: dict[str, EventStore] = request.app.state.stores
    for name, hosted_store in sorted(hosted.items()):
        if name == "projection":
            continue
        broken_store = await hosted_store.verify()
        results[f"store:{name}"] = {"events": await hosted_store.head(),
                                    "ok": broken_store is None,
                                    "first_break": broken_store.model_dump() if broken_store else None}
    return {"ok": all(r["ok"] for r in results.values()), "chains": results}

