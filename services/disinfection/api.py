"""The disinfection service's REST routes (/api/v1/disinfection)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore
from libs.web.deps import ActorDep, IdempotencyKey, command_response, store_dep
from services.disinfection import handlers
from services.disinfection.domain import Cycle, Sample
from services.disinfection.schemas import ResultIn, StageIn, SwabIn

router = APIRouter(prefix="/disinfection", tags=["disinfection"])
Store = Annotated[EventStore, Depends(store_dep("disinfection"))]


@router.get("/cycles")
async def list_cycles(store: Store, vehicle_id: str | None = None, status: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 100,
                      offset: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, Any]]:
    found = await UnitOfWork.reading(store).find(
        Cycle, ref=vehicle_id, status=[status] if status else None, limit=limit, offset=offset)
    return [handlers.cycle_view(c) for c in found]


@router.get("/cycles/{cycle_id}")
async def get_cycle(cycle_id: str, store: Store) -> dict[str, Any]:
    return handlers.cycle_view(await UnitOfWork.reading(store).require(Cycle, cycle_id, "cycle"))


async def _transfer_of_cycle(store: EventStore, cycle_id: str) -> str:
    return (await UnitOfWork.reading(store).require(Cycle, cycle_id, "cycle")).transfer_id


@router.post("/cycles/{cycle_id}/stages")
async def post_stage(cycle_id: str, body: StageIn, store: Store, actor: ActorDep,
                     key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.cycle_view(await handlers.log_stage(uow, cycle_id, body))

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/cycles/{cycle_id}/stages", body=body,
        correlation_id=await _transfer_of_cycle(store, cycle_id), status=201, work=work)


@router.post("/cycles/{cycle_id}/swabs")
async def post_swab(cycle_id: str, body: SwabIn, store: Store, actor: ActorDep,
                    key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.cycle_view(await handlers.collect_swab(uow, cycle_id, body))

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/cycles/{cycle_id}/swabs", body=body,
        correlation_id=await _transfer_of_cycle(store, cycle_id), status=201, work=work)


@router.post("/swabs/{sample_id}/result")
async def post_result(sample_id: str, body: ResultIn, store: Store, actor: ActorDep,
                      key: IdempotencyKey = None) -> JSONResponse:
    sample = await UnitOfWork.reading(store).require(Sample, sample_id, "sample")

    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.cycle_view(await handlers.record_result(uow, sample_id, body))

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/swabs/{sample_id}/result", body=body,
        correlation_id=await _transfer_of_cycle(store, sample.cycle_id), status=200, work=work)
