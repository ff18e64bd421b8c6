"""Signed outgoing webhooks (报备, pre-arrival notices).

The sender puts `X-Closedloop-Signature: t=<unix seconds>,v1=<hex>` on each request, where
v1 is HMAC-SHA256 over `"<t>.<raw body>"` with the shared secret. A receiver verifies:
1. parse t and v1 from the header;
2. refuse if |now - t| is more than the tolerance (5 minutes): a replayed old request;
3. recompute HMAC-SHA256(secret, f"{t}.{body}") and compare in constant time;
4. keep the `X-Closedloop-Event-Id` it has processed, to drop duplicates (retries resend).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass

import httpx

SIGNATURE_HEADER = "X-Closedloop-Signature"
EVENT_ID_HEADER = "X-Closedloop-Event-Id"
TOLERANCE_S = 300


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, now: int | None = None,
           tolerance_s: int = TOLERANCE_S) -> bool:
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs((int(time.time()) if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


@dataclass(frozen=True)
class Delivery:
    ok: bool
    attempts: int
    status_code: int | None
    error: str


async def post_signed(url: str, secret: str, event_id: str, body: bytes, *, max_attempts: int,
                      retry_base_s: float, retry_cap_s: float = 60.0) -> Delivery:
    """POST a signed body, retrying errors and non-2xx answers with exponential backoff. The
    event id header stays the same on every attempt, so the receiver can drop repeats."""
    error, delay = "", retry_base_s
    async with httpx.AsyncClient(timeout=10) as client:
        for attempt in range(1, max_attempts + 1):
            try:
                resp = await client.post(url, content=body, headers={
                    "Content-Type": "application/json", EVENT_ID_HEADER: event_id,
                    SIGNATURE_HEADER: sign(secret, body)})
                if resp.status_code < 300:
                    return Delivery(True, attempt, resp.status_code, "")
                error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < max_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_cap_s)
    return Delivery(False, max_attempts, None, error)
