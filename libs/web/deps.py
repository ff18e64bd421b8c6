"""Dependencies every route module uses: the service's store, the verified caller,
Idempotency-Key replay."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from libs.auth.policy import PrincipalDep
from libs.auth.tokens import Principal
from libs.events.aggregate import StateConflict, UnitOfWork, with_retry
from libs.events.envelope import canonical_json
from libs.events.store import EventStore, IdempotencyKeyTaken, IdempotencyRecord, Meta

Remember = Callable[[UnitOfWork, int, Any], None]


# The actor on every event is the verified token's subject and role (libs/auth): never a
# field of the request.
Actor = Principal
ActorDep = PrincipalDep
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def store_dep(service: str) -> Callable[[Request], Awaitable[EventStore]]:
    async def get(request: Request) -> EventStore:  # async: FastAPI runs a def in a thread
        store: EventStore = request.app.state.stores[service]
        return store

    return get


def meta_for(actor: Actor, correlation_id: str) -> Meta:
    return Meta(actor=actor.subject, role=actor.role, correlation_id=correlation_id)


def request_hash(body: BaseModel | dict[str, Any] | None) -> str:
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


async def idempotent(
    store: EventStore,
    key: str | None,
    scope: str,
    body: BaseModel | dict[str, Any] | None,
    run: Callable[[Remember], Awaitable[tuple[int, Any]]],
) -> JSONResponse:
    """Run a command once per Idempotency-Key. The stored response commits in the same
    transaction as the command's events, so a replay returns exactly what the first call
    got and creates nothing; the same key with another body is a 409."""
    full_key = f"{scope}:{key}" if key else None
    digest = request_hash(body) if full_key else ""  # compared only on a replay of a key

    async def replay() -> JSONResponse | None:
        if full_key is None:
            return None
        rec = await store.idempotent_response(full_key)
        if rec is None:
            return None
        if rec.request_hash != digest:
            raise StateConflict("idempotency_key_reused",
                                "this Idempotency-Key was used with a different request",
                                "该幂等键已用于不同的请求")
        return JSONResponse(json.loads(rec.body), status_code=rec.status_code,
                            headers={"Idempotent-Replayed": "true"})

    hit = await replay()
    if hit is not None:
        return hit

    def remember(uow: UnitOfWork, status: int, response: Any) -> None:
        if full_key is not None:
            uow.idempotency = IdempotencyRecord(full_key, digest, status, canonical_json(response))

    try:
        status, response = await run(remember)
    except IdempotencyKeyTaken:
        again = await replay()
        assert again is not None
        return again
    except StateConflict:
        # A client's retry racing its own first call, which committed meanwhile: the
        # state it left refuses this one (a rebuild is running: its own); the first answer
        # is what the key gets.
        again = await replay()
        if again is None:
            raise
        return again
    return JSONResponse(response, status_code=status)



async def command_response(
    store: EventStore, actor: Actor, *, key: str | None, scope: str, body: BaseModel | None,
    correlation_id: str, status: int, work: Callable[[UnitOfWork], Awaitable[dict[str, Any]]],
    status_of: Callable[[dict[str, Any]], int] | None = None,
) -> JSONResponse:
    """The shape of every write route: idempotency, optimistic retry, one commit.
    `status_of` picks the status from the result when it varies (201 created, 200 found)."""

    async def run(remember: Remember) -> tuple[int, dict[str, Any]]:
        async def step(uow: UnitOfWork) -> tuple[int, dict[str, Any]]:
            view = await work(uow)
            code = status_of(view) if status_of else status
            remember(uow, code, view)
            return code, view

        (code, view), _ = await with_retry(
            lambda: UnitOfWork(store, meta_for(actor, correlation_id)), step)
        return code, view

    # Keys are the client's own: another caller reusing one gets nothing of the first's.
    return await idempotent(store, key, f"{actor.subject} {scope}", body, run)
