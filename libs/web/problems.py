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
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from libs.auth.privacy import mask
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
    # A refusal echoes what it was sent (an id in a path, a typed reason): masked for
    # everyone, since no caller needs a number back from an error.
    return JSONResponse(mask(body), status_code=status, media_type=PROBLEM_JSON)


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


class FieldProblem(BaseModel):
    field: str
    code: str
    detail: str


class Problem(BaseModel):
    """What every refusal answers (application/problem+json). A refusal may carry more
    members (the current status, the allowed roles...): they ride beside these."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str
    message_zh: str
    field: str | None = None  # 422: the first field at fault
    errors: list[FieldProblem] | None = None  # 422: every field at fault
    rule: str | None = None  # 409: the rule that refused (R1-R14)


WRITE_METHODS = ("post", "put", "patch", "delete")
# Why each refusal happens; which operation may answer which is decided in `document`.
WHY = {
    401: "no valid bearer token (the code names the defect)",
    403: "the token's role may not call this, or its vehicle/facility/site is another",
    404: "an id in the path or the body names nothing",
    409: "a rule or the current state refuses the command (`rule` names it)",
    413: "the body is larger than the limit",
    415: "the body is not JSON",
    422: "a field is missing or wrong (`field` names it)",
    429: "too many writes from this client (Retry-After)",
    503: "the service's store cannot be reached right now (Retry-After)",
}
HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "required": True}},
    503: {"Retry-After": {"schema": {"type": "integer"}, "required": True}},
}


def _refusals(method: str, operation: dict[str, Any]) -> list[int]:
    write = method in WRITE_METHODS
    has_path_id = any(p.get("in") == "path" for p in operation.get("parameters", []))
    codes = [401, 403, 503]
    if has_path_id or write:
        codes.append(404)
    if write:
        codes += [409, 413, 415, 429]
    if write or "422" in operation.get("responses", {}):
        codes.append(422)
    return sorted(codes)


def document(app: FastAPI, guarded_prefix: str) -> None:
    """The OpenAPI document tells the truth about refusals: under the guarded prefix, each
    operation lists the problem responses it can give, as application/problem+json (not
    FastAPI's default 422 body, which this API never sends)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        shape = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(shape.pop("$defs", {}))
        schemas["Problem"] = shape
        content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path, item in doc.get("paths", {}).items():
            if not path.startswith(guarded_prefix):
                continue
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                for code in _refusals(method, operation):
                    responses[str(code)] = {"description": WHY[code], "content": content,
                                            **({"headers": HEADERS[code]} if code in HEADERS else {})}
                operation["responses"] = dict(sorted(responses.items()))
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _field_of(error: Any) -> str:
    if error.get("type") == "json_invalid":  # its loc is ("body", offset): the body is at fault
        return "body"
    parts = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
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
            {"field": _field_of(e), "code": e.get("type", "invalid"),
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

    # asyncpg's own connection errors too: the store and the projection send some
    # statements through the asyncpg connection itself, past SQLAlchemy's wrapping.
    for kind in (DBAPIError, *UNREACHABLE):
        app.add_exception_handler(kind, store_error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8): a bad field
            return problem(422, "validation_failed", "Unprocessable content",
                           "invalid field: body (not JSON in UTF-8)", "字段无效：body（须为UTF-8编码的JSON）",
                           {"field": "body", "errors": [{"field": "body", "code": "json_invalid",
                                                         "detail": str(exc.detail)}]})
        zh = {404: "未找到", 405: "方法不允许", 413: "请求体过大", 415: "不支持的媒体类型"}
        response = problem(exc.status_code, f"http_{exc.status_code}", str(exc.detail),
                           str(exc.detail), zh.get(exc.status_code, "请求被拒绝"))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first route of the path only (RFC 9110)
            response.headers["Allow"] = ", ".join(_allowed(request))
        return response


def _allowed(request: Request) -> list[str]:
    """The methods some route of this path takes (asked of the router, method by method)."""
    return [m for m in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                   for route in request.app.router.routes)]
