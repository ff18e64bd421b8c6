"""RFC 9457 problem details: a stable English `code`, a Chinese `message_zh` for the console,
the rule id when a rule refused the command, the field when a field was wrong."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        zh = {404: "未找到", 405: "方法不允许", 413: "请求体过大", 415: "不支持的媒体类型"}
        return problem(exc.status_code, f"http_{exc.status_code}", str(exc.detail),
                       str(exc.detail), zh.get(exc.status_code, "请求被拒绝"))
