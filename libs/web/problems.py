"""RFC 9457 problem details: a stable English `code`, a Chinese `message_zh` for the console,
the rule id when a rule refused the command, the field when a field was wrong."""

from __future__ import annotations

import logging
from typing import Any

from asyncpg.exceptions import (  # type: ignore[import-untyped]
    ConnectionDoesNotExistError,
    OperatorInterventionError,
    PostgresConnectionError,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from libs.auth.tokens import Unauthenticated
from libs.events.aggregate import DomainError, InvalidField, RuleRefused
from libs.events.store import ConcurrencyError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


RESERVED = ("type", "title", "status", "detail", "code", "message_zh", "instance")


def problem(status: int, code: str, title: str, detail: str, message_zh: str,
            extra: dict[str, Any] | None = None) -> JSONResponse:
    """Extras ride beside the standard members; one that would shadow a standard member is
    renamed (`status` -> `current_status`), never allowed to break the answer."""
    body: dict[str, Any] = {
        f"current_{k}" if k in RESERVED else k: v for k, v in (extra or {}).items()}
    body.update({"type": f"https://closedloop.example/problems/{code}", "title": title,
                 "status": status, "detail": detail, "code": code, "message_zh": message_zh})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


# The store cannot be reached right now: refused or cut connections, a server shutting down
# or starting up (SQL state class 57), a connection-level failure (class 08).
UNREACHABLE = (OSError, ConnectionDoesNotExistError, OperatorInterventionError, PostgresConnectionError)


def store_unreachable(exc: BaseException | None) -> bool:
    """Whether an error means the store is down for now (a restart, a cut connection), as
    opposed to a fault in the request or the code: along the chain of causes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UNREACHABLE) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        extra: dict[str, Any] = dict(exc.extra)
        if isinstance(exc, RuleRefused):
            extra["rule"] = exc.rule
        if isinstance(exc, InvalidField):
            extra["field"] = exc.field
            extra["errors"] = [{"field": exc.field, "code": exc.code, "detail": exc.detail}]
        title = {403: "Forbidden", 404: "Not found", 409: "Conflict",
                 422: "Unprocessable content", 429: "Too many requests"}.get(exc.status, "Refused")
        response = problem(exc.status, exc.code, title, exc.detail, exc.message_zh, extra)
        if "retry_after_s" in exc.extra:
            response.headers["Retry-After"] = str(exc.extra["retry_after_s"])
        return response

    @app.exception_handler(Unauthenticated)
    async def unauthenticated(_: Request, exc: Unauthenticated) -> JSONResponse:
        response = problem(401, exc.code, "Unauthorized", exc.detail, exc.message_zh)
        response.headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{exc.code}"'
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field_of(e.get("loc", ())), "code": e.get("type", "invalid"),
             "detail": e.get("msg", "")}
            for e in exc.errors()
        ]
        first = errors[0]["field"] if errors else "body"
        return problem(422, "validation_failed", "Unprocessable content",
                       f"invalid field: {first}", f"字段无效：{first}",
                       {"field": first, "errors": errors})

    @app.exception_handler(ConcurrencyError)
    async def concurrent(_: Request, exc: ConcurrencyError) -> JSONResponse:
        return problem(409, "concurrent_update", "Conflict", str(exc),
                       "数据已被他人同时修改，请重试", {"stream_id": exc.stream_id})

    async def store_error(_: Request, exc: Exception) -> JSONResponse:
        """503 with Retry-After while the store restarts: a client retries (with its
        Idempotency-Key) instead of taking the outage for a fault of its request."""
        if not store_unreachable(exc):
            raise exc  # a real fault: the server error it is
        response = problem(503, "store_unavailable", "Service unavailable",
                           "the service's store cannot be reached right now; retry shortly",
                           "数据存储暂时不可用，请稍后重试")
        response.headers["Retry-After"] = "1"
        return response

    app.add_exception_handler(DBAPIError, store_error)
    app.add_exception_handler(OSError, store_error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        zh = {404: "未找到", 405: "方法不允许", 413: "请求体过大", 415: "不支持的媒体类型"}
        return problem(exc.status_code, f"http_{exc.status_code}", str(exc.detail),
                       str(exc.detail), zh.get(exc.status_code, "请求被拒绝"))
