"""Problem details never break on what a refusal carries."""

from __future__ import annotations

import json

from libs.web.problems import problem
from libs.web.webhooks import sign, verify


def test_an_extra_named_like_a_standard_member_is_renamed_not_fatal() -> None:
    resp = problem(409, "transfer_closed", "Conflict", "closed", "已结束",
                   {"status": "cancelled", "type": "x"})
    body = json.loads(resp.body)
    assert body["status"] == 409 and body["current_status"] == "cancelled"
    assert body["type"].endswith("/transfer_closed") and body["current_type"] == "x"


def test_a_refusal_does_not_echo_a_personal_number() -> None:
    resp = problem(404, "not_found", "Not Found", "no transfer 640121198001011231", "无此转运单",
                   {"transfer_id": "640121198001011231", "phone": "13800138000"})
    body = json.loads(resp.body)
    assert body["detail"] == "no transfer 6401**********1231"
    assert (body["transfer_id"], body["phone"]) == ("6401**********1231", "138****8000")


def test_webhook_signatures_verify_and_refuse_tampering_and_replay() -> None:
    body = b'{"transfer_id": "t-1"}'
    header = sign("s3cret", body, timestamp=1_700_000_000)
    assert verify("s3cret", body, header, now=1_700_000_100)
    assert not verify("s3cret", body + b" ", header, now=1_700_000_100)  # tampered
    assert not verify("wrong", body, header, now=1_700_000_100)
    assert not verify("s3cret", body, header, now=1_700_000_000 + 301)  # replayed late
    assert not verify("s3cret", body, "garbage", now=1_700_000_000)


def test_a_domain_refusal_carrying_a_status_answers_409_not_500() -> None:
    import asyncio

    from fastapi import FastAPI

    from libs.events.aggregate import StateConflict
    from libs.web import problems

    app = FastAPI()
    problems.install(app)
    handler = app.exception_handlers[problems.DomainError]
    refusal = StateConflict("transfer_closed", "closed", "已结束", status="cancelled")
    resp = asyncio.run(handler(None, refusal))  # type: ignore[arg-type]
    assert resp.status_code == 409 and json.loads(resp.body)["current_status"] == "cancelled"


async def test_a_store_that_cannot_be_reached_answers_503_and_a_bug_stays_a_500() -> None:
    """A restarting PostgreSQL is an outage to wait out (503, Retry-After), not a fault of
    the request; any other database error stays the server error it is."""
    import httpx
    from asyncpg.exceptions import (  # type: ignore[import-untyped]
        CannotConnectNowError,
        ConnectionDoesNotExistError,
    )
    from fastapi import FastAPI
    from sqlalchemy.exc import DBAPIError

    from libs.web import problems

    app = FastAPI()
    problems.install(app)

    @app.get("/restarting")
    async def restarting() -> None:
        raise DBAPIError("SELECT 1", {}, CannotConnectNowError("the database system is shutting down"))

    @app.get("/refused")
    async def refused() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    @app.get("/cut")
    async def cut() -> None:  # from a statement sent on the asyncpg connection itself
        raise ConnectionDoesNotExistError("connection was closed in the middle of operation")

    @app.get("/bug")
    async def bug() -> None:
        raise DBAPIError("SELEC 1", {}, ValueError("syntax error"))

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for path in ("/restarting", "/refused", "/cut"):
            resp = await client.get(path)
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "1", path
            assert resp.json()["code"] == "store_unavailable" and resp.json()["message_zh"]
        assert (await client.get("/bug")).status_code == 500
