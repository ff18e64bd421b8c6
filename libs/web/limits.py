"""Abuse limits: body size and media type, NUL characters in the URL (an ASGI middleware,
before any parsing), and a token bucket per verified client on the write paths (called by
the policy's guard)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.events.aggregate import DomainError
from libs.web.problems import problem

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_MEDIA = ("application/json", "application/merge-patch+json")


class TooManyRequests(DomainError):
    status = 429


@dataclass
class RateLimiter:
    """Per client: `burst` writes at once, then `rate_per_s` sustained."""

    rate_per_s: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, client: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(client, (float(self.burst), t))
        tokens = min(float(self.burst), tokens + (t - last) * self.rate_per_s)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self.rate_per_s)
            raise TooManyRequests("rate_limited", f"more than {self.rate_per_s:g} writes/s from "
                                  f"{client}; retry after {wait} s", "写请求过于频繁，请稍后重试",
                                  retry_after_s=wait)
        self._buckets[client] = (tokens - 1, t)
        if len(self._buckets) > 100_000:  # forget idle clients rather than grow without end
            self._buckets = {k: v for k, v in self._buckets.items() if t - v[1] < 60}


class BodyLimits:
    """413 past `max_bytes` (declared or actually sent), 415 for a write whose body is not
    JSON. Answered as problem details before the app reads a byte."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = _nul_in_url(scope)
        if where is not None:
            await self._refuse(send, 422, "validation_failed", f"invalid field: {where} (contains NUL)",
                               f"字段无效：{where}（含NUL字符）",
                               {"field": where, "errors": [{"field": where, "code": "nul_character",
                                                             "detail": "NUL (U+0000) is not allowed"}]})
            return
        if scope["method"] not in WRITES:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, 413, "body_too_large",
                               f"the body is larger than {self.max_bytes} bytes", "请求体过大")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, 413, "body_too_large",
                                   f"the body is larger than {self.max_bytes} bytes", "请求体过大")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if size and not (media in JSON_MEDIA or media.endswith("+json")):
            await self._refuse(send, 415, "unsupported_media_type",
                               f"the body must be application/json, not {media or 'untyped'}",
                               "请求体须为 application/json")
            return
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, status: int, code: str, detail: str, message_zh: str,
                      extra: dict[str, Any] | None = None) -> None:
        title = {413: "Content too large", 415: "Unsupported media type",
                 422: "Unprocessable content"}[status]
        response = problem(status, code, title, detail, message_zh, extra)
        await send({"type": "http.response.start", "status": status,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


def _nul_in_url(scope: Scope) -> str | None:
    """Where a NUL hides in the path or the query (no id or filter holds one, and PostgreSQL
    cannot compare text with it): the parameter's name, or "path"."""
    if "\x00" in scope["path"]:
        return "path"
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return name.replace("\x00", "") or "query"
    return None

