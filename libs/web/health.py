"""/healthz, /readyz and /metrics, the same for every service."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy import text

from libs.events.store import EventStore

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
